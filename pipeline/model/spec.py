"""The model section as timm's name and arguments, checked without importing timm: importing it (and with it
torch, torchvision and torch._dynamo) takes seconds, and the CLI checks a config before it launches anything
(measured with make bench-startup, docs/performance.md). timm's model names are cached per installed timm version."""

from __future__ import annotations

import fnmatch
import json
import os
from importlib import metadata
from pathlib import Path

from pipeline.config import ConfigError, ModelConfig
from pipeline.files import atomic_write


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
    """timm knows the name (the schema's own checks ran already) and the settings fit its architecture."""
    names = timm_model_names()
    if cfg.name.split(".", 1)[0] not in names:  # a ".tag" names pretrained weights of the architecture
        stem = cfg.name.split("_")[0]
        close = fnmatch.filter(sorted(names), f"{stem}*")[:8]
        raise ConfigError(
            f"model.name={cfg.name!r} is not a timm model; e.g. {', '.join(close) or 'vit_base_patch16_224'}"
        )
    model_kwargs(cfg, cfg.num_classes or 1)  # raises for settings of another architecture


def names_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vitpipe" / f"timm-{metadata.version('timm')}-models.json"


def timm_model_names() -> frozenset[str]:
    """Every architecture name timm registers: from the cache of this timm version, else from timm (once)."""
    path = names_cache()
    try:
        return frozenset(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    import timm

    names = sorted(timm.list_models())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(names))
    except OSError:  # a read-only home: the next check imports timm again
        pass
    return frozenset(names)
