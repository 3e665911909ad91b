"""The two sources the shard writer knows: scikit-learn's digits (the embedded demo, no download) and an
ImageFolder tree ``root/<class_name>/<images>``. Each writes its splits with ``write_split`` and then the manifest.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.manifest import write_manifest
from pipeline.data.writer import ShardSpec, begin_output, normalize_format, write_split

log = logging.getLogger(__name__)

DIGITS_SOURCE = "sklearn.datasets.load_digits"
IMAGE_FILE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})  # ImageFolder files taken as images
_MAX_KEY_LEN = 80  # USTAR member names are limited to 100 bytes, ".json" included.


def _splits(specs: list[ShardSpec]) -> dict[str, dict]:
    return {s.split: s.to_manifest() for s in specs if s.num_samples > 0}


def _check_fraction(val_fraction: float) -> float:
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return val_fraction


# --------------------------------------------------------------------------
# digits demo set
# --------------------------------------------------------------------------


def _unlabeled_setting(unlabeled: bool) -> dict[str, Any]:
    """Only unlabelled output records it, so existing labelled manifests stay up to date."""
    return {"labeled": False} if unlabeled else {}


def _digits_settings(
    val_fraction, seed, samples_per_shard, image_size, image_format, unlabeled=False
) -> dict[str, Any]:
    return {
        "source": DIGITS_SOURCE,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "image_size": int(image_size),
        "image_format": normalize_format(image_format),
        **_unlabeled_setting(unlabeled),
    }


def write_digits(
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 1 / 6,
    seed: int = 0,
    samples_per_shard: int = 200,
    image_size: int = 32,
    image_format: str = "png",
    unlabeled: bool = False,
) -> Path:
    """Shard scikit-learn's digits (8x8, values 0..16) as image_size^2 grayscale.

    The split is stratified and seeded so every run gives the same train/val
    sets; train order is shuffled (seeded) so each shard mixes all classes.
    ``unlabeled=True`` writes the same images in the same splits without
    ``.cls``, so pretraining on its train split never sees a val image.
    Returns the manifest path.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    val_fraction = _check_fraction(val_fraction)
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    settings = _digits_settings(val_fraction, seed, samples_per_shard, image_size, image_format, unlabeled)
    ext = settings["image_format"]

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    indices = np.arange(len(labels))
    if val_fraction > 0:
        train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)
    else:
        train_idx, val_idx = indices, indices[:0]
    train_idx = np.random.default_rng(seed).permutation(np.sort(train_idx))
    val_idx = np.sort(val_idx)

    def samples(idx: Iterable[int]) -> Iterator[tuple[str, Image.Image, int, dict]]:
        for i in idx:
            i = int(i)
            img = Image.fromarray(images[i])  # 2-D uint8 -> mode "L"
            img = img.resize((image_size, image_size), Image.BICUBIC)
            label = None if unlabeled else int(labels[i])
            meta = {"source": DIGITS_SOURCE, "index": i, **({} if unlabeled else {"class_name": str(label)})}
            yield f"digits_{i:04d}", img, label, meta

    out = begin_output(out_dir)
    specs = [
        write_split(samples(idx), out, split, samples_per_shard=samples_per_shard, image_format=ext)
        for split, idx in (("train", train_idx), ("val", val_idx))
    ]
    return write_manifest(
        out,
        classes=None if unlabeled else [str(c) for c in range(10)],
        image_format=ext,
        splits=_splits(specs),
        source=DIGITS_SOURCE,
        settings=settings,
    )


# --------------------------------------------------------------------------
# ImageFolder trees
# --------------------------------------------------------------------------


def _imagefolder_settings(
    src_dir, val_fraction, seed, samples_per_shard, max_side, image_format, unlabeled=False
) -> dict[str, Any]:
    return {
        "source": str(Path(src_dir).resolve()),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "max_side": None if max_side is None else int(max_side),
        "image_format": normalize_format(image_format),
        **_unlabeled_setting(unlabeled),
    }


def _image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Sorted non-hidden image files in folder (and below it when recursive)."""
    return sorted(
        p
        for p in (folder.rglob("*") if recursive else folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_FILE_SUFFIXES and not p.name.startswith(".")
    )


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


def _split_imagefolder(root: Path, classes: list[str], val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) lists of (key, path, label, class name): stratified, seeded, train order shuffled. Without
    class folders: one unlabelled group (label None), the images directly in ``root``."""
    used_keys: set[str] = set()
    train: list[tuple[str, Path, int | None, str]] = []
    val: list[tuple[str, Path, int | None, str]] = []
    groups = [(i, name, root / name) for i, name in enumerate(classes)] or [(None, "", root)]
    for label, name, folder in groups:
        files = _image_files(folder, recursive=label is not None)
        if not files:
            if label is not None:
                log.warning("class %r has no image files in %s", name, folder)
            continue
        items = [(_key_for(p.relative_to(root), used_keys), p, label, name) for p in files]
        n_val = 0
        if val_fraction > 0:
            # Per-class RNG: adding a class does not reshuffle the others.
            random.Random(f"{seed}:{name}").shuffle(items)
            n_val = min(int(len(items) * val_fraction + 0.5), len(items) - 1)
        val.extend(sorted(items[:n_val], key=lambda t: t[1]))
        train.extend(items[n_val:])
    if not train and not classes:
        raise ValueError(
            f"no class subdirectories and no image files found in {root} (expected "
            f"{root}/<class_name>/<images>, or images directly in {root} for unlabelled shards)"
        )
    if not train:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_FILE_SUFFIXES))}) found under {root}")
    train.sort(key=lambda t: t[1])
    random.Random(seed).shuffle(train)
    return train, val


def _readable(root: Path, items, skipped: list[str]) -> Iterator[tuple[str, bytes, int, dict]]:
    """The files PIL fully decodes (a truncated file fails here, not in training); the others go to ``skipped``."""
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
        yield key, raw, label, {"source": rel} if label is None else {"source": rel, "class_name": name}


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
    ImageFolder convention).  A folder with no class subdirectories is
    unlabelled: its own image files are written without ``.cls`` and the
    manifest says ``labeled: false``.  With ``val_fraction > 0`` each class is split
    separately with a seeded shuffle, so the split is stratified and stable.
    Train order is shuffled (seeded) so shards are class-mixed.  Files that
    PIL cannot open and fully decode are skipped with a warning and counted
    in the manifest's ``skipped_files``.
    """
    root = Path(src_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory not found: {root}")
    val_fraction = _check_fraction(val_fraction)
    classes = _find_classes(root)
    settings = _imagefolder_settings(
        root, val_fraction, seed, samples_per_shard, max_side, image_format, unlabeled=not classes
    )
    ext = settings["image_format"]

    train, val = _split_imagefolder(root, classes, val_fraction, seed)
    skipped: list[str] = []
    out = begin_output(out_dir)
    specs = [
        write_split(
            _readable(root, items, skipped),
            out,
            split,
            samples_per_shard=samples_per_shard,
            max_side=max_side,
            image_format=ext,
        )
        for split, items in (("train", train), ("val", val))
    ]
    if specs[0].num_samples == 0:
        raise ValueError(f"none of the image files under {root} could be read")
    if skipped:
        log.warning("skipped %d unreadable image file(s) under %s", len(skipped), root)
    return write_manifest(
        out,
        classes=classes or None,
        image_format=ext,
        splits=_splits(specs),
        source=settings["source"],
        settings=settings,
        extra={"skipped_files": len(skipped)},
    )
