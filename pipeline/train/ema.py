"""EMA of the weights for the training loop (``optim.ema_decay``): timm's ModelEmaV3, in fp32 on the training
device, updated after every optimizer step, saved inside each checkpoint (so a resumed run continues it
exactly) and evaluated alongside the model as ``val_top1_ema``.

Every rank keeps its own copy and updates it from its full set of parameters; with ZeRO 0-2 those are the
same on every rank, so the copies stay identical. ZeRO-3 holds only a shard per rank, so EMA is refused
for it in the config (pipeline/config.py).
"""

from __future__ import annotations

from typing import Optional

import torch


def create_ema(model: torch.nn.Module, config, dev: torch.device):
    """A ModelEmaV3 of the model as it is now (before DeepSpeed wraps it), or None when disabled.
    fp32 whatever the training precision: a bf16 EMA loses updates below its resolution."""
    if config.optim.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=config.optim.ema_decay, use_warmup=config.optim.ema_warmup, dtype=torch.float32)
    ema.module.to(dev)  # same device as the model once DeepSpeed has moved it: foreach updates stay on
    ema.module.requires_grad_(False)
    return ema


def ema_state(ema) -> Optional[dict]:
    """For the checkpoint's client state (CPU tensors)."""
    return None if ema is None else {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}


def load_ema_state(ema, state: Optional[dict]) -> None:
    if ema is None:
        return
    if state is None:
        raise RuntimeError("optim.ema_decay is set but the checkpoint has no EMA weights to resume")
    ema.module.load_state_dict(state)
