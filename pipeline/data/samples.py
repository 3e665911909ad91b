"""One tar sample -> (image, label), and the skip counter. (The naming rules of a shard: pipeline/data/tarscan.py.)"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data.tarscan import IMAGE_EXTENSIONS, LABEL_SUFFIX, image_suffix


@dataclass
class Counter:
    """Samples dropped since the last batch, with the last reason (shipped inside each batch)."""

    skipped: int = 0
    last_error: str = ""

    def __call__(self, exc: Exception) -> bool:  # a webdataset-style handler: count and continue
        self.skipped += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        return True

    def sample(self, sample: dict, exc: Exception) -> None:
        """A sample that cannot be used (no image, undecodable): counted, with where it was."""
        self.skipped += 1
        where = f"{sample.get('__url__')} {sample.get('__key__')}"
        self.last_error = f"{where}: {type(exc).__name__}: {exc}"[:400]

    def lost(self, url: str, why: str, samples: int) -> None:
        """A shard given up part-way (pipeline/data/reader.py): the samples it did not deliver."""
        self.skipped += samples
        self.last_error = f"{why} ({samples} sample(s) not read)"[:400]


class LabelError(ValueError):
    """A ``.cls`` that is not a class index of this run: refused (the run stops), never skipped, because a
    wrong label set silently trains a wrong model. The message names the shard and the sample."""


UNLABELED = -1  # the label of a sample without .cls, where the objective needs none


def decode_sample(
    sample: dict, lazy: bool = False, require_label: bool = True, num_classes: int = 0
) -> tuple[Image.Image, int]:
    """Raw tar sample -> (RGB image, class index). Raises on anything malformed.

    ``lazy``: return the image opened but not decoded, for transforms that decode it themselves at the
    size they need (pipeline/data/transforms.py); decoding errors then surface in the transform.
    ``require_label=False`` (self-supervised objectives): a sample without ``.cls`` gets ``UNLABELED``.
    ``num_classes``: a label outside 0..num_classes-1 (or not an integer) raises LabelError.
    """
    image_key = image_suffix(sample)
    if image_key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    if sample.get("__duplicate__"):
        raise ValueError(f"sample {sample.get('__key__')} has .{sample['__duplicate__']} twice")
    if LABEL_SUFFIX in sample:
        label = parse_label(sample, num_classes)
    elif require_label:
        raise ValueError(f"sample {sample.get('__key__')} has no .cls label")
    else:
        label = UNLABELED
    img = Image.open(io.BytesIO(sample[image_key]))
    if lazy:
        return img, label
    with img:
        img.load()  # force the decode here so truncated files fail now
        return img.convert("RGB"), label


def parse_label(sample: dict, num_classes: int = 0) -> int:
    text = sample[LABEL_SUFFIX].decode("utf-8", "replace").strip()
    where = f"shard {sample.get('__url__')}, sample {sample.get('__key__')}"
    try:
        label = int(text)
    except ValueError:
        raise LabelError(f"{where}: .cls {text[:40]!r} is not a class index (an integer)") from None
    if label < 0 or (num_classes and label >= num_classes):
        allowed = f"0..{num_classes - 1} (model.num_classes={num_classes})" if num_classes else ">= 0"
        raise LabelError(f"{where}: class index {label} is out of range; allowed: {allowed}")
    return label


def seed_sample(seed: int) -> None:
    """Seed every RNG an augmentation may draw from: Python's (timm's crops), NumPy's (timm's RandAugment,
    mixup) and torch's CPU generator (torchvision's flips and jitter). Only the CPU generator: torch.manual_seed
    would also queue CUDA/MPS/XPU seeding, which cost ~0.1 ms per image here (docs/performance.md)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
