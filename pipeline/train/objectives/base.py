"""What a training run optimises, as a plug-in of the Trainer: the one loop calls these and nothing else that
depends on the objective (supervised classification today; masked-image modelling plugs in the same way).

An objective decides: which module DeepSpeed trains (the timm model itself, or the model plus a decoder), the
loss of one micro batch, what an evaluation measures (collectively over the ranks), what it adds to a checkpoint,
whether the data must carry labels, and how the trained module's weights map back to a plain timm model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StepContext:
    """Where a micro batch sits in the run. Randomness an objective draws per batch (masks) comes from
    ``generator()``: a pure function of (seed, step, micro, rank), so a resumed run draws the same masks."""

    step: int  # optimizer steps done before this one
    micro: int  # micro batch within the step (gradient accumulation)
    rank: int
    seed: int
    dtype: torch.dtype  # the compute dtype of the engine (inputs are cast to it)
    device: torch.device

    def generator(self) -> torch.Generator:
        """A CPU generator (masks are drawn on the CPU, so CPU and GPU runs draw the same ones)."""
        from pipeline.model.masking import mask_generator

        return mask_generator(self.seed, self.step, self.micro, self.rank)


class Evaluation:
    """One evaluation pass on one rank: ``add`` each val batch (or ``dummy`` when this rank has none left while
    another still has, so that ZeRO-3's parameter gathers stay matched), then ``result`` (a collective)."""

    def add(self, images: Tensor, labels: Optional[Tensor]) -> None:
        raise NotImplementedError

    def dummy(self) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError

    def pictures(self) -> dict[str, Any]:
        """Images for people (name -> HxWx3 uint8 array), from rank 0's first batches; none by default."""
        return {}


class Objective:
    name = "base"
    needs_labels = True  # the loader refuses samples without a label when set
    baseline_eval = False  # evaluate once before the first step too (a self-supervised run's starting point)

    def head_classes(self, num_classes: int) -> int:
        """The classifier width the timm model is built with (0: no head)."""
        return num_classes

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module DeepSpeed trains, built around the timm model."""
        return model

    def backbone(self, module: nn.Module) -> nn.Module:
        """The timm model inside the trained module (its state dict is a plain timm model's)."""
        return module

    def backbone_state(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """A trained module's full state dict -> the timm model's keys; other keys (a decoder) are kept under
        their names, so that fine-tuning reports them as dropped."""
        return state_dict

    def loss(self, module: nn.Module, images: Tensor, labels: Tensor, ctx: StepContext) -> Tensor:
        """The loss of one micro batch; ``images`` are normalised float on the device, not yet cast."""
        raise NotImplementedError

    def evaluation(self, module: nn.Module, ctx: StepContext, img_size: int) -> Evaluation:
        raise NotImplementedError

    def forward_flops(self, module: nn.Module, img_size: int, in_chans: int) -> Optional[int]:
        """FLOPs of one forward pass for one image as trained (for MFU); None when they cannot be counted."""
        from pipeline.tracking.telemetry import forward_flops_per_image

        return forward_flops_per_image(module, img_size, in_chans)

    def state_dict(self) -> dict[str, Any]:
        """What the objective adds to a checkpoint (its own state; randomness is derived, not stored)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over the ranks (float64: exact for counts)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
