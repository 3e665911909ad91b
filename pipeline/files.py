"""Writing files so that a reader never sees half of one: write a hidden sibling, then rename it into place.

One place for the pattern because every durable file of the project needs it (configs, markers, manifests,
shards, converted weights, journals' offsets, Slurm status): a crash mid-write leaves the old file (or none),
never a truncated one. ``fsync=True`` also makes the content durable before the rename, for files whose
presence promises that other files are complete (a manifest, a COMPLETE marker).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(final: Path) -> Path:
    """A hidden name beside ``final`` (same directory, so the rename is atomic), unique per process."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp{os.getpid()}")


@contextmanager
def replacing(final: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``final``, on an exception it is removed."""
    final = Path(final)
    tmp = temp_path(final)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, content: str | bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``content`` (text as UTF-8) in one step."""
    with replacing(path, fsync=fsync) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")


def fsync_path(path: Path) -> None:
    """Flush a written file to the disk (a no-op where the file system does not support it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
