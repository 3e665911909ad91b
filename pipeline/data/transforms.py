"""Faster forms of steps of timm's image transforms, swapped in where they compute the same thing (up to
rounding and resampling detail).

timm's ``create_transform`` stays the source of truth for *what* a run applies (crop, flip, jitter,
RandAugment, eval resize); ``accelerate`` only replaces steps whose faster form is equivalent. Each swap was
measured (docs/performance.md; ``make bench ARGS="data.torch_resize=false"`` gives the loader without one):

* The random resized crop (``FastRandomResizedCrop``) draws the same region from the same random numbers,
  then decodes at reduced size when the region is at least twice the output (Pillow's ``draft``: libjpeg's
  DCT scaling decodes at 1/2, 1/4 or 1/8 size, several times cheaper than decoding everything to throw most
  of it away in the resize) and resamples with torch's uint8 antialiased kernel (Pillow's filter, faster).
  Either can be switched off (``data.draft_decode``, ``data.torch_resize``); with both off the crop is
  timm's, bit for bit. On that torch path JPEGs are decoded straight into a NumPy array (simplejpeg, the
  same libjpeg-turbo and the same pixels as Pillow's decode, minus two copies).
* The final PIL -> tensor step is left out: the loader writes each image straight into its batch buffer
  (pipeline/data.py ``BatchBuilder``), which saves two copies of every batch.
"""

from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

# FastRandomResizedCrop only reads the (read-only) pixels of a decoded image through torch.from_numpy.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


def _jpeg_data(img: Image.Image) -> bytes | None:
    """The encoded bytes of a lazily opened, not yet decoded RGB or greyscale JPEG (the stream opens images on
    BytesIO). CMYK JPEGs are left to Pillow: simplejpeg decodes them, but not to Pillow's colours."""
    fp = getattr(img, "fp", None)
    if img.format == "JPEG" and img.mode in ("RGB", "L") and getattr(img, "tile", None) and isinstance(fp, io.BytesIO):
        return fp.getvalue()
    return None


def _draft(img: Image.Image, min_size: tuple[int, int] | None, min_short_side: int | None) -> None:
    """Pillow's draft (DCT scaling by 2, 4 or 8) when the image keeps at least ``min_size`` / ``min_short_side``:
    header work only; afterwards ``img.size`` is the size the decode will have."""
    if img.format == "JPEG" and getattr(img, "tile", None) and (min_size or min_short_side):
        width, height = img.size
        if min_size:
            reduce = min(width // max(1, min_size[0]), height // max(1, min_size[1]))
        else:
            reduce = min(width, height) // max(1, min_short_side)
        if reduce >= 2:
            img.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))


def load_rgb_array(
    img: Image.Image, min_size: tuple[int, int] | None = None, min_short_side: int | None = None
) -> np.ndarray:
    """Decode a lazily opened image to (H, W, 3) uint8, at a reduced size when allowed (see ``load_rgb``).

    JPEGs go through libjpeg-turbo straight into a NumPy array (simplejpeg), at the scale Pillow's ``draft``
    chose: the same pixels as Pillow's decode (tests/unit/test_transforms.py), without Pillow's image copy and
    its copy out to NumPy; measured 1.0-1.2 ms vs 1.7-2.1 ms per 256-500 px photo (docs/performance.md).
    CMYK JPEGs and anything simplejpeg refuses (a damaged file) are decoded by Pillow, which raises if it must.
    """
    full_width = img.size[0]
    data = _jpeg_data(img)
    _draft(img, min_size, min_short_side)
    if data is not None:
        import simplejpeg

        width, height = img.size
        try:
            return simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_factor=full_width / width, min_width=width, min_height=height
            )
        except ValueError:
            pass  # Pillow decides: it converts what libjpeg cannot and names what is broken
    return np.asarray(load_rgb(img))


def load_rgb(
    img: Image.Image, min_size: tuple[int, int] | None = None, min_short_side: int | None = None
) -> Image.Image:
    """Decode a lazily opened image, at a reduced size when allowed, and make it RGB.

    ``min_size`` (width, height) or ``min_short_side``: the decoded image may be reduced (by 2, 4 or 8) as
    long as it keeps at least this. Already decoded images and non-JPEGs are decoded at full size.
    """
    _draft(img, min_size, min_short_side)
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


# Below this many crop pixels Pillow's resize is the faster one (torch's per-call cost dominates): measured per
# crop on the 2-core VM, 54x54 -> 64: Pillow 87 us, torch 129 us; 81x81 -> 64: 149 vs 123 (docs/performance.md).
TORCH_RESIZE_MIN_PIXELS = 64 * 64


class FastRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation (same random draws, same crop region) on a lazily opened
    image, with two measured speed-ups (docs/performance.md):

    * ``draft``: decode at reduced size when the crop is at least twice the output (see ``load_rgb``);
    * on the torch path, JPEGs are decoded by libjpeg-turbo straight into NumPy (``load_rgb_array``: Pillow's
      pixels, without Pillow's two copies);
    * ``torch_resize``: resample crops of at least ``TORCH_RESIZE_MIN_PIXELS`` with torch's uint8 antialiased
      bilinear/bicubic kernel, the same filter as Pillow's (written to match it) and 2-4x faster on photos;
      pixels equal Pillow's up to rounding (1.5% of values differ, mean 0.02 levels). Smaller crops and other
      interpolation modes use Pillow.
    """

    def __init__(self, rrc, draft: bool = True, torch_resize: bool = True):
        self.rrc, self.draft, self.torch_resize = rrc, draft, torch_resize  # rrc: timm's instance

    def __call__(self, img: Image.Image) -> Image.Image:
        rrc = self.rrc
        full_width, full_height = img.size  # from the header: nothing decoded yet
        top, left, height, width = rrc.get_params(img, rrc.scale, rrc.ratio)
        interpolation = (
            random.choice(rrc.interpolation) if isinstance(rrc.interpolation, (tuple, list)) else rrc.interpolation
        )
        out_height, out_width = rrc.size
        # Reduce the whole image by r only if the crop keeps >= the output size in both directions.
        min_size = (math.ceil(full_width * out_width / width), math.ceil(full_height * out_height / height))
        mode = getattr(interpolation, "value", interpolation)
        use_torch = self.torch_resize and mode in ("bilinear", "bicubic")
        pixels = pil = None
        if use_torch and _jpeg_data(img) is not None:  # decoded straight to NumPy: torch resamples from it
            pixels = load_rgb_array(img, min_size if self.draft else None)
            decoded = (pixels.shape[1], pixels.shape[0])
        else:
            pil = load_rgb(img, min_size if self.draft else None)
            decoded = pil.size
        if decoded != (full_width, full_height):  # decoded at reduced size: the same region, scaled
            sx, sy = decoded[0] / full_width, decoded[1] / full_height
            top, left = round(top * sy), round(left * sx)
            height, width = max(1, round(height * sy)), max(1, round(width * sx))
        if not use_torch or height * width < TORCH_RESIZE_MIN_PIXELS:
            pil = pil if pil is not None else Image.fromarray(pixels)
            return F.resized_crop(pil, top, left, height, width, rrc.size, interpolation)
        hwc = pixels if pixels is not None else np.asarray(pil)
        pixels = torch.from_numpy(hwc).permute(2, 0, 1)[None]  # NCHW view of the HWC pixels
        # A dense channels-last crop takes torch's vectorised uint8 path, and the result is then HWC in memory
        # (no copy back to Pillow): 0.17 ms here against 0.37 ms from the strided crop and 0.66 ms in Pillow.
        crop = pixels[:, :, top : top + height, left : left + width].contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(
            crop, size=(out_height, out_width), mode=mode, antialias=True, align_corners=False
        )
        return Image.fromarray(out[0].permute(1, 2, 0).numpy())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rrc!r}, draft={self.draft}, torch_resize={self.torch_resize})"


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


def accelerate(compose: transforms.Compose, *, draft: bool = True, torch_resize: bool = True) -> WorkerTransform:
    """timm's composed transform -> the same steps, with the equivalent faster forms swapped in."""
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

    steps = list(compose.transforms)
    if steps and isinstance(steps[-1], MaybePILToTensor):
        steps = steps[:-1]  # the batch builder converts (and copies only once)
    out = []
    for index, step in enumerate(steps):
        if index == 0:  # the step that receives the undecoded image
            if type(step) is RandomResizedCropAndInterpolation and (draft or torch_resize):
                step = FastRandomResizedCrop(step, draft, torch_resize)
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


def build_transforms(config, img_size: int, training: bool):
    """timm's own train/eval transforms from the augment section, in timm's "prefetcher" form: images stay
    uint8, and normalisation (and random erasing) happen on the device (DeviceNormalize). Measured reason
    (docs/performance.md): less CPU per image in the workers and 4x fewer bytes between worker and trainer
    than float32 tensors. ``accelerate`` then swaps in a faster random resized crop (below)."""
    from timm.data import create_transform

    a = config.augment
    kwargs = dict(
        input_size=img_size,
        is_training=training,
        interpolation=a.interpolation,
        crop_pct=a.crop_pct,
        use_prefetcher=True,
    )
    if training:
        kwargs.update(
            scale=tuple(a.scale),
            ratio=tuple(a.ratio),
            hflip=a.hflip,
            vflip=a.vflip,
            color_jitter=a.color_jitter,
            auto_augment=a.auto_augment,
        )
    return accelerate(create_transform(**kwargs), draft=config.data.draft_decode, torch_resize=config.data.torch_resize)


class DeviceNormalize:
    """uint8 batch on the device -> normalised float batch (+ timm's RandomErasing when training)."""

    def __init__(self, config, dev: torch.device):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.data.random_erasing import RandomErasing

        a = config.augment
        mean = tuple(a.mean) if a.mean is not None else IMAGENET_DEFAULT_MEAN
        std = tuple(a.std) if a.std is not None else IMAGENET_DEFAULT_STD
        self.mean = torch.tensor([255 * m for m in mean], device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=dev).view(1, -1, 1, 1)
        self.erasing = RandomErasing(a.re_prob, mode="pixel", device=str(dev)) if a.re_prob > 0 else None
        self.memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        if training and self.erasing is not None:
            images = self.erasing(images)
        return images.contiguous(memory_format=self.memory_format)
