"""Supervised classification: timm's losses and Mixup/CutMix; evaluation is top-1/top-5 over the val shards."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.train.objectives.base import Evaluation, Objective, StepContext, all_sum


class Supervised(Objective):
    name = "supervised"
    needs_labels = True

    def __init__(self, config, num_classes: int):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        a = config.augment
        self.num_classes = num_classes
        self.mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=a.mixup,
                cutmix_alpha=a.cutmix,
                prob=a.mixup_prob,
                label_smoothing=a.label_smoothing,
                num_classes=num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        elif a.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(a.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def loss(self, module: nn.Module, images: Tensor, labels: Tensor, ctx: StepContext) -> Tensor:
        if self.mixup is not None:  # draws from NumPy's global RNG, which checkpoints restore per rank
            images, labels = self.mixup(images, labels)
        return self.criterion(module(images.to(ctx.dtype)).float(), labels)

    def evaluation(self, module: nn.Module, ctx: StepContext, img_size: int) -> Evaluation:
        return TopK(module, ctx, img_size, min(5, self.num_classes))


class TopK(Evaluation):
    """Top-1 / top-k accuracy, summed over the ranks' val shards (each val sample counted once)."""

    def __init__(self, module: nn.Module, ctx: StepContext, img_size: int, k: int):
        self.module, self.ctx, self.img_size, self.k = module, ctx, img_size, k
        self.correct1 = self.correctk = self.count = 0

    def add(self, images: Tensor, labels: Optional[Tensor]) -> None:
        logits = self.module(images.to(self.ctx.dtype)).float()
        hits = logits.topk(self.k, dim=1).indices.cpu() == labels.cpu().view(-1, 1)
        self.correct1 += hits[:, 0].sum().item()
        self.correctk += hits.any(dim=1).sum().item()
        self.count += labels.numel()

    def dummy(self) -> None:
        self.module(torch.zeros(1, 3, self.img_size, self.img_size, device=self.ctx.device, dtype=self.ctx.dtype))

    def result(self) -> dict[str, float]:
        c1, ck, n = all_sum([self.correct1, self.correctk, self.count], self.ctx.device)
        if n == 0:
            return {}
        return {"val_top1": 100.0 * c1 / n, f"val_top{self.k}": 100.0 * ck / n, "val_samples": n}
