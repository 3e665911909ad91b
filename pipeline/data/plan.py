"""What a run's data is, decided before any process starts: the shard list, sample counts, classes, steps.

Light on purpose (no torch, no webdataset): the CLI plans the data right after the config is read, so a
missing shard or an impossible batch is one error line within a second or two.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import dataclass
from typing import Optional

import braceexpand

from pipeline.data.manifest import count_in_manifest, find_manifest


class DataError(ValueError):
    """The data cannot serve this job as configured; the message says what to change."""


def expand_urls(pattern: str) -> list[str]:
    """``::``-joined brace patterns -> URLs (webdataset's pattern language, without its WDS_ variables)."""
    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def expand_shards(pattern: str, key: str = "data.train_shards") -> list[str]:
    """Brace/``::`` pattern -> shard URLs; local files must exist (remote ``pipe:``/URLs pass through)."""
    urls = expand_urls(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{key}: shard {missing[0]} not found{more}; build shards with 'make shards' "
            f"or point {key} at existing .tar files"
        )
    if not urls:
        raise DataError(f"{key}={pattern!r} matches no shards")
    return urls


# ----------------------------------------------------------------------------------------------------
# Deterministic randomness


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() is salted per process, so not that)."""
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def deal_shards(
    shards: list[str], *, seed: int, epoch: int, rank: int, world: int, shuffle: bool = True, cycle: int = 0
) -> list[str]:
    """This rank's shards for one pass: shuffled by (seed, epoch, cycle), then every world-th."""
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, epoch, cycle)).shuffle(order)
    return order[rank::world]


def usable_workers(num_workers: int, shards: int, world: int) -> int:
    """Workers that each get at least one shard (eval) or stream (training) on every rank: an empty one would
    spin or hang."""
    return max(1, min(num_workers, shards // world)) if num_workers > 0 else 0


MAX_DEFAULT_STREAMS = 64


def resolve_streams(requested: Optional[int], shards: int, batch_size: int, world: int, resampled: bool) -> int:
    """The number of canonical sample streams (pipeline/data/stream.py): fixed for a run whatever its world size,
    so each global batch is the same set of samples on any number of ranks and workers. Default: as many as
    there are shards, at most 64, reduced until it divides the global batch."""
    if requested is None:
        streams = min(MAX_DEFAULT_STREAMS, batch_size, shards if not resampled else MAX_DEFAULT_STREAMS)
        while batch_size % streams:
            streams -= 1
    else:
        streams = requested
    hint = f"set data.streams to a multiple of the {world} ranks that divides data.batch_size={batch_size}" + (
        ""
        if resampled
        else f" and is at most the {shards} shard(s) (write more, smaller shards with "
        f"make shards SHARDS_ARGS='--samples-per-shard N', or data.resampled=true)"
    )
    if batch_size % streams:
        raise DataError(f"data.streams={streams} does not divide data.batch_size={batch_size}; {hint}")
    if not resampled and streams > shards:
        raise DataError(f"data.streams={streams} needs at least that many train shards, there are {shards}; {hint}")
    if streams % world:
        which = "" if requested is not None else " (the default)"
        raise DataError(
            f"data.streams={streams}{which} cannot be split evenly over {world} ranks: every rank takes "
            f"the same number of streams; {hint}"
        )
    return streams


# ----------------------------------------------------------------------------------------------------
# What the trainer uses


@dataclass
class DataPlan:
    """The resolved facts about the data for a run: shards, counts, classes, steps per epoch."""

    train_shards: list[str]
    val_shards: list[str]
    train_samples: int
    val_samples: Optional[int]
    classes: Optional[list[str]]
    steps_per_epoch: int
    streams: int  # canonical sample streams of the training data (resolve_streams)


def plan_data(config, world_size: int) -> DataPlan:
    """Check the shards against the job before it starts (missing files, too few shards, counts)."""
    d = config.data
    train = expand_shards(d.train_shards, "data.train_shards")
    val = expand_shards(d.val_shards, "data.val_shards") if d.val_shards else []
    try:
        manifest = find_manifest(train, d.manifest)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    train_samples = d.train_samples or (manifest and count_in_manifest(manifest, train))
    if not train_samples and not d.samples_per_epoch:
        raise DataError(
            "data.train_samples is unknown: no manifest.json lists these shards; set "
            "data.train_samples (samples in one pass) or data.resampled=true with data.samples_per_epoch"
        )
    streams = resolve_streams(d.streams, len(train), d.batch_size, world_size, d.resampled)
    per_epoch = d.samples_per_epoch or train_samples
    steps = per_epoch // d.batch_size
    if steps < 1:
        raise DataError(f"data.batch_size={d.batch_size} is larger than an epoch ({per_epoch} samples)")
    val_samples = manifest and val and count_in_manifest(manifest, val) or None
    classes = manifest.get("classes") if manifest else None
    return DataPlan(train, val, int(train_samples or per_epoch), val_samples, classes, steps, streams)
