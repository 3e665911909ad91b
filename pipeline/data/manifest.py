"""``manifest.json``: what a set of shards holds (splits, shard names, sample counts, classes).

The shard writer writes it last, atomically, so a manifest on disk always describes a complete set of shards;
the planner and the benchmarks read it through ``read_manifest`` (the one reader, which checks its format).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

from pipeline.files import atomic_write

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "webdataset"
MANIFEST_VERSION = 1


def manifest_path(path_or_dir: str | os.PathLike) -> Path:
    p = Path(path_or_dir)
    return p / MANIFEST_NAME if p.is_dir() else p


def write_manifest(
    out_dir: Path,
    *,
    classes: list[str],
    image_format: str,
    splits: dict[str, dict],
    source: str,
    settings: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write manifest.json atomically and durably; call only after every shard is in place."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "classes": list(classes),
        "num_classes": len(classes),
        "image_format": image_format,
        "splits": splits,
        "source": source,
        "settings": settings,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    final = Path(out_dir) / MANIFEST_NAME
    atomic_write(final, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", fsync=True)
    return final


def read_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Load and sanity-check a manifest, given the file or its directory."""
    path = manifest_path(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path} (write shards first: make shards)")
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: expected format={MANIFEST_FORMAT!r} version={MANIFEST_VERSION}, "
            f"got format={manifest.get('format')!r} version={manifest.get('version')!r}"
        )
    return manifest


def find_manifest(shards: list[str], explicit: Optional[str] = None) -> Optional[dict]:
    """The manifest next to the shards (or ``data.manifest``), if there is one; ``FileNotFoundError`` when an
    explicitly named one is missing."""
    path = Path(explicit) if explicit else Path(shards[0]).parent / MANIFEST_NAME
    if "://" in str(path) or str(path).startswith("pipe:") or not path.is_file():
        if explicit:
            raise FileNotFoundError(f"data.manifest: {explicit} not found")
        return None
    return read_manifest(path)


def count_in_manifest(manifest: dict, shards: list[str]) -> Optional[int]:
    """Samples in these shards according to the manifest (None when a shard is not listed)."""
    counts: dict[str, int] = {}
    for split in manifest.get("splits", {}).values():
        counts.update(zip(split.get("shards", []), split.get("counts", [])))
    names = [os.path.basename(s) for s in shards]
    if not all(n in counts for n in names):
        return None
    return sum(counts[n] for n in names)
