"""Masked-image modelling: MAE (timm ViT) and SimMIM (timm ViT and Swin), on unlabelled shards.

The objective wraps the timm model (its encoder) with a decoder (pipeline/model/mae.py, simmim.py); DeepSpeed
trains the wrapper. Masks are drawn from a generator that is a pure function of (seed, step, micro batch, rank),
so a resumed run draws the same masks. An evaluation measures what a person watching needs: the val
reconstruction loss, a DINO-style weighted k-NN top-1 on frozen encoder features of the val images (when they
have labels; leave-one-out over the val set, cosine similarity, ``objective.knn_k`` neighbours, gathered over
the ranks), and a picture of original / masked / reconstructed val images.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.train.objectives.base import Evaluation, Objective, StepContext, all_sum

DEFAULT_RATIO = {"mae": 0.75, "simmim": 0.6}


class MaskedImageModelling(Objective):
    needs_labels = False
    baseline_eval = True  # evaluate before the first step: what the k-NN gains over random features

    def __init__(self, config):
        self.config, self.o = config, config.objective
        self.name = self.o.name
        self.ratio = self.o.mask_ratio if self.o.mask_ratio is not None else DEFAULT_RATIO[self.name]

    def head_classes(self, num_classes: int) -> int:
        return 0  # the encoder alone: a classifier head would get no gradient

    def wrap(self, model: nn.Module) -> nn.Module:
        from pipeline.model.mae import MaskedAutoencoder
        from pipeline.model.simmim import SimMIM

        o = self.o
        if self.name == "mae":
            wrapper = MaskedAutoencoder(
                model,
                mask_ratio=self.ratio,
                decoder_dim=o.decoder_dim,
                decoder_depth=o.decoder_depth,
                decoder_heads=o.decoder_heads,
                norm_pix_loss=o.norm_pix_loss,
            )
        else:
            wrapper = SimMIM(model, mask_ratio=self.ratio, mask_patch_size=o.mask_patch_size or _mask_patch_size(model))
        if self.config.deepspeed.zero_stage == 3:  # the encoder's own forward never runs: gather its tokens
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for param in wrapper.external_parameters():
                register_external_parameter(wrapper, param)
        return wrapper

    def backbone(self, module: nn.Module) -> nn.Module:
        return module.encoder

    def backbone_state(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """``encoder.*`` under the timm model's names; the decoder's keys kept as they are, so that a fine-tune
        reports them as dropped."""
        prefix = "encoder."
        return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}

    def loss(self, module: nn.Module, images: Tensor, labels: Tensor, ctx: StepContext) -> Tensor:
        loss, _pred, _mask = module(images.to(ctx.dtype), generator=ctx.generator())
        return loss

    def evaluation(self, module: nn.Module, ctx: StepContext, img_size: int) -> Evaluation:
        return MimEvaluation(module, ctx, img_size, self.o, self.config)

    def forward_flops(self, module: nn.Module, img_size: int, in_chans: int) -> Optional[int]:
        """Encoder on the visible tokens plus the decoder, as trained (MFU counts the FLOPs actually done)."""
        from pipeline.tracking.telemetry import forward_flops_per_image

        return forward_flops_per_image(module, img_size, in_chans, generator=torch.Generator().manual_seed(0))


def _mask_patch_size(model: nn.Module) -> int:
    """SimMIM's 32 px blocks at 192 px, scaled to the input: a sixth of it, a multiple of the encoder's stride
    that divides the input (at least one stride)."""
    from pipeline.model.simmim import encoder_stride

    size, stride = int(model.patch_embed.img_size[0]), encoder_stride(model)
    for blocks in (6, 4, 8, 3, 2, 1):
        candidate = size // blocks
        if candidate >= stride and candidate % stride == 0 and size % candidate == 0:
            return candidate
    return stride


class MimEvaluation(Evaluation):
    """Reconstruction loss (a fixed mask per val batch), encoder features for the k-NN, the first images."""

    def __init__(self, module: nn.Module, ctx: StepContext, img_size: int, o, config):
        self.module, self.ctx, self.img_size, self.o, self.config = module, ctx, img_size, o, config
        self.loss_sum = self.count = 0.0
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.shown: list[tuple[Tensor, Tensor, Tensor]] = []
        self.batches = 0

    def _mim(self):
        return getattr(self.module, "module", self.module)  # the DeepSpeed engine's module, or the EMA copy

    def add(self, images: Tensor, labels: Optional[Tensor]) -> None:
        x = images.to(self.ctx.dtype)
        gen = torch.Generator().manual_seed(10_007 * self.ctx.rank + self.batches)  # the same val masks each eval
        self.batches += 1
        loss, pred, mask = self.module(x, generator=gen)
        self.loss_sum += float(loss) * len(images)
        self.count += len(images)
        if labels is not None and bool((labels >= 0).all()):
            self.features.append(self.module(x, features=True).float().cpu())
            self.labels.append(labels.cpu())
        if self.ctx.rank == 0 and len(self.shown) * len(images) < self.o.pictures and self.o.pictures:
            self.shown.append(tuple(t.float().cpu() for t in self._mim().reconstruct(x, pred, mask)))

    def dummy(self) -> None:
        x = torch.zeros(1, 3, self.img_size, self.img_size, device=self.ctx.device, dtype=self.ctx.dtype)
        self.module(x, generator=torch.Generator().manual_seed(0))
        self.module(x, features=True)

    def result(self) -> dict[str, float]:
        loss_sum, count = all_sum([self.loss_sum, self.count], self.ctx.device)
        if not count:
            return {}
        out = {"val_recon_loss": loss_sum / count, "val_samples": count}
        knn = self._knn()
        if knn is not None:
            out["val_knn_top1"] = knn
        return out

    def _knn(self) -> Optional[float]:
        """Leave-one-out weighted k-NN (DINO: cosine similarity, exp(sim / T) votes) over every rank's val
        features; computed on every rank (the same result), None without labels."""
        local = (
            torch.cat(self.features) if self.features else torch.empty(0, 0),
            torch.cat(self.labels) if self.labels else torch.empty(0, dtype=torch.long),
        )
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        feats = [f for f, _ in gathered if f.numel()]
        if not feats:
            return None
        x = nn.functional.normalize(torch.cat(feats), dim=1)
        y = torch.cat([lab for _, lab in gathered if lab.numel()])
        return knn_top1(x, y, self.o.knn_k, self.o.knn_temperature)

    def pictures(self) -> dict[str, Any]:
        if not self.shown:
            return {}
        return {"reconstruction": picture_grid(self.shown, self.o.pictures, self.config)}


def knn_top1(features: Tensor, labels: Tensor, k: int, temperature: float, chunk: int = 1024) -> float:
    """Leave-one-out k-NN top-1 (%) of L2-normalised features: each sample voted on by its k most similar
    others, weighted exp(similarity / temperature)."""
    n = len(labels)
    k = min(k, n - 1)
    if k < 1:
        return 0.0
    classes = int(labels.max()) + 1
    correct = 0
    for start in range(0, n, chunk):
        sim = features[start : start + chunk] @ features.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -float("inf")  # not itself
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(dim=1) == labels[start : start + chunk]).sum())
    return 100.0 * correct / n


def picture_grid(shown: list[tuple[Tensor, Tensor, Tensor]], limit: int, config) -> np.ndarray:
    """Rows: original, masked, reconstructed; one column per image; uint8 HxWx3, un-normalised."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    a = config.augment
    mean = torch.tensor(a.mean if a.mean is not None else IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(a.std if a.std is not None else IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    rows = []
    for which in range(3):
        images = torch.cat([s[which] for s in shown])[:limit]
        images = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        padded = nn.functional.pad(images, (1, 1, 1, 1), value=255)  # a white frame around each
        rows.append(torch.cat(list(padded), dim=2))  # side by side: (3, H + 2, n * (W + 2))
    grid = torch.cat(rows, dim=1)
    return grid.permute(1, 2, 0).numpy()
