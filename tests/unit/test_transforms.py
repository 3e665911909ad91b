"""Reduced-size JPEG decoding swapped into timm's transforms: same crops, same pixels where no reduction
applies, and a real reduction (with a close result) where the crop is much larger than the output."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data.batch import BatchBuilder
from pipeline.data.samples import decode_sample
from pipeline.data.transforms import (
    FastRandomResizedCrop,
    LoadImage,
    WorkerTransform,
    build_transforms,
    load_rgb,
    load_rgb_array,
)


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth-ish photo-like test image (gradients + a little noise) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(data: bytes) -> dict:
    return {"__key__": "k", "jpg": data, "cls": b"3"}


def _config(**augment):
    return load_config(None, ["model.img_size=64", *(f"augment.{k}={v}" for k, v in augment.items())])


@pytest.mark.parametrize("torch_resize", [False, True])
def test_train_crop_matches_timm_when_no_reduction_applies(torch_resize):
    """Sources around the output size, the same random draws: with Pillow's resize the result is timm's bit
    for bit; with torch's uint8 kernel (the same filter) it differs only by rounding."""
    ours = build_transforms(
        load_config(None, ["model.img_size=64", f"data.torch_resize={str(torch_resize).lower()}"]), 64, training=True
    )
    timm = build_transforms(
        load_config(None, ["model.img_size=64", "data.draft_decode=false", "data.torch_resize=false"]),
        64,
        training=True,
    )
    assert isinstance(ours, WorkerTransform) and isinstance(ours.steps[0], FastRandomResizedCrop)
    assert not isinstance(timm.steps[1], FastRandomResizedCrop)  # both off: timm's own step
    diffs = []
    for seed in range(20):
        data = _jpeg(90 + seed, 100)
        random.seed(seed), torch.manual_seed(seed)
        a = np.asarray(ours(decode_sample(_sample(data), lazy=True)[0])).astype(int)
        random.seed(seed), torch.manual_seed(seed)
        b = np.asarray(timm(decode_sample(_sample(data))[0])).astype(int)
        diffs.append(np.abs(a - b))
    if torch_resize:
        assert 0 < np.mean([d.mean() for d in diffs]) < 0.1 and np.mean([(d > 1).mean() for d in diffs]) < 0.01
    else:
        assert all(not d.any() for d in diffs)


def test_small_crops_are_resized_by_pillow_as_timm_does_bit_for_bit():
    """Crops under TORCH_RESIZE_MIN_PIXELS (digits: 32x32) take Pillow's resize, the faster one at that size."""
    from pipeline.data.transforms import TORCH_RESIZE_MIN_PIXELS

    ours = build_transforms(load_config(None, ["model.img_size=32"]), 32, training=True)
    timm = build_transforms(
        load_config(None, ["model.img_size=32", "data.draft_decode=false", "data.torch_resize=false"]), 32, True
    )
    assert 48 * 48 < TORCH_RESIZE_MIN_PIXELS
    for seed in range(10):
        data = _jpeg(48, 48)
        random.seed(seed), torch.manual_seed(seed)
        a = np.asarray(ours(decode_sample(_sample(data), lazy=True)[0]))
        random.seed(seed), torch.manual_seed(seed)
        b = np.asarray(timm(decode_sample(_sample(data))[0]))
        assert np.array_equal(a, b), seed


def test_large_sources_are_decoded_at_reduced_size_with_a_close_result():
    config = _config(scale="[0.9,1.0]", color_jitter="null", hflip=0.0)
    ours, full = (
        build_transforms(config, 64, True),
        build_transforms(
            load_config(
                None,
                [
                    "model.img_size=64",
                    "augment.scale=[0.9,1.0]",
                    "augment.color_jitter=null",
                    "augment.hflip=0.0",
                    "data.draft_decode=false",
                    "data.torch_resize=false",
                ],
            ),
            64,
            True,
        ),
    )
    data = _jpeg(800, 600)
    lazy = decode_sample(_sample(data), lazy=True)[0]
    assert lazy.size == (800, 600)
    random.seed(0)
    reduced = ours(lazy)
    assert lazy.size[0] <= 800 // 4, "a 720-800 px crop to 64 px decodes at 1/4 size or less"
    random.seed(0)
    reference = full(decode_sample(_sample(data))[0])
    assert reduced.size == reference.size == (64, 64)
    diff = np.abs(np.asarray(reduced, dtype=float) - np.asarray(reference, dtype=float))
    assert diff.mean() < 3.0, diff.mean()


