"""Masked autoencoder (MAE, He et al. 2021) around a timm VisionTransformer.

The encoder is the timm model itself (no copy of its layers), so ``model.encoder.state_dict()`` loads
strictly into ``timm.create_model(<same name and kwargs>, num_classes=0)`` and, through
``pipeline.model.adapt.load_adapted``, into the fine-tuning model. It runs on the visible tokens only:
timm's own patch embedding and ``_pos_embed`` on all patches (an add, cheap), then the visible patch
tokens are gathered and the prefix (cls / register) tokens kept, then ``norm_pre``, the blocks and ``norm``.

The decoder is separate and light: timm ``Block``s over [visible tokens, mask tokens] in the original
order, with fixed 2D sin-cos (MAE's choice) or learned position embeddings, and a linear prediction of
each patch's pixels. The loss is the MSE on masked patches only.

State dict: ``encoder.*`` (the timm model's keys), ``mask_token``, ``decoder_*`` (``decoder_pos_embed``
only when learned; the fixed table is a non-persistent buffer, rebuilt on load).
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models import named_apply
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import Tensor, nn

from pipeline.model.masking import RandomMask, random_masking

__all__ = [
    "MaskedAutoencoder",
    "check_pretrain_encoder",
    "encoder_state_dict",
    "patchify",
    "unpatchify",
    "vit_features",
]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, h * w, p * p * C): row-major patches, each flattened as (p, p, C)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of ``patchify``: (B, h * w, p * p * C) -> (B, C, h * p, w * p)."""
    b = patches.shape[0]
    (gh, gw), p = grid, patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


def encoder_state_dict(state_dict: dict[str, Tensor], prefix: str = "encoder.") -> dict[str, Tensor]:
    """The timm model's weights out of a MAE / SimMIM state dict: ``encoder.*`` without the prefix.

    Fine-tuning must load this, not the full dict: ``adapt.load_adapted`` matches keys by name, so the
    full dict would match nothing and leave the model at its random init (every key "missing").
    """
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' keys: not a masked-image-modelling state dict")
    return out


def vit_features(encoder: nn.Module, images: Tensor, pool: str | None = None) -> Tensor:
    """Pooled encoder features on all tokens, no masking (k-NN / linear probes).

    ``pool``: "token" (cls), "avg" (mean of patch tokens), or None for the encoder's own ``global_pool``.
    Works for timm ViT and Swin (Swin has no cls token: "avg" only).
    """
    x = encoder.forward_features(images)
    if pool is None:
        return encoder.forward_head(x, pre_logits=True)
    if isinstance(encoder, VisionTransformer):
        return encoder.pool(x, pool_type=pool)
    if pool != "avg":
        raise ValueError(f"pool={pool!r}: {type(encoder).__name__} has no cls token, use 'avg'")
    return x.mean(dim=tuple(range(1, x.ndim - 1)))


def check_pretrain_encoder(encoder: nn.Module) -> None:
    """Refuse encoder parts that masked pretraining would leave without gradients.

    A classifier head, a pooled ``fc_norm`` (global_pool="avg") or an attention pool get no gradient from a
    reconstruction loss: DDP and DeepSpeed then see unused parameters, and an optimizer stepping flat buffers
    (ZeRO) still weight-decays them. Pretrain with ``num_classes=0`` (a ViT also with global_pool "token" or
    ""); the fine-tune model may use global_pool="avg" (its ``fc_norm`` is then freshly initialised and the
    pretrained ``norm`` dropped, as in MAE).
    """
    unused = sorted(
        {
            name.split(".")[0]
            for name, _ in encoder.named_parameters()
            if name.split(".")[0] in ("head", "fc_norm", "attn_pool")
        }
    )
    if unused:
        raise ValueError(
            f"encoder parts {unused} would get no gradient in masked pretraining: build it with "
            f"num_classes=0 (a ViT also with global_pool='token' or '')"
        )


