"""DeepSpeed checkpoints that never replace a good one with a half-written one.

DeepSpeed writes ``<dir>/<tag>/`` on every rank; its own ``latest`` file is written by rank 0 before
the other ranks are known to have finished. So we save with ``save_latest=False`` and, once
``save_checkpoint`` has returned on every rank (it ends in a barrier), rank 0 drops a ``COMPLETE``
marker into the tag folder and then points ``latest`` at it atomically. Resuming only ever considers
tags with the marker; older complete ones beyond ``keep_last`` and stale partial ones are removed.
Each rank also stores its RNG states, so dropout/augmentation continue exactly, and rank 0 a ``meta.json``
(world size, ZeRO stage) that tells a resume whether the checkpoint can be loaded as it is.

Elastic resume: a checkpoint written by another number of ranks is converted once with DeepSpeed's universal
checkpointing (``ds_to_universal``) into ``checkpoints/universal/<tag>/`` and loaded with
``checkpoint.load_universal``: model and optimizer state re-partitioned exactly (measured: bit-identical Adam
moments, next losses within 1e-7 relative in fp32; docs/reliability.md). DeepSpeed supports it for ZeRO-1 and 2,
on either side; ZeRO-0 and ZeRO-3 checkpoints resume on their own world size only.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write
from pipeline.train.tags import (  # noqa: F401  (re-exported: the checkpoint's names, without torch)
    MARKER,
    META,
    UNIVERSAL,
    _tag_dirs,
    complete_tags,
    elastic_problem,
    latest_complete,
    needs_universal,
    read_meta,
    step_of,
    tag_for,
)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], np_state[1].tolist(), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class SaveResult:
    tag: str
    path: Path
    seconds: float
    bytes: int


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    *,
    rank: int,
    keep_last: int,
    world_size: int = 1,
    zero_stage: int = 0,
    writer=None,
) -> SaveResult:
    """Collective: every rank must call this at the same step. ``writer`` (a BackgroundCheckpointEngine set as
    the engine's checkpoint engine): the files are copied now and written in the background; the marker follows
    once every rank's are durable. ``seconds`` is what the caller waited; ``bytes`` what this rank copied then."""
    start = time.perf_counter()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if writer is not None:
        writer.begin(tag, tag_dir)  # waits for the save still in flight
    if rank == 0 and tag_dir.exists():  # a partial save of this same step from a killed attempt
        (tag_dir / MARKER).unlink(missing_ok=True)
    tag_dir.mkdir(parents=True, exist_ok=True)
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    (writer.save if writer is not None else torch.save)(rng_state(), rng_file)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    meta = {"step": step, "world_size": world_size, "zero_stage": zero_stage}
    if writer is not None:
        done = partial(_finalize_when_written, ckpt_dir, tag, meta, keep_last) if rank == 0 else None
        writer.submit(done)
        return SaveResult(tag, tag_dir, time.perf_counter() - start, writer.snapshot.bytes)
    size = 0
    if rank == 0:  # save_checkpoint returned on every rank: the checkpoint is whole
        finalize(ckpt_dir, tag, meta, keep_last)
        size = dir_size(tag_dir)
    return SaveResult(tag, tag_dir, time.perf_counter() - start, size)


def finalize(ckpt_dir: Path, tag: str, meta: dict, keep_last: int) -> None:
    """Rank 0, once every rank's files of ``tag`` are written: meta.json, the COMPLETE marker, ``latest``."""
    tag_dir = ckpt_dir / tag
    atomic_write(tag_dir / META, json.dumps(meta))
    atomic_write(tag_dir / MARKER, f"{meta['step']}\n", fsync=True)
    atomic_write(ckpt_dir / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32 etc.)
    _prune(ckpt_dir, keep_last, newest=tag)


def _finalize_when_written(ckpt_dir: Path, tag: str, meta: dict, keep_last: int) -> None:
    """Rank 0's writer thread: the marker once every rank said its files are durable (files, no collective)."""
    from pipeline.train.background import clear_markers, wait_for_ranks

    wait_for_ranks(ckpt_dir / tag, meta["world_size"])
    finalize(ckpt_dir, tag, meta, keep_last)
    clear_markers(ckpt_dir / tag)


def _prune(ckpt_dir: Path, keep_last: int, newest: str) -> None:
    """Remove complete tags beyond keep_last and partial ones older than the newest complete one."""
    keep = set(complete_tags(ckpt_dir)[-keep_last:]) | {newest}
    for path in _tag_dirs(ckpt_dir):
        if path.name not in keep and step_of(path.name) < step_of(newest):
            shutil.rmtree(path, ignore_errors=True)
    universal = ckpt_dir / UNIVERSAL
    for path in _tag_dirs(universal):  # conversions of checkpoints that are gone, or superseded
        if path.name not in keep or step_of(path.name) < step_of(newest):
            shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, *, rank: int, universal: bool = False) -> dict[str, Any]:
    """Collective: restores model, optimizer and this rank's RNG; returns the client state. ``universal``: from
    the tag's universal conversion (the engine was built with checkpoint.load_universal)."""
    load_dir = ckpt_dir / UNIVERSAL if universal else ckpt_dir
    load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.exists():  # absent for ranks the checkpoint's world did not have
        set_rng_state(torch.load(rng_file, weights_only=True))
    if universal and not client_state:  # the conversion keeps the model states' extras only on rank 0's file
        client_state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return client_state or {}


def to_universal(ckpt_dir: Path, tag: str, workers: int = 2) -> Path:
    """DeepSpeed's ``ds_to_universal`` of one tag, once (a COMPLETE marker says the conversion finished)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    out = ckpt_dir / UNIVERSAL / tag
    if (out / MARKER).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir / tag),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    atomic_write(out / MARKER, tag, fsync=True)
    return out
