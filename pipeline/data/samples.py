"""One tar sample -> (image, label): the naming rules of a WebDataset shard, and the skip counter."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")  # tar member suffixes read as the image, in this order


@dataclass
class Counter:
    """Samples dropped since the last batch, with the last reason (shipped inside each batch)."""

    skipped: int = 0
    last_error: str = ""

    def __call__(self, exc: Exception) -> bool:  # a webdataset handler: count and continue
        self.skipped += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        return True


UNLABELED = -1  # the label of a sample without .cls, where the objective needs none


def decode_sample(sample: dict, lazy: bool = False, require_label: bool = True) -> tuple[Image.Image, int]:
    """Raw tar sample -> (RGB image, class index). Raises on anything malformed.

    ``lazy``: return the image opened but not decoded, for transforms that decode it themselves at the
    size they need (pipeline/data/transforms.py); decoding errors then surface in the transform.
    ``require_label=False`` (self-supervised objectives): a sample without ``.cls`` gets ``UNLABELED``.
    """
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    if "cls" in sample:
        label = int(sample["cls"].decode().strip())
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


def seed_sample(seed: int) -> None:
    """Seed every RNG an augmentation may draw from: Python's (timm's crops), NumPy's (timm's RandAugment,
    mixup) and torch's CPU generator (torchvision's flips and jitter). Only the CPU generator: torch.manual_seed
    would also queue CUDA/MPS/XPU seeding, which cost ~0.1 ms per image here (docs/performance.md)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
