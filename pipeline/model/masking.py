"""Masks for masked-image-modelling pretraining (MAE, SimMIM), as pure functions of a torch.Generator.

Exact resume needs a training step's mask to be a pure function of (seed, step, micro step, rank):
``mask_generator`` derives that generator, and every function here draws only from the generator it is
given. Masks are drawn on the CPU and then moved to the requested device, so a run draws the same masks
on CPU and GPU, and with any number of data-loader workers.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RandomMask", "block_mask", "mask_generator", "mask_to_pixels", "num_visible", "random_masking"]


class RandomMask(NamedTuple):
    """Per-sample MAE masking; all tensors are (B, K) or (B, N) with N the number of patch tokens."""

    ids_keep: Tensor  # (B, K) long: indices of the visible tokens, in shuffle order
    mask: Tensor  # (B, N) float: 1 = masked, 0 = visible, in the original token order
    ids_restore: Tensor  # (B, N) long: argsort of the shuffle; gathers [visible, masked] back into order


def mask_generator(seed: int, step: int, micro_step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro_step, rank) by a stable hash.

    A hash (not seed + step) keeps neighbouring steps and ranks from sharing streams; blake2b is the same on
    every Python version and platform, unlike ``hash()``.
    """
    key = f"mim:{int(seed)}:{int(step)}:{int(micro_step)}:{int(rank)}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(value)
    return gen


def num_visible(num_tokens: int, ratio: float) -> int:
    """round(num_tokens * (1 - ratio)) (Python's round: halves to even), validated to be >= 1.

    MAE's own code truncates (int()); the two agree for its settings (196 tokens at 0.75 -> 49).
    """
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    keep = round(num_tokens * (1.0 - float(ratio)))
    if keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible token out of {num_tokens}")
    return keep


def random_masking(
    batch: int, num_tokens: int, ratio: float, generator: torch.Generator, device: torch.device | str | None = None
) -> RandomMask:
    """MAE's per-sample random masking: shuffle by uniform noise, keep the first round(N * (1 - ratio)).

    Every sample gets exactly the same number of visible tokens (so they stack into one tensor) and its own
    random subset. ``generator`` must be a CPU generator (see the module docstring).
    """
    keep = num_visible(num_tokens, ratio)
    noise = torch.rand(batch, num_tokens, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_tokens)
    mask.scatter_(1, ids_keep, 0.0)
    return RandomMask(ids_keep.to(device), mask.to(device), ids_restore.to(device))


def block_mask(
    batch: int,
    input_size: int | tuple[int, int],
    model_patch_size: int,
    mask_patch_size: int,
    ratio: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """SimMIM's mask: random square blocks of ``mask_patch_size`` pixels, on the model's patch grid.

    The image is cut into (H / mask_patch_size) x (W / mask_patch_size) blocks; exactly
    round(blocks * ratio) of them (at least one) are masked per sample. Returns a (B, H / model_patch_size,
    W / model_patch_size) float mask, 1 = masked, each block covering (mask_patch_size / model_patch_size)^2
    patches. SimMIM's 32 px blocks at 192 px with patch 4 are ``block_mask(B, 192, 4, 32, 0.6, gen)``.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    if mask_patch_size % model_patch_size:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} must be a multiple of the model patch size {model_patch_size}"
        )
    if h % mask_patch_size or w % mask_patch_size:
        raise ValueError(f"input size {(h, w)} must be a multiple of mask_patch_size {mask_patch_size}")
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    gh, gw = h // mask_patch_size, w // mask_patch_size
    num_masked = max(1, round(gh * gw * float(ratio)))
    order = torch.argsort(torch.rand(batch, gh * gw, generator=generator), dim=1)
    blocks = torch.zeros(batch, gh * gw)
    blocks.scatter_(1, order[:, :num_masked], 1.0)
    scale = mask_patch_size // model_patch_size
    mask = blocks.view(batch, gh, gw).repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return mask.to(device)


def mask_to_pixels(mask: Tensor, patch_size: int) -> Tensor:
    """(B, h, w) patch mask -> (B, 1, h * patch_size, w * patch_size) pixel mask (for losses and pictures)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be (B, h, w), got {tuple(mask.shape)}")
    return mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2).unsqueeze(1)
