"""Checkpoint files written in the background (``checkpoint.background_write``): the loop waits only for a copy
of the state in host memory.

DeepSpeed's own asynchronous writers cannot be used here (measured, DeepSpeed 0.19.8): the decoupled and fast
writers need the CROSS_RANK/CROSS_SIZE variables only DeepSpeed's launcher sets, then fail on a missing
``dp_rank``, and with ``data_parallel="replica"`` refuse to serialise ZeRO's optimizer state; the fast writer
needs libaio; DataStates is not installed; Nebula is gone. So this is a checkpoint engine of DeepSpeed's own
kind, set as ``engine.checkpoint_engine``: DeepSpeed still decides what goes into which file (the format is
unchanged, loadable by ``engine.load_checkpoint``, ``ds_to_universal`` and pipeline/finetune/consolidate.py);
``save`` copies the state tree (it holds live parameters and optimizer partitions) and a thread writes each
file with DeepSpeed's own ``TorchCheckpointEngine.save`` to a temporary name, fsyncs and renames it.

A checkpoint counts only when every rank's files are on disk: each rank's thread fsyncs its files and the tag
folder, then drops ``.written-rankNNNNN``; rank 0's thread waits for all of them before it writes the
``COMPLETE`` marker (pipeline/train/checkpoint.py ``finalize``). No collective runs off the training thread.
A crash before that leaves a tag without the marker: resuming falls back to the previous complete checkpoint,
as with synchronous saves. At most one save is in flight: ``wait()`` (the next save, the stop path, the end of
the run) returns once this rank's part is done (rank 0: once the marker is written).

``defer_copy`` (state in host memory): the copy itself moves to the writer thread too, overlapping the next
step's forward and backward, which only read the saved tensors; the training thread waits for it
(``wait_staged``) before the optimizer step, the first thing that changes them. The trainer uses it where the
forward changes no saved state (no BatchNorm running statistics) and ZeRO < 3. This is torchtitan's staging
overlap; measured on the 2-core VM: the loop's wait for a ViT-L save fell from the copy's ~1 s to a few ms
(docs/performance.md).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pipeline.files import fsync_path, replacing

WRITTEN = ".written-rank{rank:05d}"  # this rank's files of a tag are durable (removed once COMPLETE is written)


def can_defer_copy(module: torch.nn.Module, zero_stage: int) -> bool:
    """Whether the copy may overlap the next forward/backward: only if they change no saved state (no BatchNorm
    running statistics) and ZeRO < 3 (whose forward gathers and releases the parameters)."""
    return zero_stage < 3 and not any(getattr(m, "track_running_stats", False) for m in module.modules())


def _storage_key(storage: torch.UntypedStorage) -> tuple:
    return storage.device, storage.data_ptr(), storage.nbytes()  # one storage, however many views


class Snapshot:
    """Host copies of the tensors of a state tree, storage by storage (views keep sharing one copy, so each file
    holds the same bytes a direct ``torch.save`` would). The buffers are kept and reused by the next save of the
    same file: fresh memory costs a page fault per 4 KiB on first write (measured: a fresh copy ran at 1.2 GB/s,
    into reused buffers at 6-7 GB/s on the 2-core VM), and pinned memory for CUDA copies is slow to allocate."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: dict[tuple[str, int], torch.UntypedStorage] = {}
        self.bytes = 0

    def copy(self, tree: Any, name: str, count: bool = True) -> Any:
        """A copy of ``tree`` whose tensors live in this snapshot's host buffers (CUDA: queued, non-blocking)."""
        copied: dict[tuple, torch.UntypedStorage] = {}
        out = _map(tree, lambda t: self._tensor(t, name, copied))
        if count:
            self.bytes += sum(storage.nbytes() for storage in copied.values())
        return out

    def hold(self, tree: Any) -> Any:
        """``tree`` with its tensors as they are (live: copied later, by ``copy``) and everything else copied now;
        their bytes counted as ``copy`` would."""
        storages: dict[tuple, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            source = tensor.untyped_storage()
            storages[_storage_key(source)] = source.nbytes()
            return tensor

        held = _map(tree, keep)
        self.bytes += sum(storages.values())
        return held

    def _tensor(self, tensor: torch.Tensor, name: str, copied: dict) -> torch.Tensor:
        source = tensor.untyped_storage()
        key = _storage_key(source)
        if key not in copied:
            copied[key] = self._copy_storage(source, (name, len(copied)))
        out = torch.empty(0, dtype=tensor.dtype).set_(
            copied[key], tensor.storage_offset(), tensor.size(), tensor.stride()
        )
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
        return out.requires_grad_(tensor.requires_grad) if tensor.is_leaf else out

    def _copy_storage(self, source: torch.UntypedStorage, slot: tuple[str, int]) -> torch.UntypedStorage:
        size = source.nbytes()
        target = self.buffers.get(slot)
        if target is None or target.nbytes() != size:
            target = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin and source.is_cuda).untyped_storage()
            self.buffers[slot] = target
        dst = torch.empty(0, dtype=torch.uint8).set_(target)
        src = torch.empty(0, dtype=torch.uint8, device=source.device).set_(source)
        dst.copy_(src, non_blocking=source.is_cuda)
        return target


