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

Run ``python -m pipeline shards --help`` for the command line.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "webdataset"
MANIFEST_VERSION = 1
DIGITS_SOURCE = "sklearn.datasets.load_digits"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

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


def _normalize_format(image_format: str) -> str:
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


def _atomic_replace_target(final: Path) -> Path:
    """Temp name in the same directory (so os.replace is atomic, same filesystem)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


class _ShardFile:
    """One shard being written to a temp file and renamed into place on commit.

    Plain ``tarfile`` rather than ``webdataset.TarWriter``: the layout is the
    same, and it keeps this tool from importing torch (seconds per run).
    """

    def __init__(self, final: Path):
        self.final = final
        self.tmp = _atomic_replace_target(final)
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
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
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


def write_split(
    samples: Iterable[tuple[str, Image.Image | bytes, int, dict | None]],
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
    dot.  ``image`` is a PIL image (encoded to ``image_format``) or encoded
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
    ext = _normalize_format(image_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    shards: list[str] = []
    counts: list[int] = []
    seen: set[str] = set()
    current: _ShardFile | None = None
    try:
        for key, image, label, meta in samples:
            if not key or "." in key or "/" in key or "\\" in key:
                raise ValueError(f"sample key must be non-empty without '.', '/' or '\\': {key!r}")
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r} in split {split!r}")
            seen.add(key)
            label = int(label)
            if label < 0:
                raise ValueError(f"label must be >= 0, got {label} for key {key!r}")
            members = {ext: _encode(image, ext, max_side), "cls": str(label).encode("ascii")}
            if meta is not None:
                members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
            if current is None:
                name = _shard_name(split, len(shards))
                current = _ShardFile(out / name)
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


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------


def _manifest_path(path_or_dir: str | os.PathLike) -> Path:
    p = Path(path_or_dir)
    return p / MANIFEST_NAME if p.is_dir() else p


def _write_manifest(
    out_dir: Path,
    *,
    classes: list[str],
    image_format: str,
    specs: list[ShardSpec],
    source: str,
    settings: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write manifest.json atomically; call only after every shard is in place."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "classes": list(classes),
        "num_classes": len(classes),
        "image_format": image_format,
        "splits": {s.split: s.to_manifest() for s in specs if s.num_samples > 0},
        "source": source,
        "settings": settings,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    final = out_dir / MANIFEST_NAME
    tmp = _atomic_replace_target(final)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def read_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Load and sanity-check a manifest, given the file or its directory."""
    path = _manifest_path(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path} (write shards first: python -m pipeline shards)")
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: expected format={MANIFEST_FORMAT!r} version={MANIFEST_VERSION}, "
            f"got format={manifest.get('format')!r} version={manifest.get('version')!r}"
        )
    return manifest


