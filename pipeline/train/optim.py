"""Optimizer and learning-rate schedule: torch AdamW over timm's parameter groups, timm's warmup + cosine.

The schedule stays outside DeepSpeed because its value is a pure function of the step (exact on resume and on
any world size); the trainer steps it once per optimizer update.
"""

from __future__ import annotations

import torch

from pipeline.config import Config


def param_groups(model: torch.nn.Module, config: Config) -> list[dict]:
    """timm's grouping: no weight decay on norms/biases/pos-embeds; per-layer lr scale when layer_decay is set."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if config.optim.layer_decay is not None:
        return param_groups_layer_decay(
            model, config.optim.weight_decay, no_weight_decay_list=skip, layer_decay=config.optim.layer_decay
        )
    return param_groups_weight_decay(model, config.optim.weight_decay, no_weight_decay_list=skip)


def use_fused_adamw(config: Config, dev: torch.device) -> bool:
    """torch AdamW's fused kernel: on CUDA by default (one launch instead of one per tensor group); on CPU it
    measured no faster inside DeepSpeed here (docs/performance.md), so it is opt-in there (optim.fused)."""
    return config.optim.fused if config.optim.fused is not None else dev.type == "cuda"


def make_optimizer(model: torch.nn.Module, config: Config, dev: torch.device) -> torch.optim.AdamW:
    """torch AdamW over timm's groups (fused per ``use_fused_adamw``)."""
    return torch.optim.AdamW(
        param_groups(model, config),
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        fused=use_fused_adamw(config, dev) or None,
    )


def make_schedule(optimizer: torch.optim.Optimizer, config: Config, total_steps: int, warmup_steps: int):
    """timm's CosineLRScheduler with warmup, in optimizer steps (``step_update(step)``)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=config.optim.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=config.optim.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