def _map(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor of nested dicts/lists/tuples; anything else deep-copied (the loss scaler and other
    objects in DeepSpeed's state change with later steps)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        out = copy.copy(tree)  # keeps the mapping's type (OrderedDict)
        for key, value in tree.items():
            out[key] = _map(value, fn)
        return out
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_map(v, fn) for v in tree)
    return copy.deepcopy(tree)


@dataclass
class _Job:
    tag: str
    tag_dir: Path
    files: list[tuple[Any, Path]] = field(default_factory=list)
    ready: Optional[torch.cuda.Event] = None
    started: float = field(default_factory=time.perf_counter)
    finalize: Optional[Callable[[], None]] = None  # rank 0: waits for the other ranks, writes the marker
    staged: threading.Event = field(default_factory=threading.Event)  # the files' tensors are copied


@dataclass
class Written:
    """A save this rank finished writing (rank 0: the checkpoint is complete)."""

    tag: str
    seconds: float  # from the start of the save until durable
    bytes: int


class BackgroundCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with ``save`` split into a copy (now) and the write (a thread)."""

    def __init__(self, rank: int, pin: bool, defer_copy: bool = False):
        super().__init__(None)
        self.name = "BackgroundCheckpointEngine"
        self.zipfile_serialization = True  # DeepSpeed's default (checkpoint_serialization)
        self.rank = rank
        self.snapshot = Snapshot(pin)
        self.defer_copy = defer_copy and not pin  # CUDA: copied on the training thread's stream, as before
        self.staging: Optional[threading.Event] = None  # the save whose copy the next optimizer step waits for
        self.staged_wait_s = 0.0  # the training thread's waits in wait_staged (part of what a save blocks)
        self.job: Optional[_Job] = None
        self.done: list[Written] = []
        self.error: Optional[BaseException] = None
        self.idle = threading.Event()
        self.idle.set()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # -- the training thread -----------------------------------------------------------------------
    def begin(self, tag: str, tag_dir: Path) -> None:
        """Before ``engine.save_checkpoint`` (whose first barrier follows): the previous save must be done (its
        buffers are reused), and a marker left by a killed attempt's save of the same tag is removed."""
        self.wait()
        (Path(tag_dir) / WRITTEN.format(rank=self.rank)).unlink(missing_ok=True)
        self.snapshot.bytes = 0
        self.job = _Job(tag, Path(tag_dir))

    def save(self, state_dict, path: str) -> None:
        """DeepSpeed's hook for each file: copied now, written later."""
        if self.job is None:  # not inside begin()/submit(): DeepSpeed saving on its own (none known)
            return super().save(state_dict, path)
        tree = self.snapshot.hold(state_dict) if self.defer_copy else self.snapshot.copy(state_dict, Path(path).name)
        self.job.files.append((tree, Path(path)))

    def submit(self, finalize: Optional[Callable[[], None]] = None) -> None:
        """After ``engine.save_checkpoint`` returned on this rank: the files go to the writer thread."""
        job, self.job = self.job, None
        job.finalize = finalize
        if self.snapshot.pin and torch.cuda.is_available():  # the copies were queued on the current stream
            job.ready = torch.cuda.Event()
            job.ready.record()
        if self.defer_copy:
            self.staging = job.staged
        else:
            job.staged.set()
        self.idle.clear()
        self._queue.put(job)

    def wait_staged(self) -> None:
        """Before anything changes the saved tensors (the optimizer step): until the writer has copied them."""
        staging = self.staging
        if staging is None:
            return
        if not staging.is_set():
            start = time.perf_counter()
            staging.wait()
            self.staged_wait_s += time.perf_counter() - start
        self.staging = None
        self._raise()

    def wait(self) -> None:
        """Until the save in flight (if any) is done; re-raises a failure of the writer thread."""
        self.idle.wait()
        self._raise()

    def poll(self) -> list[Written]:
        """Saves finished since the last call (the trainer reports them); re-raises a writer failure."""
        self._raise()
        done, self.done = self.done, []
        return done

    def in_flight(self) -> bool:
        return not self.idle.is_set()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"writing a checkpoint in the background failed: {error}") from error

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._write(job)
            except BaseException as exc:  # reported to the training thread by wait()/poll()
                self.error = exc
            finally:
                self.idle.set()

    def _write(self, job: _Job) -> None:
        if job.ready is not None:
            job.ready.synchronize()
        if not job.staged.is_set():
            try:
                job.files = [(self.snapshot.copy(tree, path.name, count=False), path) for tree, path in job.files]
            finally:  # never leave the optimizer step waiting; the failure reaches it via wait_staged, wait or poll
                job.staged.set()
        size = 0
        for tree, path in job.files:
            with replacing(path, fsync=True) as tmp:
                super().save(tree, str(tmp))
            size += path.stat().st_size
        fsync_path(job.tag_dir)  # the renames
        marker = job.tag_dir / WRITTEN.format(rank=self.rank)
        marker.write_text(job.tag)
        fsync_path(marker)
        if job.finalize is not None:
            job.finalize()
        self.done.append(Written(job.tag, time.perf_counter() - job.started, size))


def wait_for_ranks(tag_dir: Path, world_size: int, poll_s: float = 0.05) -> None:
    """Rank 0's writer thread: until every rank has said its files of this tag are durable."""
    names = [tag_dir / WRITTEN.format(rank=r) for r in range(world_size)]
    while not all(p.exists() for p in names):
        time.sleep(poll_s)


def clear_markers(tag_dir: Path) -> None:
    for path in tag_dir.glob(".written-rank*"):
        path.unlink(missing_ok=True)