def shard_paths(path_or_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute shard paths of one split, ready to pass to ``webdataset.WebDataset``."""
    path = _manifest_path(path_or_dir)
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in {path} (has: {sorted(manifest['splits'])})")
    return [str(path.parent.resolve() / s) for s in manifest["splits"][split]["shards"]]


def _begin_output(out_dir: str | os.PathLike) -> Path:
    """Create out_dir and drop any old manifest: shards are about to change."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    return out


def _check_fraction(val_fraction: float) -> float:
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return val_fraction


# --------------------------------------------------------------------------
# digits demo set
# --------------------------------------------------------------------------


def _digits_settings(val_fraction, seed, samples_per_shard, image_size, image_format) -> dict[str, Any]:
    return {
        "source": DIGITS_SOURCE,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "image_size": int(image_size),
        "image_format": _normalize_format(image_format),
    }


def write_digits(
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 1 / 6,
    seed: int = 0,
    samples_per_shard: int = 200,
    image_size: int = 32,
    image_format: str = "png",
) -> Path:
    """Shard scikit-learn's digits (8x8, values 0..16) as image_size^2 grayscale.

    The split is stratified and seeded so every run gives the same train/val
    sets; train order is shuffled (seeded) so each shard mixes all classes.
    Returns the manifest path.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    val_fraction = _check_fraction(val_fraction)
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    settings = _digits_settings(val_fraction, seed, samples_per_shard, image_size, image_format)
    ext = settings["image_format"]

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    indices = np.arange(len(labels))
    if val_fraction > 0:
        train_idx, val_idx = train_test_split(
            indices, test_size=val_fraction, stratify=labels, random_state=seed
        )
    else:
        train_idx, val_idx = indices, indices[:0]
    train_idx = np.random.default_rng(seed).permutation(np.sort(train_idx))
    val_idx = np.sort(val_idx)

    def samples(idx: Iterable[int]) -> Iterator[tuple[str, Image.Image, int, dict]]:
        for i in idx:
            i = int(i)
            img = Image.fromarray(images[i])  # 2-D uint8 -> mode "L"
            img = img.resize((image_size, image_size), Image.BICUBIC)
            label = int(labels[i])
            yield f"digits_{i:04d}", img, label, {"source": DIGITS_SOURCE, "index": i, "class_name": str(label)}

    out = _begin_output(out_dir)
    specs = [
        write_split(samples(idx), out, split, samples_per_shard=samples_per_shard, image_format=ext)
        for split, idx in (("train", train_idx), ("val", val_idx))
    ]
    return _write_manifest(
        out,
        classes=[str(c) for c in range(10)],
        image_format=ext,
        specs=specs,
        source=DIGITS_SOURCE,
        settings=settings,
    )


# --------------------------------------------------------------------------
# ImageFolder trees
# --------------------------------------------------------------------------


def _imagefolder_settings(src_dir, val_fraction, seed, samples_per_shard, max_side, image_format) -> dict[str, Any]:
    return {
        "source": str(Path(src_dir).resolve()),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "max_side": None if max_side is None else int(max_side),
        "image_format": _normalize_format(image_format),
    }


def _find_classes(root: Path) -> list[str]:
    """Sorted names of non-hidden subdirectories: the class list, in index order."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _key_for(rel: Path, used: set[str]) -> str:
    """A dot-free, slash-free, unique key derived from the relative file path."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.with_suffix("").as_posix()).strip("_") or "img"
    if len(base) > _MAX_KEY_LEN:
        import hashlib

        digest = hashlib.sha1(rel.as_posix().encode("utf-8")).hexdigest()[:12]
        base = f"{base[: _MAX_KEY_LEN - 13]}_{digest}"
    key, n = base, 1
    while key in used:  # e.g. "a.png" and "a.jpg" in the same folder
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def write_imagefolder(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    image_format: str = "jpg",
) -> Path:
    """Shard ``src_dir/<class_name>/<images>``; returns the manifest path.

    Class indices follow sorted subdirectory names (the torchvision
    ImageFolder convention).  With ``val_fraction > 0`` each class is split
    separately with a seeded shuffle, so the split is stratified and stable.
    Train order is shuffled (seeded) so shards are class-mixed.  Files that
    PIL cannot open and fully decode are skipped with a warning and counted
    in the manifest's ``skipped_files``.
    """
    root = Path(src_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory not found: {root}")
    val_fraction = _check_fraction(val_fraction)
    settings = _imagefolder_settings(root, val_fraction, seed, samples_per_shard, max_side, image_format)
    ext = settings["image_format"]
    classes = _find_classes(root)
    if not classes:
        raise ValueError(f"no class subdirectories found in {root} (expected {root}/<class_name>/<images>)")

    used_keys: set[str] = set()
    train: list[tuple[str, Path, int, str]] = []
    val: list[tuple[str, Path, int, str]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            log.warning("class %r has no image files in %s", name, root / name)
            continue
        items = [(_key_for(p.relative_to(root), used_keys), p, label, name) for p in files]
        n_val = 0
        if val_fraction > 0:
            # Per-class RNG: adding a class does not reshuffle the others.
            random.Random(f"{seed}:{name}").shuffle(items)
            n_val = min(int(len(items) * val_fraction + 0.5), len(items) - 1)
        val.extend(sorted(items[:n_val], key=lambda t: t[1]))
        train.extend(items[n_val:])
    if not train:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    train.sort(key=lambda t: t[1])
    random.Random(seed).shuffle(train)

    skipped: list[str] = []

    def samples(items) -> Iterator[tuple[str, bytes, int, dict]]:
        for key, path, label, name in items:
            rel = path.relative_to(root).as_posix()
            try:
                raw = path.read_bytes()
                with Image.open(io.BytesIO(raw)) as im:
                    im.load()  # full decode: catches truncated files, not just bad headers
            except Exception as exc:  # PIL raises many types for bad files
                log.warning("skipping unreadable image %s: %s", path, exc)
                skipped.append(rel)
                continue
            yield key, raw, label, {"source": rel, "class_name": name}

    out = _begin_output(out_dir)
    specs = [
        write_split(
            samples(items), out, split,
            samples_per_shard=samples_per_shard, max_side=max_side, image_format=ext,
        )
        for split, items in (("train", train), ("val", val))
    ]
    if specs[0].num_samples == 0:
        raise ValueError(f"none of the image files under {root} could be read")
    if skipped:
        log.warning("skipped %d unreadable image file(s) under %s", len(skipped), root)
    return _write_manifest(
        out,
        classes=classes,
        image_format=ext,
        specs=specs,
        source=settings["source"],
        settings=settings,
        extra={"skipped_files": len(skipped)},
    )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _UsageError(Exception):
    """A bad command-line value; main() prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and sys.exit(2)
        raise _UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipeline shards",
        description=(
            "Write WebDataset tar shards plus manifest.json from the built-in digits "
            "demo set or from an ImageFolder tree (<dir>/<class_name>/<images>)."
        ),
    )
    p.add_argument("--source", default="digits",
                   help="'digits' (default: scikit-learn's 8x8 digits) or a path to an ImageFolder directory")
    p.add_argument("--out", default=None,
                   help="output directory (default: data/digits for digits; required for a directory source)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per tar shard (default: 200 for digits, 1000 otherwise)")
    p.add_argument("--max-side", type=int, default=None,
                   help="ImageFolder only: shrink images so the longer side is at most this (never enlarges)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of each class held out as 'val', in [0, 1) (default: 1/6 for digits, 0 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed for the train/val split and train order (default: 0)")
    p.add_argument("--image-size", type=int, default=None,
                   help="digits only: output image side in pixels (default: 32)")
    p.add_argument("--format", dest="image_format", choices=["png", "jpg"], default=None,
                   help="image encoding in the shards (default: png for digits, jpg otherwise)")
    p.add_argument("--force", action="store_true",
                   help="rewrite even if a complete manifest with the same settings exists")
    return p