def test_eval_resize_decodes_at_reduced_size_only_when_the_shorter_side_allows():
    eval_tf = build_transforms(_config(), 64, training=False)
    assert isinstance(eval_tf.steps[0], LoadImage) and eval_tf.steps[0].min_short_side == 73  # 64 / 0.875
    big = decode_sample(_sample(_jpeg(400, 300)), lazy=True)[0]
    assert np.asarray(eval_tf(big)).shape == (64, 64, 3)
    assert big.size == (100, 75), "shorter side 300 = 4.1 x 73: decoded at 1/4 (75 px, still >= 73)"
    small = decode_sample(_sample(_jpeg(120, 100)), lazy=True)[0]
    eval_tf(small)
    assert small.size == (120, 100)


def test_non_jpeg_and_grey_images_load_as_rgb_at_full_size():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((300, 300), dtype=np.uint8)).save(buf, format="PNG")
    img = load_rgb(Image.open(io.BytesIO(buf.getvalue())), min_size=(10, 10))
    assert img.mode == "RGB" and img.size == (300, 300)


@pytest.mark.parametrize(
    "mode, save",
    [
        ("RGB", {"quality": 90}),  # 4:2:0, the common case
        ("RGB", {"quality": 95, "subsampling": 0, "progressive": True}),  # 4:4:4, progressive
        ("L", {"quality": 90}),  # greyscale: replicated to three channels, as Pillow's convert does
        ("CMYK", {"quality": 90}),  # libjpeg cannot make RGB of it: Pillow's decode is used
    ],
)
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_jpegs_decode_to_pillows_pixels_at_full_and_reduced_size(mode, save, reduce):
    """load_rgb_array (libjpeg-turbo into NumPy) gives Pillow's pixels bit for bit, at the scale of Pillow's draft."""
    rgb = np.asarray(Image.open(io.BytesIO(_jpeg(333, 251))).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", **save)
    min_size = (333 // reduce, 251 // reduce) if reduce > 1 else None
    expected = np.asarray(load_rgb(Image.open(io.BytesIO(buf.getvalue())), min_size))
    lazy = Image.open(io.BytesIO(buf.getvalue()))
    got = load_rgb_array(lazy, min_size)
    assert got.shape == expected.shape == (-(-251 // reduce), -(-333 // reduce), 3)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_truncated_jpeg_fails_in_the_transform_so_the_stream_can_count_it():
    data = _jpeg(200, 200)[:300]
    transform = build_transforms(_config(), 64, training=True)
    with pytest.raises(OSError):
        transform(decode_sample(_sample(data), lazy=True)[0])
    with pytest.raises(OSError):  # the NumPy decode hands a damaged file to Pillow, which names it
        load_rgb_array(Image.open(io.BytesIO(data)))


def test_batch_builder_writes_images_as_chw_uint8_and_hands_over_partial_batches():
    builder = BatchBuilder(4, shared=False)
    for value in range(3):
        builder.add(Image.fromarray(np.full((5, 6, 3), value, dtype=np.uint8)), value)
    images, labels, _keys = builder.take()
    assert images.shape == (3, 3, 5, 6) and images.dtype == torch.uint8
    assert images[2].eq(2).all() and labels.tolist() == [0, 1, 2] and len(builder) == 0
    pixels = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    builder.add(Image.fromarray(pixels), 7)
    images, _labels, _keys = builder.take()
    assert images.is_contiguous(memory_format=torch.channels_last), "each image is one plain copy of its pixels"
    assert torch.equal(images[0], torch.from_numpy(pixels).permute(2, 0, 1))
