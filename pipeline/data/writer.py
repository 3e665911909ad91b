"""Write WebDataset tar shards and a manifest that describes them.

Training reads images as streams of plain tar files ("shards") so that many
data-loader workers on many nodes can read sequentially without touching
millions of small files.  This module turns two kinds of input into shards:

* an ImageFolder-style tree ``root/<class_name>/<image files>``;
* the built-in demo set, scikit-learn's ``digits`` (1,797 real 8x8 images),
  which needs no download and so works on offline clusters and in CI.

Every sample in a shard is a group of tar members sharing one key::

    <key>.png | <key>.jpg   the encoded image
    <key>.cls               the class index as ASCII digits
    <key>.json              optional metadata (source, class name, ...)

Shards are written under a temporary name and renamed into place, and
``manifest.json`` is written last (also atomically), so a manifest on disk
always describes a complete set of shards.  Tar member times are fixed to 0,
which makes the output byte-for-byte reproducible for the same input.

The sources (digits, ImageFolder) are in pipeline/data/sources.py, the command in shards_cli.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.manifest import MANIFEST_NAME
from pipeline.files import fsync_path, temp_path

# Canonical format name -> (file extension in the tar, PIL format name).
_FORMATS = {"png": ("png", "PNG"), "jpg": ("jpg", "JPEG"), "jpeg": ("jpg", "JPEG")}
# Modes each encoder can store as-is; anything else is converted first.
_ENCODABLE_MODES = {
    "PNG": {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"},
    "JPEG": {"L", "RGB", "CMYK"},
}
_JPEG_QUALITY = 95
_SPLIT_RE = re.compile(r"[A-Za-z0-9_-]+")
_MAX_KEY_LEN = 80  # USTAR member names are limited to 100 bytes, ".json" included.


# --------------------------------------------------------------------------
# One split -> shards
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """What was written for one split; paths are relative to the output dir."""

    split: str
    pattern: str  # brace pattern, e.g. "train-{000000..000004}.tar" ("" if empty)
    shards: list[str]
    counts: list[int]
    num_samples: int

    def to_manifest(self) -> dict[str, Any]:
        """The per-split entry stored under ``manifest["splits"][split]``."""
        return {
            "pattern": self.pattern,
            "shards": list(self.shards),
            "counts": list(self.counts),
            "num_samples": self.num_samples,
        }


def normalize_format(image_format: str) -> str:
    fmt = str(image_format).lower().lstrip(".")
    if fmt not in _FORMATS:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return _FORMATS[fmt][0]


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _shard_pattern(split: str, num_shards: int) -> str:
    if num_shards == 0:
        return ""
    return f"{split}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _prepare_for_encoding(img: Image.Image, pil_format: str) -> Image.Image:
    """Convert to a mode the target encoder accepts (e.g. RGBA can't be JPEG)."""
    if img.mode in _ENCODABLE_MODES[pil_format]:
        return img
    if pil_format == "JPEG" and img.mode in ("1", "I", "I;16", "F"):
        return img.convert("L")
    return img.convert("RGB")


def _resized(img: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longer side is <= max_side, keeping aspect; never enlarge."""
    if max_side is None or max(img.size) <= max_side:
        return img
    w, h = img.size
    scale = max_side / max(w, h)
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if img.mode in ("1", "P"):
        # PIL silently falls back to NEAREST for these modes; convert so
        # BICUBIC actually applies.
        if img.mode == "1":
            img = img.convert("L")
        else:
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.resize(new_size, Image.BICUBIC)


def _encode(image: Image.Image | bytes, ext: str, max_side: int | None) -> bytes:
    """Return the encoded image bytes to store, re-encoding only when needed.

    Bytes that already have the target format and need no resize are stored
    unchanged: re-encoding JPEGs would lose quality for nothing.
    """
    pil_format = _FORMATS[ext][1]
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        img = Image.open(io.BytesIO(raw))  # reads the header only
        needs_resize = max_side is not None and max(img.size) > max_side
        if img.format == pil_format and not needs_resize:
            return raw
        img.load()
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"image must be a PIL.Image or bytes, got {type(image).__name__}")
    img = _prepare_for_encoding(_resized(img, max_side), pil_format)
    buf = io.BytesIO()
    if pil_format == "JPEG":
        img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


class _ShardFile:
    """One shard being written to a temp file and renamed into place on commit.

    Plain ``tarfile`` rather than ``webdataset.TarWriter``: the layout is the
    same, and it keeps this tool from importing torch (seconds per run).
    """

    def __init__(self, final: Path):
        self.final = final
        self.tmp = temp_path(final)
        self._fh = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add ``<key>.<ext>`` members; fixed owner/mode/mtime make tars reproducible."""
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = "vitpipe"
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> None:
        self._tar.close()
        self._fh.close()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:  # the tar stream may already be broken
            pass
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


def _remove_stale_shards(out_dir: Path, split: str, keep: int) -> None:
    """Delete ``<split>-NNNNNN.tar`` with index >= keep left by an earlier, larger run."""
    rx = re.compile(re.escape(split) + r"-(\d{6})\.tar")
    for p in out_dir.iterdir():
        m = rx.fullmatch(p.name)
        if m and int(m.group(1)) >= keep:
            p.unlink()


def _members(
    key: str, image, label: int | None, meta: dict | None, ext: str, max_side: int | None, seen: set[str], split: str
) -> dict[str, bytes]:
    """One sample's tar members: the encoded image, ``.cls`` (unless unlabelled: label None), ``.json``."""
    if not key or "." in key or "/" in key or "\\" in key:
        raise ValueError(f"sample key must be non-empty without '.', '/' or '\\': {key!r}")
    if key in seen:
        raise ValueError(f"duplicate sample key {key!r} in split {split!r}")
    seen.add(key)
    members = {ext: _encode(image, ext, max_side)}
    if label is not None:
        label = int(label)
        if label < 0:
            raise ValueError(f"label must be >= 0, got {label} for key {key!r}")
        members["cls"] = str(label).encode("ascii")
    if meta is not None:
        members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


def write_split(
    samples: Iterable[tuple[str, Image.Image | bytes, int | None, dict | None]],
    out_dir: str | os.PathLike,
    split: str,
    *,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    image_format: str = "png",
) -> ShardSpec:
    """Write ``(key, image, label, meta)`` samples as ``<split>-NNNNNN.tar`` shards.

    Keys must be unique and contain no dots or slashes, because WebDataset
    groups tar members into samples by the part of the name before the first
    dot.  A label of None writes no ``.cls`` (unlabelled data).  ``image`` is a PIL image (encoded to ``image_format``) or encoded
    bytes (stored unchanged when no conversion or resize is needed).  An
    empty ``samples`` gives an empty ShardSpec and no files.  Shards left
    over from an earlier run with more shards for this split are removed.
    """
    if not _SPLIT_RE.fullmatch(split or ""):
        raise ValueError(f"split name must match [A-Za-z0-9_-]+, got {split!r}")
    if int(samples_per_shard) < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_side is not None and int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    ext = normalize_format(image_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    shards: list[str] = []
    counts: list[int] = []
    seen: set[str] = set()
    current: _ShardFile | None = None
    try:
        for key, image, label, meta in samples:
            members = _members(key, image, label, meta, ext, max_side, seen, split)
            if current is None:
                current = _ShardFile(out / _shard_name(split, len(shards)))
            current.write(key, members)
            if current.count >= samples_per_shard:
                current.commit()
                shards.append(current.final.name)
                counts.append(current.count)
                current = None
        if current is not None:
            current.commit()
            shards.append(current.final.name)
            counts.append(current.count)
            current = None
    finally:
        if current is not None:
            current.abort()

    _remove_stale_shards(out, split, keep=len(shards))
    return ShardSpec(
        split=split,
        pattern=_shard_pattern(split, len(shards)),
        shards=shards,
        counts=counts,
        num_samples=sum(counts),
    )


def begin_output(out_dir: str | os.PathLike) -> Path:
    """Create out_dir and drop any old manifest: shards are about to change."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    return out
