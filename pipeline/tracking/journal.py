"""The tracking journal: every record a run logs, appended to a file in the run folder before anything is sent."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from pipeline.files import atomic_write
from pipeline.rundir import RunDir

COMPACT_BYTES = 4 * 2**20  # a fully sent journal larger than this is truncated


class Spool:
    """Append-only JSON lines in the run directory plus a persisted byte offset of what has been sent.

    One writer (the training thread) appends; one sender reads from the offset. A record is on disk
    before any network call, so a dead server, a requeue or a crash loses nothing."""

    def __init__(self, run_dir):
        run = RunDir(run_dir)
        self.path, self.sent_path = run.spool, run.spool_sent
        self._lock = threading.Lock()
        self._fh = None
        self.offset = 0
        if self.sent_path.exists():
            try:
                self.offset = int(self.sent_path.read_text().strip() or 0)
            except ValueError:
                self.offset = 0
        size = self.path.stat().st_size if self.path.exists() else 0
        if self.offset > size:  # truncated after a full send, offset not yet rewritten
            self.offset = 0

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh is None:
                new = not self.path.exists()
                self._fh = open(self.path, "a", encoding="utf-8")
                if not new and self.path.stat().st_size and not self._ends_with_newline():
                    self._fh.write("\n")  # a previous attempt died mid-line: keep that fragment on its own line
            self._fh.write(line)
            self._fh.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def pending(self) -> Iterator[tuple[Optional[dict], int]]:
        """(record, offset just after it) for each complete unsent line, read lazily; None for an
        unreadable line (a fragment left by a crash)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            pos = self.offset
            for raw in f:
                if not raw.endswith(b"\n"):
                    return  # being written right now
                pos += len(raw)
                try:
                    yield json.loads(raw), pos
                except ValueError:
                    yield None, pos

    def has_pending_create(self) -> bool:
        """Whether an unsent run-creation record waits (a previous attempt never reached the store); a
        raw scan, as the backlog of a long outage can be large. Records are written with "t" first."""
        if not self.path.exists():
            return False
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return any(line.startswith(b'{"t":"create"') for line in f)

    def has_pending(self) -> bool:
        return next(self.pending(), None) is not None

    def pending_count(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return sum(1 for line in f if line.endswith(b"\n"))

    def mark_sent(self, offset: int) -> None:
        self.offset = offset
        atomic_write(self.sent_path, str(offset))
        if offset >= COMPACT_BYTES:
            self.compact()

    def compact(self, remove: bool = False) -> None:
        """Once everything is sent: truncate (or remove) the journal so it does not grow for a week."""
        with self._lock:
            if not self.path.exists() or self.path.stat().st_size != self.offset:
                return
            if remove:
                if self._fh is not None:
                    self._fh.close()
                    self._fh = None
                self.path.unlink()
                self.sent_path.unlink(missing_ok=True)
            else:
                os.truncate(self.path, 0)
                self.sent_path.write_text("0")
            self.offset = 0

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def exclusive(run_dir: Path):
    """A non-blocking exclusive lock on the run's journal lock file, or None if another process has it."""
    fh = open(RunDir(run_dir).spool_lock, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    except OSError:  # a filesystem without locks: go ahead
        pass
    return fh
