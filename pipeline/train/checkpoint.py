"""DeepSpeed checkpoints that never replace a good one with a half-written one.

DeepSpeed writes ``<dir>/<tag>/`` on every rank; its own ``latest`` file is written by rank 0 before
the other ranks are known to have finished. So we save with ``save_latest=False`` and, once
``save_checkpoint`` has returned on every rank (it ends in a barrier), rank 0 drops a ``COMPLETE``
marker into the tag folder and then points ``latest`` at it atomically. Resuming only ever considers
tags with the marker; older complete ones beyond ``keep_last`` and stale partial ones are removed.
Each rank also stores its RNG states, so dropout/augmentation continue exactly.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished on every rank, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and (p / MARKER).exists()]
    return sorted(tags, key=step_of)


def latest_complete(ckpt_dir: Path) -> Optional[str]:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], *, rank: int, keep_last: int) -> SaveResult:
    """Collective: every rank must call this at the same step."""
    start = time.perf_counter()
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # a partial save of this same step from a killed attempt
        shutil.rmtree(tag_dir / MARKER, ignore_errors=True)
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    size = 0
    if rank == 0:  # save_checkpoint returned on every rank: the checkpoint is whole
        atomic_write(tag_dir / MARKER, f"{step}\n")
        atomic_write(ckpt_dir / "latest", tag)  # for DeepSpeed's own tools (zero_to_fp32 etc.)
        _prune(ckpt_dir, keep_last, newest=tag)
        size = dir_size(tag_dir)
    return SaveResult(tag, tag_dir, time.perf_counter() - start, size)


def _prune(ckpt_dir: Path, keep_last: int, newest: str) -> None:
    """Remove complete tags beyond keep_last and partial ones older than the newest complete one."""
    keep = set(complete_tags(ckpt_dir)[-keep_last:]) | {newest}
    for path in ckpt_dir.iterdir():
        if (
            path.is_dir()
            and path.name.startswith("step")
            and path.name not in keep
            and step_of(path.name) < step_of(newest)
        ):
            shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str, *, rank: int) -> dict[str, Any]:
    """Collective: restores model, optimizer and this rank's RNG; returns the client state."""
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.exists():  # absent when the world size changed; the run still continues
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}
