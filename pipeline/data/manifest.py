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
    classes: Optional[list[str]],
    image_format: str,
    splits: dict[str, dict],
    source: str,
    settings: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write manifest.json atomically and durably; call only after every shard is in place. ``classes=None``
    marks unlabelled shards (``labeled: false``, no classes): nothing can build a classifier from them."""
    labels = {"labeled": False} if classes is None else {
        "labeled": True, "classes": list(classes), "num_classes": len(classes)}  # fmt: skip
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        **labels,
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


def counts_in_manifest(manifest: dict, shards: list[str]) -> Optional[list[int]]:
    """Samples in each of these shards according to the manifest (None when a shard is not listed)."""
    counts: dict[str, int] = {}
    for split in manifest.get("splits", {}).values():
        counts.update(zip(split.get("shards", []), split.get("counts", [])))
    names = [os.path.basename(s) for s in shards]
    if not all(n in counts for n in names):
        return None
    return [counts[n] for n in names]


def count_in_manifest(manifest: dict, shards: list[str]) -> Optional[int]:
    """Samples in these shards according to the manifest (None when a shard is not listed)."""
    counts = counts_in_manifest(manifest, shards)
    return None if counts is None else sum(counts)


def is_wids_index(path: str | os.PathLike) -> bool:
    """Whether a JSON file is a wids shard index (``{"wids_version": 1, "shardlist": [...]}``), not a manifest."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return '"wids_version"' in head or '"wids-shard-index' in head


CLASSES_NAME = "classes.json"


def find_classes(shards: list[str]) -> Optional[tuple[list[str], str]]:
    """(class names, the file) from a ``classes.json`` beside the (local) shards, if there is one.

    Accepted: a list of names; ``{"classes": [names]}``; ``{name: index}`` (ImageFolder's class_to_idx);
    ``{"0": name, ...}``. ValueError naming the file for anything else."""
    first = shards[0]
    if "://" in first or first.startswith("pipe:"):
        return None
    path = Path(first).parent / CLASSES_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    names = _class_names(doc)
    if names is None:
        raise ValueError(
            f'{path}: expected a list of class names, {{"classes": [...]}}, {{name: index}} or {{"0": name}}'
        )
    return names, str(path)


def _class_names(doc) -> Optional[list[str]]:
    if isinstance(doc, dict) and isinstance(doc.get("classes"), list):
        doc = doc["classes"]
    if isinstance(doc, list):
        return [str(n) for n in doc]
    if not isinstance(doc, dict) or not doc:
        return None
    if all(isinstance(v, int) for v in doc.values()) and sorted(doc.values()) == list(range(len(doc))):
        return [name for name, _ in sorted(doc.items(), key=lambda kv: kv[1])]
    if all(str(k).isdigit() for k in doc) and sorted(int(k) for k in doc) == list(range(len(doc))):
        return [str(doc[k]) for k in sorted(doc, key=int)]
    return None
