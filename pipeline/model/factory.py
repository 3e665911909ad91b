"""timm ViT / Swin models by name, with architecture overrides from the model section."""

from __future__ import annotations

import timm
import torch

from pipeline.config import ConfigError, ModelConfig


def is_swin(name: str) -> bool:
    return name.startswith("swin")


def model_kwargs(cfg: ModelConfig, num_classes: int) -> dict:
    """The timm.create_model arguments the config sets (unset fields keep the architecture's default)."""
    kwargs: dict = {
        "num_classes": num_classes,
        "in_chans": cfg.in_chans,
        "drop_rate": cfg.drop_rate,
        "drop_path_rate": cfg.drop_path_rate,
    }
    for key in ("img_size", "patch_size", "window_size", "embed_dim", "num_heads"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    if cfg.depth is not None:  # Swin calls it depths (one per stage)
        kwargs["depths" if is_swin(cfg.name) else "depth"] = (
            tuple(cfg.depth) if isinstance(cfg.depth, (list, tuple)) else cfg.depth
        )
    if cfg.window_size is not None and not is_swin(cfg.name):
        raise ConfigError(f"model.window_size is a Swin setting; {cfg.name} has no windows")
    kwargs.update(cfg.kwargs)
    return kwargs


def check_model(cfg: ModelConfig) -> None:
    """timm knows the name (the schema's own checks ran already, before timm was imported)."""
    if not timm.is_model(cfg.name):
        stem = cfg.name.split("_")[0]
        close = timm.list_models(f"{stem}*")[:8]
        raise ConfigError(
            f"model.name={cfg.name!r} is not a timm model; e.g. {', '.join(close) or 'vit_base_patch16_224'}"
        )
    model_kwargs(cfg, cfg.num_classes or 1)  # raises for settings of another architecture


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
