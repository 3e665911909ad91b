"""SimMIM (Xie et al. 2021) around a timm VisionTransformer or SwinTransformer.

A learned mask token replaces the embeddings of masked patches right after timm's patch embedding (for a
ViT before ``_pos_embed`` adds cls token and positions, so masked tokens keep their position; timm's Swin
patch embedding is NHWC and already layer-normed). The encoder then runs on all tokens with its own
layers, in the order its ``forward_features`` uses in timm 1.0 (ViT: ``_pos_embed``, ``patch_drop``,
``norm_pre``, ``blocks``, ``norm``; Swin: ``layers``, ``norm``); the tests check that with nothing masked
the result equals ``forward_features`` exactly, which catches a timm version that changes it.

The head is SimMIM's: a 1x1 conv to stride^2 * C values per output position and a pixel shuffle back to
the input resolution, where stride is the encoder's output stride (ViT: the patch size; Swin: the patch
size x 2^(stages - 1)). Loss: L1 on masked pixels only, over (masked pixels x channels).

State dict: ``encoder.*`` (the timm model's keys), ``mask_token``, ``decoder.*``.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.model.mae import check_pretrain_encoder, vit_features
from pipeline.model.masking import block_mask, mask_to_pixels

__all__ = ["SimMIM", "encoder_stride"]


def encoder_stride(encoder: nn.Module) -> int:
    """Pixels per position of the encoder's last feature map."""
    patch = int(encoder.patch_embed.patch_size[0])
    if isinstance(encoder, SwinTransformer):
        return patch * 2 ** (len(encoder.layers) - 1)
    return patch


class SimMIM(nn.Module):
    """SimMIM: mask tokens after patch embedding, full encoder, 1x1 conv + pixel shuffle, masked L1."""

    def __init__(
        self, encoder: VisionTransformer | SwinTransformer, mask_ratio: float = 0.6, mask_patch_size: int = 32
    ):
        super().__init__()
        if not isinstance(encoder, (VisionTransformer, SwinTransformer)):
            raise TypeError(
                f"encoder must be a timm VisionTransformer or SwinTransformer, got {type(encoder).__name__}"
            )
        if getattr(encoder, "dynamic_img_size", False):
            raise ValueError("SimMIM needs a fixed input size (the mask covers the model's patch grid)")
        if isinstance(encoder, VisionTransformer) and not isinstance(encoder.patch_drop, nn.Identity):
            raise ValueError("SimMIM needs patch_drop off: every token, masked or not, is encoded")
        check_pretrain_encoder(encoder)
        self.encoder = encoder
        self.is_swin = isinstance(encoder, SwinTransformer)
        self.mask_ratio = float(mask_ratio)
        self.mask_patch_size = int(mask_patch_size)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.img_size = tuple(int(s) for s in encoder.patch_embed.img_size)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.stride = encoder_stride(encoder)
        block_mask(
            1, self.img_size, self.patch_size, self.mask_patch_size, self.mask_ratio, torch.Generator()
        )  # validates the sizes now rather than at the first step
        embed_dim = int(encoder.patch_embed.proj.out_channels)
        self.mask_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, embed_dim), std=0.02))
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * self.in_chans, kernel_size=1), nn.PixelShuffle(self.stride)
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names for timm's param_groups_weight_decay: the encoder's own plus the mask token."""
        inner = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in inner} | {"mask_token"}

    def external_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters used outside their owner's forward: register them for ZeRO-3 (see
        MaskedAutoencoder.external_parameters). ViT: cls token, pos_embed; Swin: none (only submodules run)."""
        return [p for _, p in self.encoder.named_parameters(recurse=False)]

    def masking(self, batch: int, generator: torch.Generator, device=None) -> Tensor:
        """This model's (B, h, w) block mask over the patch grid (see masking.block_mask)."""
        return block_mask(
            batch, self.img_size, self.patch_size, self.mask_patch_size, self.mask_ratio, generator, device
        )

    def forward_encoder(self, images: Tensor, mask: Tensor) -> Tensor:
        """(B, C, h, w) last feature map, masked patch embeddings replaced by the mask token."""
        enc = self.encoder
        x = enc.patch_embed(images)  # ViT: (B, N, C); Swin: (B, H, W, C)
        m = (mask.flatten(1) if x.ndim == 3 else mask).unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype).view((1,) * (x.ndim - 1) + (-1,)) * m
        if self.is_swin:
            return enc.norm(enc.layers(x)).permute(0, 3, 1, 2)
        x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))
        x = enc.norm(enc.blocks(x))[:, enc.num_prefix_tokens :]
        gh, gw = enc.patch_embed.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)

    def loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean absolute error over masked pixels and channels; unmasked pixels do not count."""
        pixels = mask_to_pixels(mask, self.patch_size).to(pred.dtype)
        l1 = (pred.float() - images.float()).abs() * pixels
        return l1.sum() / (pixels.sum() * self.in_chans + 1.0e-5)

    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        features: bool = False,
    ):
        """(loss, pred (B, C, H, W), mask (B, h, w) 1 = masked); the mask comes from ``generator`` or ``mask``.
        ``features=True``: the encoder's features instead (through ``forward``, so ZeRO-3 gathers parameters)."""
        if features:  # mean-pooled: MAE's loss never trains the cls token (k-NN on digits: 65% vs 53% with it)
            return vit_features(self.encoder, images, "avg")
        if (generator is None) == (mask is None):
            raise ValueError("pass exactly one of generator (a fresh mask) or mask (a precomputed one)")
        if mask is None:
            mask = self.masking(images.shape[0], generator, images.device)
        pred = self.decoder(self.forward_encoder(images, mask))
        return self.loss(images, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, images: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(original, masked (masked pixels zeroed), reconstructed (prediction pasted into the mask))."""
        pixels = mask_to_pixels(mask, self.patch_size).to(images.dtype)
        return images, images * (1 - pixels), images * (1 - pixels) + pred.to(images.dtype) * pixels

    @torch.no_grad()
    def features(self, images: Tensor, pool: str | None = None) -> Tensor:
        """Encoder features on all tokens (no mask token anywhere): the encoder's own pooling or "avg"."""
        return vit_features(self.encoder, images, pool)
