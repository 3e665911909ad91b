"""timm ViT / Swin models by name, with architecture overrides from the model section (pipeline/model/spec.py)."""

from __future__ import annotations

import timm
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.model.spec import model_kwargs


def create_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """A randomly initialised timm model (weights never come from a hub: clusters are often offline)."""
    kwargs = model_kwargs(cfg, num_classes)
    try:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"model: timm could not build {cfg.name} with {kwargs}: {exc}") from None


def input_size(model: torch.nn.Module) -> int:
    """The square input side the built model expects."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        size = patch_embed.img_size[-1]
    return int(size)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
