"""Where start-up goes: the time from the user's command to the first training step and the first logged metric,
phase by phase, so a slow start names its cause (imports, DeepSpeed's op load, MLflow, the data plan, the
first batch) in the log, summary.json, MLflow and ``make bench-startup``.

The clock starts at ``VITPIPE_T0`` (seconds since the epoch): the stage's start in the command (launch/stages.py
run_stage), which the ranks it launches inherit; on Slurm the task's own start (queueing is the scheduler's)."""

from __future__ import annotations

import os
import time
from typing import Optional

T0_ENV = "VITPIPE_T0"
T_SPAWN_ENV = "VITPIPE_T_SPAWN"  # when the local launcher started this rank's process


def mark_stage_start() -> None:
    """The moment a stage's command began, for the ranks it starts; each stage of ``make pipeline`` sets it again,
    so a fine-tune's start-up does not include the pretraining before it."""
    os.environ[T0_ENV] = repr(time.time())


class StartupClock:
    """Named marks in the order they happen; each phase is the time since the previous mark. A mark is
    recorded once (a resumed loop reaching ``first_step`` again does not move it)."""

    def __init__(self, t0: Optional[float] = None):
        if t0 is None:
            raw = os.environ.get(T0_ENV, "")
            t0 = float(raw) if raw else time.time()
        self.t0 = t0
        self.marks: dict[str, float] = {}

    def mark(self, name: str, at: Optional[float] = None) -> None:
        """``name`` ends now (or at the time stamp ``at``)."""
        self.marks.setdefault(name, (time.time() if at is None else at) - self.t0)

    def mark_spawn(self) -> None:
        """The command's own work before it started this rank (config, shard index), if a local launcher said
        when; the rest until now is the rank's interpreter starting."""
        spawned = os.environ.get(T_SPAWN_ENV, "")
        if spawned and float(spawned) >= self.t0:
            self.mark("command", float(spawned))

    def phases(self) -> dict[str, float]:
        """Seconds spent in each phase (up to its mark), in order."""
        out, last = {}, 0.0
        for name, at in self.marks.items():
            out[name] = round(at - last, 3)
            last = at
        return out

    def since_start(self, name: str) -> Optional[float]:
        return None if name not in self.marks else round(self.marks[name], 3)

    def describe(self, until: str) -> str:
        """One line: the total up to ``until`` and its phases, largest first."""
        phases = self.phases()
        names = list(phases)[: list(phases).index(until) + 1] if until in phases else list(phases)
        parts = sorted(((phases[n], n) for n in names), reverse=True)
        return (
            f"{self.marks.get(until, 0.0):.1f} s after the command ("
            + ", ".join(f"{name} {seconds:.1f}" for seconds, name in parts)
            + ")"
        )
