"""The names and facts of a run's checkpoints that need no torch: which tags exist and are complete, what wrote
them, and whether a run may resume from one on its current world size (the CLI checks this before starting).
pipeline/train/checkpoint.py writes and loads them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

MARKER = "COMPLETE"
META = "meta.json"
UNIVERSAL = "universal"  # checkpoints/universal/<tag>/: a tag converted for another world size
ELASTIC_STAGES = (1, 2)  # ZeRO stages DeepSpeed's universal checkpoints load into and convert from
TAG = re.compile(r"step(\d{8})")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


def _tag_dirs(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name)] if ckpt_dir.is_dir() else []


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose save finished on every rank, oldest first."""
    return sorted((p.name for p in _tag_dirs(ckpt_dir) if (p / MARKER).exists()), key=step_of)


def latest_complete(ckpt_dir: Path) -> Optional[str]:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_meta(tag_dir: Path) -> dict:
    """World size and ZeRO stage of a checkpoint ({} for one written before meta.json existed)."""
    try:
        return json.loads((tag_dir / META).read_text())
    except (OSError, ValueError):
        return {}


def elastic_problem(meta: dict, world_size: int, zero_stage: int) -> Optional[str]:
    """Why a checkpoint cannot be resumed on this world size / ZeRO stage, or None when it can. Measured
    (docs/reliability.md): the same world and stage always; ZeRO-0 on any world size (its optimizer state is whole
    in one file); between ZeRO-1 and 2 on any world size, through DeepSpeed's universal checkpoints. Not ZeRO-3
    on another world size (its universal resume was not exact), and not between ZeRO-0/3 and the others."""
    saved_world, saved_stage = meta.get("world_size", world_size), meta.get("zero_stage", zero_stage)
    if saved_stage == zero_stage and (saved_world == world_size or zero_stage == 0):
        return None
    if saved_stage in ELASTIC_STAGES and zero_stage in ELASTIC_STAGES:
        return None
    return (
        f"the checkpoint was written by {saved_world} rank(s) at ZeRO-{saved_stage}; resuming it on {world_size} "
        f"rank(s) at ZeRO-{zero_stage} is not supported (another world size needs ZeRO-1 or 2 on both sides, "
        f"or ZeRO-0 on both). Resume on {saved_world} rank(s) with deepspeed.zero_stage={saved_stage}"
    )


def needs_universal(meta: dict, world_size: int) -> bool:
    """Another world size at ZeRO-1/2: DeepSpeed loads it only as a universal checkpoint."""
    return meta.get("world_size", world_size) != world_size and meta.get("zero_stage") in ELASTIC_STAGES
