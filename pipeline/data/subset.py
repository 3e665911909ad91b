"""``data.train_subset``: fine-tuning on a deterministic, class-balanced subset of the train shards (few labels).

The subset is chosen once, from the labels alone (a walk over the tar headers reading only the tiny ``.cls``
members, pipeline/data/tarscan.py), and cached under ``<run.root>/subsets/``: every rank, and every attempt,
uses the same keys. Each class gets ``n // classes`` samples (the first ``n % classes`` classes one more), the
ones whose keys hash lowest with ``data.train_subset_seed``: a choice that does not depend on shard order or
count, nor on ``run.seed`` (other training seeds see the same labels).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

from pipeline.data.remote import is_remote, local_path, open_shard
from pipeline.data.tarscan import LABEL_SUFFIX, split_key, walk_members
from pipeline.files import atomic_write
from pipeline.rundir import RunsRoot


class SubsetError(ValueError):
    """The subset cannot be drawn as asked; the message says why."""


def labelled_keys(url: str, timeout_s: float = 60.0) -> list[tuple[str, int]]:
    """(key, class index) of every sample of a shard with a ``.cls``, in shard order."""
    stream, _ = open_shard(url, timeout_s)
    size = None if is_remote(url) else os.fstat(stream.fileno()).st_size
    out = []
    with stream:
        for member in walk_members(stream, lambda name: name.lower().endswith("." + LABEL_SUFFIX), size=size):
            parts = split_key(member.name)
            if parts is not None and parts[1] == LABEL_SUFFIX and member.data is not None:
                try:
                    out.append((parts[0], int(member.data.decode().strip())))
                except ValueError:
                    continue
    return out


def _rank(seed: int, key: str) -> str:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).hexdigest()


def choose(keys: list[tuple[str, int]], n: int, seed: int) -> list[str]:
    """``n`` keys, balanced over the classes present, the lowest-hashing ones of each class."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in keys:
        by_class[label].append(key)
    classes = sorted(by_class)
    if not classes:
        raise SubsetError("the train shards hold no labelled sample")
    chosen = []
    for i, label in enumerate(classes):
        want = n // len(classes) + (1 if i < n % len(classes) else 0)
        have = sorted(by_class[label], key=lambda k: _rank(seed, k))
        if len(have) < want:
            raise SubsetError(
                f"data.train_subset={n}: class {label} has {len(have)} sample(s), {want} wanted; "
                f"use at most {len(classes) * min(len(v) for v in by_class.values())}"
            )
        chosen += have[:want]
    return sorted(chosen)


def subset_keys(shards: list[str], n: int, seed: int, runs_root: str) -> list[str]:
    """The subset's keys, chosen once per (shards, n, seed) and cached under ``<run.root>/subsets/``."""
    cache = RunsRoot(runs_root).subsets / f"{_digest(shards, n, seed)}.json"
    try:
        return json.loads(cache.read_text())["keys"]
    except (OSError, ValueError, KeyError):
        pass
    keys = [pair for url in shards for pair in labelled_keys(url)]
    if n > len(keys):
        raise SubsetError(f"data.train_subset={n} is more than the {len(keys)} labelled train samples")
    chosen = choose(keys, n, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps({"n": n, "seed": seed, "shards": len(shards), "keys": chosen}))
    return chosen


def _digest(shards: list[str], n: int, seed: int) -> str:
    """Which shards (and their sizes and times, for local ones), how many, which seed."""
    h = hashlib.sha1(f"{n}:{seed}".encode())
    for url in shards:
        h.update(url.encode())
        if not is_remote(url):
            st = Path(local_path(url)).stat()
            h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def maybe_subset(config, train: list[str]) -> Optional[frozenset[str]]:
    n = config.data.train_subset
    return None if not n else frozenset(subset_keys(train, n, config.data.train_subset_seed, config.run.root))
