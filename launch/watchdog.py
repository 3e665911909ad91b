"""The hang watchdog: reads every rank's heartbeat (pipeline/train/heartbeat.py) and says when the job must end.

A collective's own timeout cannot be relied on (measured: with one of two CPU ranks SIGSTOPped, gloo waited for
minutes past ``deepspeed.comm_timeout_min``; a stuck NCCL rank, a deadlocked loader or stuck storage look the
same). So every rank reports progress, and a rank that makes none for ``launch.hang_timeout_s`` (the longer
``launch.startup_grace_s`` before its first step and while it saves a checkpoint) ends the job. The rank named
is the cause, not a victim: a rank that stopped beating altogether (a frozen process) comes first, then the
one whose step is lowest (the others wait for it in a collective), then the one that progressed least recently.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SLOW_PHASES = ("starting", "saving")  # allowed the start-up grace: first step (compilation), checkpoint writes


@dataclass(frozen=True)
class Watch:
    """Where the ranks' heartbeats are and how long silence may last (launch/watchdog.py)."""

    folder: Path
    hang_timeout_s: float
    startup_grace_s: float
    beat_interval_s: float

    def dog(self, world_size: int, started_at: Optional[float] = None) -> Watchdog:
        return Watchdog(
            self.folder,
            world_size,
            hang_timeout_s=self.hang_timeout_s,
            startup_grace_s=self.startup_grace_s,
            beat_interval_s=self.beat_interval_s,
            started_at=started_at,
        )


@dataclass(frozen=True)
class Hang:
    rank: int
    node: str
    step: int
    phase: str
    silent_s: float  # seconds without progress
    answering: bool  # the process still beats (stuck inside something) or not (stopped, frozen, swapped out)

    def describe(self, timeout_s: float) -> str:
        state = "still running but stuck" if self.answering else "not answering (stopped, frozen or hung in the kernel)"
        where = f"at step {self.step}" if self.step else "before its first step"
        return (
            f"rank {self.rank} on {self.node} made no progress for {self.silent_s:.0f} s ({self.phase} {where}; "
            f"limit {timeout_s:.0f} s); it is {state}"
        )


def read_beats(folder: Path, world_size: int, since: float) -> dict[int, dict]:
    """rank -> its latest heartbeat record, ignoring records of an earlier attempt (written before ``since``)."""
    beats = {}
    for rank in range(world_size):
        try:
            record = json.loads((Path(folder) / f"rank{rank:05d}.json").read_text())
        except (OSError, ValueError):  # not written yet, or caught mid-replace
            continue
        if record.get("beat_at", 0) >= since - 1.0:
            beats[rank] = record
    return beats


class Watchdog:
    def __init__(
        self,
        folder: Path,
        world_size: int,
        *,
        hang_timeout_s: float,
        startup_grace_s: float,
        beat_interval_s: float,
        started_at: Optional[float] = None,
    ):
        self.folder, self.world_size = Path(folder), world_size
        self.hang_timeout_s, self.startup_grace_s = hang_timeout_s, startup_grace_s
        self.silence_s = max(3 * beat_interval_s, 10.0)  # no beat for this long: the process is not answering
        self.started_at = time.time() if started_at is None else started_at

    @property
    def enabled(self) -> bool:
        return self.hang_timeout_s > 0

    def check(self, now: Optional[float] = None) -> Optional[Hang]:
        """The rank to blame when the job must end now, else None."""
        if not self.enabled:
            return None
        now = time.time() if now is None else now
        beats = read_beats(self.folder, self.world_size, self.started_at)
        hung = []
        for rank in range(self.world_size):
            beat = beats.get(rank)
            if beat is None:  # never reported in this attempt
                if now - self.started_at > self.startup_grace_s:
                    hung.append(Hang(rank, "?", 0, "starting", now - self.started_at, False))
                continue
            limit = self.startup_grace_s if beat["phase"] in SLOW_PHASES else self.hang_timeout_s
            silent = now - beat["progress_at"]
            if silent > limit:
                answering = now - beat["beat_at"] < self.silence_s
                hung.append(Hang(rank, beat.get("node", "?"), beat["step"], beat["phase"], silent, answering))
        if not hung:
            return None
        return min(hung, key=lambda h: (h.answering, h.step, -h.silent_s))

    def last_step(self, rank: int) -> Optional[int]:
        beat = read_beats(self.folder, self.world_size, self.started_at).get(rank)
        return None if beat is None else beat["step"]
