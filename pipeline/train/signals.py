"""Stop requests (Ctrl-C, SIGTERM, Slurm's pre-timeout USR2) -> a checkpoint at the next step boundary, agreed by
every rank; and the fault-injection test hook.

The flag is polled once per step with one tiny all-reduce, so all ranks stop at the same step and save together.
A Python handler a launcher installed before (the Slurm task's) is chained, not replaced: it is called after the
flag is set, and also for a signal only another rank received (forwarded by the agreement), so the launcher
knows why the run stopped (USR2: requeue it).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("pipeline")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class StopFlag:
    """Set by a signal handler or a request; ``agreed()`` is the per-step collective."""

    def __init__(self):
        self.reason: Optional[str] = None
        self.signals: set[int] = set()
        self._group = None
        self._chained: dict[int, object] = {}

    def install(self, signals=STOP_SIGNALS) -> None:
        for sig in signals:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler, None):
                signal.signal(sig, self._handle)
            elif callable(current) and current != self._handle:
                self._chained[sig] = current
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:  # a second Ctrl-C: really stop now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        self.signals.add(signum)
        if signum in self._chained:
            self._chained[signum](signum, frame)

    def request(self, reason: str) -> None:
        self.reason = reason

    def agreed(self) -> bool:
        """Collective. On a CPU gloo group, so on GPUs the check costs no device sync in the hot loop."""
        if self._group is None:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flags = torch.tensor(
            [1 if self.reason else 0] + [int(s in self.signals) for s in STOP_SIGNALS], dtype=torch.int32
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        for sig, seen in zip(STOP_SIGNALS, flags[1:].tolist()):
            if seen and sig not in self.signals:  # another rank got it: tell this rank's launcher too
                self.signals.add(sig)
                self.reason = self.reason or f"{signal.Signals(sig).name} on another rank"
                if sig in self._chained:
                    self._chained[sig](sig, None)
        if flags[0].item() and self.reason is None:
            self.reason = "stop requested on another rank"
        return bool(flags[0].item())


@dataclass
class Fault:
    """TEST HOOK, off unless VITPIPE_FAULT is set: "rank=R,step=S[,action=raise|exit|hang][,attempt=A]" makes
    rank R, on reaching step S by training, raise an error (default), die without a traceback (exit, like a crash
    or an OOM kill), or hold until a stop signal arrives (hang: a step that outlasts a time limit); in every
    attempt, or only in attempt A (0 is the first; a resumed attempt that trains through S again must not
    repeat a hold meant for the first). The tests use it to check how failures and signals are handled."""

    rank: int
    step: int
    action: str = "raise"
    attempt: Optional[int] = None

    @classmethod
    def from_environ(cls, rank: int, attempt: int = 0) -> Optional[Fault]:
        spec = os.environ.get("VITPIPE_FAULT", "").strip()
        if not spec:
            return None
        try:
            fields = dict(item.split("=", 1) for item in spec.split(","))
            only = fields.pop("attempt", None)
            fault = cls(
                int(fields.pop("rank")),
                int(fields.pop("step")),
                fields.pop("action", "raise"),
                None if only is None else int(only),
            )
            if fields or fault.action not in ("raise", "exit", "hang"):
                raise ValueError
        except (KeyError, ValueError):
            raise ValueError(
                f"VITPIPE_FAULT={spec!r}: expected 'rank=R,step=S[,action=raise|exit|hang][,attempt=A]' "
                "(a test hook; unset it for real runs)"
            ) from None
        if fault.rank != rank or fault.attempt not in (None, attempt):
            return None
        return fault

    def maybe_trigger(self, step: int, stop: StopFlag) -> None:
        if step != self.step:
            return
        log.warning("VITPIPE_FAULT: rank %d at step %d: %s (test hook)", self.rank, self.step, self.action)
        if self.action == "exit":
            os._exit(17)
        if self.action == "hang":
            while stop.reason is None:  # a signal handler sets it
                time.sleep(0.1)
            return
        raise RuntimeError(f"VITPIPE_FAULT: injected failure on rank {self.rank} at step {self.step}")