class MaskedAutoencoder(nn.Module):
    """MAE: timm ViT encoder on visible tokens, light timm-Block decoder, MSE on masked patches."""

    def __init__(
        self,
        encoder: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        decoder_pos_embed: str = "sincos",
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"encoder must be a timm VisionTransformer, got {type(encoder).__name__}")
        if encoder.pos_embed is None or encoder.dynamic_img_size or not isinstance(encoder.patch_drop, nn.Identity):
            raise ValueError("MAE needs a fixed-size absolute pos_embed and no patch_drop (it masks itself)")
        if decoder_pos_embed not in ("sincos", "learned"):
            raise ValueError(f"decoder_pos_embed must be 'sincos' or 'learned', got {decoder_pos_embed!r}")
        check_pretrain_encoder(encoder)
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.num_prefix = int(encoder.num_prefix_tokens)
        num_patches = self.grid[0] * self.grid[1]

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, decoder_mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        table = torch.zeros(1, self.num_prefix + num_patches, decoder_dim)  # prefix tokens: zero position
        if decoder_pos_embed == "sincos":
            table[0, self.num_prefix :] = build_sincos2d_pos_embed(list(self.grid), dim=decoder_dim)
            self.register_buffer("decoder_pos_embed", table, persistent=False)
        else:
            self.decoder_pos_embed = nn.Parameter(trunc_normal_(table, std=0.02))
        trunc_normal_(self.mask_token, std=0.02)
        for name in ("decoder_embed", "decoder_blocks", "decoder_pred"):
            named_apply(init_weights_vit_timm, getattr(self, name))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names for timm's param_groups_weight_decay: the encoder's own plus the decoder's tokens."""
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {"mask_token", "decoder_pos_embed"}

    def external_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters used outside their owner's forward (cls / reg token, pos_embed).

        The encoder's own ``forward`` is never called, so ZeRO-3's per-module hooks never gather these.
        With ZeRO-3 register each: ``deepspeed.zero.register_external_parameter(model, p)``; stages 0-2
        keep every parameter whole on every rank and need nothing.
        """
        return [p for _, p in self.encoder.named_parameters(recurse=False)]

    def masking(self, batch: int, generator: torch.Generator, device=None) -> RandomMask:
        """This model's random mask for a batch (see masking.random_masking)."""
        return random_masking(batch, self.grid[0] * self.grid[1], self.mask_ratio, generator, device)

    def forward_encoder(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode the visible tokens: (B, prefix + K, C), timm's own layers throughout."""
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(images))  # timm's cls/reg tokens + pos_embed + pos_drop
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        x = torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        return enc.norm(x)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch's pixels: (B, N, p * p * C), from visible latents + mask tokens."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1).to(visible.dtype)
        tokens = torch.cat([visible, masked], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([prefix, tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix :])

    def targets(self, images: Tensor) -> Tensor:
        """Per-patch pixel targets; with norm_pix_loss each patch is normalised by its own mean / variance."""
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        return target

    def loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked patches of the per-patch MSE; visible patches do not count."""
        per_patch = (pred.float() - self.targets(images).float()).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        masking: RandomMask | None = None,
        features: bool = False,
    ):
        """(loss, pred (B, N, p*p*C), mask (B, N) 1 = masked); the mask comes from ``generator`` or ``masking``.
        ``features=True``: the encoder's features instead (through ``forward``, so ZeRO-3 gathers parameters)."""
        if features:  # mean-pooled: MAE's loss never trains the cls token (k-NN on digits: 65% vs 53% with it)
            return vit_features(self.encoder, images, "avg")
        if (generator is None) == (masking is None):
            raise ValueError("pass exactly one of generator (a fresh mask) or masking (a precomputed one)")
        if masking is None:
            masking = self.masking(images.shape[0], generator, images.device)
        latent = self.forward_encoder(images, masking.ids_keep)
        pred = self.forward_decoder(latent, masking.ids_restore)
        return self.loss(images, pred, masking.mask), pred, masking.mask

    @torch.no_grad()
    def reconstruct(self, images: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(original, masked, reconstructed) images for pictures, in the input's (normalised) pixel space.

        ``masked`` has masked patches zeroed; ``reconstructed`` pastes the predicted masked patches into the
        visible ones. With norm_pix_loss the predictions are un-normalised with each patch's true mean / std,
        as MAE's visualisation does (the model never predicts those statistics).
        """
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6).sqrt() + mean
        m = mask.unsqueeze(-1).to(target.dtype)
        masked = unpatchify(target * (1 - m), self.patch_size, self.grid, self.in_chans)
        recon = unpatchify(target * (1 - m) + pred.to(target.dtype) * m, self.patch_size, self.grid, self.in_chans)
        return images, masked, recon

    @torch.no_grad()
    def features(self, images: Tensor, pool: str | None = None) -> Tensor:
        """Encoder features on all tokens (no masking): cls ("token") or mean-pooled ("avg")."""
        return vit_features(self.encoder, images, pool)
