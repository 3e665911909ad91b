"""Each rank's sign of life for the launcher's hang watchdog (launch/watchdog.py).

The training thread only records where it is (``progress``: two attribute writes, nothing on the hot path);
a daemon thread writes that to ``<run>/heartbeat/rankNNNNN.json`` every ``interval_s``. The file carries both
when the step last advanced (``progress_at``) and when the file was written (``beat_at``): a rank stuck in a
collective still beats but does not progress, a stopped or frozen process does neither, and the watchdog tells
them apart. ``faulthandler`` is armed on SIGUSR1 so a watchdog can ask a live rank for its Python stacks.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.files import atomic_write

STACK_SIGNAL = signal.SIGUSR1  # a watchdog sends it to get a rank's Python stacks on its stderr


class Heartbeat:
    def __init__(
        self,
        path: Path,
        *,
        rank: int,
        node: str,
        attempt: int,
        interval_s: float,
        clock: Callable[[], float] = time.time,  # the wall clock; tests pass one they set
    ):
        self.path, self.interval_s, self.clock = Path(path), interval_s, clock
        self.record = {
            "rank": rank,
            "node": node,
            "pid": os.getpid(),
            "attempt": attempt,
            "step": 0,
            "phase": "starting",
            "progress_at": clock(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
        self.write_now()
        self._thread.start()
        return self

    def progress(self, step: int, phase: str = "training") -> None:
        """Called by the training thread: the step advanced, or a phase began (evaluating, saving)."""
        self.record = {**self.record, "step": step, "phase": phase, "progress_at": self.clock()}

    def note(self, **fields) -> None:
        """Extra facts for the file (e.g. ``writing``: the checkpoint written in the background, or None)."""
        self.record = {**self.record, **fields}

    def fail(self, error: str) -> None:
        """The rank is going down with this error: said at once, so the launcher can name the cause."""
        self.record = {**self.record, "phase": "failed", "error": error[:500], "failed_at": self.clock()}
        self.write_now()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write_now()

    def write_now(self) -> None:
        """The file, now (the daemon thread calls it every ``interval_s``)."""
        try:
            atomic_write(self.path, json.dumps({**self.record, "beat_at": self.clock()}))
        except OSError:  # a full or flaky file system must not take the rank down; the watchdog will see silence
            pass
