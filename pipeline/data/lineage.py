"""What a run's data is, as records that MLflow keeps as dataset inputs of the run (docs/tracking.md).

One record per split: a name people read, the shard pattern as given (the source), a digest of what the manifest
or the shard index says the shards hold (file names, samples, sizes, classes: the same data gives the same
digest wherever the folder is mounted; a re-written shard gives another), and the sample count. A registered
model's run thus names the exact shard set it was trained on; a fine-tune run also lists its pretraining run's
(context ``pretrain``). Light on purpose: built by the planner, sent by the tracker.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from pipeline.data.remote import is_remote, local_path


def source_type(urls: list[str]) -> str:
    kinds = {
        "http" if u.startswith(("http://", "https://")) else "pipe" if u.startswith("pipe:") else "local" for u in urls
    }
    return kinds.pop() if len(kinds) == 1 else "mixed"


def dataset_name(pattern: str) -> str:
    """``data/x/train-{0000..0007}.tar`` -> ``x/train-{0000..0007}.tar`` (the folder and the file pattern)."""
    first = pattern.split("::")[0]
    if first.startswith("pipe:"):
        words = [w for w in first.split() if "/" in w]
        first = words[0] if words else first
    parts = [p for p in first.rstrip("/").split("/") if p]
    name = "/".join(parts[-2:]) if len(parts) >= 2 else first
    return name + (" (+more)" if "::" in pattern else "")


def shard_file_name(url: str) -> str:
    """A shard's file name wherever it is served from: ``train-0003.tar`` for a path, a URL or ``pipe:aws s3 cp
    s3://b/train-0003.tar -`` (so the digest does not change with the host, port or mount point)."""
    if url.startswith("pipe:"):
        words = [w for w in url[len("pipe:") :].split() if ".tar" in w]
        return os.path.basename(words[-1]) if words else url
    if is_remote(url):
        return os.path.basename(url.split("?", 1)[0].split("#", 1)[0])
    return os.path.basename(local_path(url))


def digest(shards: list[str], counts: Optional[list[int]], entries: dict[str, dict], classes) -> str:
    """16 hex digits over (file name, samples, bytes) per shard and the classes: the same shards give the same
    digest from a local folder, an HTTP server or a bucket."""
    rows = []
    for i, url in enumerate(shards):
        name = shard_file_name(url)
        entry = entries.get(url) or {}
        rows.append([name, counts[i] if counts else None, entry.get("size")])
    blob = json.dumps({"shards": rows, "classes": classes}, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_record(
    context: str,
    pattern: str,
    shards: list[str],
    counts: Optional[list[int]],
    samples: Optional[int],
    counted_by: str,
    entries: dict[str, dict],
    classes,
) -> dict:
    """One split as a plain record: name, digest, source, source_type, context and a profile."""
    profile = {"num_rows": samples, "shards": len(shards), "counted_by": counted_by}
    profile["num_classes"] = len(classes) if isinstance(classes, list) else classes
    images: dict[str, int] = {}
    for url in shards:
        for suffix, n in ((entries.get(url) or {}).get("images") or {}).items():
            images[suffix] = images.get(suffix, 0) + n
    if images:
        profile["images"] = images
    return {
        "name": dataset_name(pattern),
        "digest": digest(shards, counts, entries, classes),
        "source": pattern,
        "source_type": source_type(shards),
        "context": context,
        "profile": profile,
    }