def _is_up_to_date(out_dir: Path, settings: dict[str, Any]) -> bool:
    """True if a manifest with identical settings exists and all its shards are present."""
    try:
        manifest = read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return False
    if manifest.get("settings") != settings:
        return False
    return all((out_dir / s).is_file() for split in manifest["splits"].values() for s in split["shards"])


def _validated_settings(args: argparse.Namespace) -> tuple[str, Path, dict[str, Any]]:
    """Turn parsed args into (kind, out_dir, settings) or raise _UsageError naming the option."""
    is_digits = args.source == "digits"
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise _UsageError(f"--samples-per-shard must be an integer >= 1 (got {args.samples_per_shard})")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise _UsageError(f"--val-fraction must be in [0, 1) (got {args.val_fraction})")
    if args.max_side is not None and args.max_side < 1:
        raise _UsageError(f"--max-side must be an integer >= 1 (got {args.max_side})")
    if args.image_size is not None and args.image_size < 1:
        raise _UsageError(f"--image-size must be an integer >= 1 (got {args.image_size})")

    if is_digits:
        if args.max_side is not None:
            raise _UsageError("--max-side applies only to ImageFolder sources; use --image-size for digits")
        out = Path(args.out or "data/digits")
        settings = _digits_settings(
            1 / 6 if args.val_fraction is None else args.val_fraction,
            args.seed,
            200 if args.samples_per_shard is None else args.samples_per_shard,
            32 if args.image_size is None else args.image_size,
            args.image_format or "png",
        )
        return "digits", out, settings

    src = Path(args.source)
    if not src.is_dir():
        raise _UsageError(f"--source must be 'digits' or an existing ImageFolder directory (not found: {src})")
    if not _find_classes(src):
        raise _UsageError(f"--source {src}: no class subdirectories found (expected {src}/<class_name>/<images>)")
    if args.image_size is not None:
        raise _UsageError("--image-size applies only to --source digits; use --max-side for ImageFolder sources")
    if args.out is None:
        raise _UsageError("--out is required when --source is a directory")
    settings = _imagefolder_settings(
        src,
        0.0 if args.val_fraction is None else args.val_fraction,
        args.seed,
        1000 if args.samples_per_shard is None else args.samples_per_shard,
        args.max_side,
        args.image_format or "jpg",
    )
    return "imagefolder", Path(args.out), settings


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 2 on bad input."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        kind, out, settings = _validated_settings(args)
    except SystemExit as exc:  # --help: argparse printed it and wants to exit
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    manifest_path = out / MANIFEST_NAME
    if not args.force and _is_up_to_date(out, settings):
        print(f"up to date: {manifest_path} (use --force to rewrite)")
        return 0

    try:
        if kind == "digits":
            manifest_path = write_digits(
                out,
                val_fraction=settings["val_fraction"],
                seed=settings["seed"],
                samples_per_shard=settings["samples_per_shard"],
                image_size=settings["image_size"],
                image_format=settings["image_format"],
            )
        else:
            manifest_path = write_imagefolder(
                args.source,
                out,
                val_fraction=settings["val_fraction"],
                seed=settings["seed"],
                samples_per_shard=settings["samples_per_shard"],
                max_side=settings["max_side"],
                image_format=settings["image_format"],
            )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    manifest = read_manifest(manifest_path)
    for split, info in manifest["splits"].items():
        print(f"{split}: {len(info['shards'])} shards, {info['num_samples']} samples ({out / info['pattern']})")
    if manifest.get("skipped_files"):
        print(f"skipped {manifest['skipped_files']} unreadable image file(s)")
    print(f"manifest: {manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
