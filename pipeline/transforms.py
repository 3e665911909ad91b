"""Faster forms of steps of timm's image transforms, swapped in where they compute the same thing.

timm's ``create_transform`` stays the source of truth for *what* a run applies (crop, flip, jitter,
RandAugment, eval resize); ``accelerate`` only replaces steps whose faster form is equivalent. Each swap was
measured (docs/performance.md; ``make bench ARGS="data.draft_decode=false"`` gives the loader without it):

* Reduced-size JPEG decoding (Pillow's ``draft``): the image arrives opened but not decoded. When the region
  about to be resized is at least twice the output size, libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8
  size, which is several times cheaper than decoding everything and throwing most of it away in the resize.
  The random crop is drawn from the full size first (same random numbers, same region); only the pixels the
  resize starts from differ, as with any downscale. Below 2x (most crops of ImageNet-sized photos at 224) it
  changes nothing: the crop and resize are timm's, bit for bit.
* The final PIL -> tensor step is left out: the loader writes each image straight into its batch buffer
  (pipeline/data.py ``BatchBuilder``), which saves two copies of every batch.
"""

from __future__ import annotations

import math
import random

from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

def load_rgb(img: Image.Image, min_size: tuple[int, int] | None = None, min_short_side: int | None = None
             ) -> Image.Image:
    """Decode a lazily opened image, at a reduced size when allowed, and make it RGB.

    ``min_size`` (width, height) or ``min_short_side``: the decoded image may be reduced (by 2, 4 or 8) as
    long as it keeps at least this. Already decoded images and non-JPEGs are decoded at full size.
    """
    if img.format == "JPEG" and getattr(img, "tile", None) and (min_size or min_short_side):
        width, height = img.size
        if min_size:
            reduce = min(width // max(1, min_size[0]), height // max(1, min_size[1]))
        else:
            reduce = min(width, height) // max(1, min_short_side)
        if reduce >= 2:
            img.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


class LoadImage:
    """First step for transforms that expect a decoded RGB image; the sizes as in ``load_rgb``."""

    def __init__(self, min_short_side: int | None = None):
        self.min_short_side = min_short_side

    def __call__(self, img: Image.Image) -> Image.Image:
        return load_rgb(img, min_short_side=self.min_short_side)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_short_side={self.min_short_side})"


class DraftRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation on a lazily opened image, decoding at reduced size when the
    drawn crop is at least twice the output. Draws its random numbers exactly as timm's does."""

    def __init__(self, rrc):
        self.rrc = rrc  # timm's instance: its size, scale, ratio, interpolation and get_params

    def __call__(self, img: Image.Image) -> Image.Image:
        rrc = self.rrc
        full_width, full_height = img.size  # from the header: nothing decoded yet
        top, left, height, width = rrc.get_params(img, rrc.scale, rrc.ratio)
        interpolation = (random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list))
                         else rrc.interpolation)
        out_height, out_width = rrc.size
        # Reduce the whole image by r only if the crop keeps >= the output size in both directions.
        min_size = (math.ceil(full_width * out_width / width), math.ceil(full_height * out_height / height))
        img = load_rgb(img, min_size)
        if img.size == (full_width, full_height):  # not reduced: exactly timm's crop-then-resize
            return F.resized_crop(img, top, left, height, width, rrc.size, interpolation)
        sx, sy = img.width / full_width, img.height / full_height
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        return img.resize((out_width, out_height), _pil_resample(interpolation), box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rrc!r})"


def _pil_resample(interpolation) -> int:
    from torchvision.transforms.functional import pil_modes_mapping

    return pil_modes_mapping[interpolation] if interpolation in pil_modes_mapping else interpolation


class WorkerTransform:
    """The steps a loader worker runs on one lazily opened image; returns a PIL image (or a tensor)."""

    lazy_decode = True  # the stream hands over opened, undecoded images (see load_rgb)

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img

    def __repr__(self) -> str:
        return "WorkerTransform(\n" + "".join(f"    {s!r}\n" for s in self.steps) + ")"


def accelerate(compose: transforms.Compose, *, draft: bool = True) -> WorkerTransform:
    """timm's composed transform -> the same steps, with the equivalent faster forms swapped in."""
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

    steps = list(compose.transforms)
    if steps and isinstance(steps[-1], MaybePILToTensor):
        steps = steps[:-1]  # the batch builder converts (and copies only once)
    out = []
    for index, step in enumerate(steps):
        if index == 0:  # the step that receives the undecoded image
            if type(step) is RandomResizedCropAndInterpolation and draft:
                step = DraftRandomResizedCrop(step)
            elif type(step) is transforms.Resize and draft and _shorter_side(step.size):
                out.append(LoadImage(min_short_side=_shorter_side(step.size)))
            else:
                out.append(LoadImage())
        out.append(step)
    if not out:
        out.append(LoadImage())
    return WorkerTransform(out)


def _shorter_side(size) -> int | None:
    """torchvision Resize's shorter-side target (an int or a 1-element list), else None."""
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return int(size[0])
    return None
