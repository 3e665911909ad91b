"""The train and val loaders of one rank, built from the plan and the config.

Training: the loader's workers each deliver one part per optimizer step (their streams' samples, see
pipeline/data/stream.py); here the parts of a step are put in canonical stream order (a copy only with more than
one worker) and split into the step's ``grad_accum_steps`` micro batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils.data import DataLoader

from pipeline.data.plan import DataPlan, deal_shards, read_policy, usable_workers
from pipeline.data.stream import Batch, StreamSpec, make_loader
from pipeline.data.transforms import build_transforms


class RankData:
    """Train and val loaders for one rank."""

    def __init__(
        self,
        config,
        plan: DataPlan,
        rank: int,
        world: int,
        img_size: int,
        pin_memory: bool,
        require_labels: bool = True,
    ):
        self.config, self.plan, self.rank, self.world = config, plan, rank, world
        self.require_labels = require_labels
        self.micro_batch = config.micro_batch_size(world)
        self.train_transform = build_transforms(config, img_size, training=True)
        self.eval_transform = build_transforms(config, img_size, training=False)
        self.pin_memory = pin_memory
        self.num_classes = config.model.num_classes or plan.num_classes or 0  # labels at or above are refused

    def train_spec(self, start_step: int) -> StreamSpec:
        d, plan = self.config.data, self.plan
        return StreamSpec(
            tuple(plan.train_shards),
            self.config.run.seed,
            self.rank,
            self.world,
            usable_workers(d.num_workers, plan.streams, self.world),
            True,
            streams=plan.streams,
            chunk=d.batch_size // plan.streams,
            epoch_steps=plan.steps_per_epoch,
            start_step=start_step,
            shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled,
            recycle_buffers=d.prefetch_factor + 3,
            require_labels=self.require_labels,
            num_classes=self.num_classes,
            read=read_policy(d),
            shard_counts=self.plan.train_counts,
            keep_keys=plan.subset,
        )

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Micro batches from optimizer step ``start_step`` on, running through the epochs: one loader, and one
        start-up of its workers, for the whole run. The caller must be done with a batch's images when it asks
        for the next (buffers are recycled)."""
        spec = self.train_spec(start_step)
        loader = make_loader(
            spec, self.train_transform, prefetch_factor=self.config.data.prefetch_factor, pin_memory=self.pin_memory
        )
        parts = iter(loader)
        workers = max(1, spec.workers)
        out = None
        while True:
            step_parts = [next(parts) for _ in range(workers)]  # the loader serves its workers in turn
            batch, out = assemble(step_parts, spec.chunk, out, self.pin_memory)
            yield from split(batch, self.config.optim.grad_accum_steps)

    def val_batches(self) -> Optional[DataLoader]:
        """This rank's share of the val shards (possibly none), one pass, unshuffled."""
        mine = deal_shards(self.plan.val_shards, seed=0, epoch=0, rank=self.rank, world=self.world, shuffle=False)
        if not mine:
            return None
        d = self.config.data
        spec = StreamSpec(
            tuple(self.plan.val_shards),
            0,
            self.rank,
            self.world,
            min(d.num_workers, len(mine)),
            False,
            batch_size=self.micro_batch,
            require_labels=self.require_labels,
            num_classes=self.num_classes,
            read=read_policy(d),
            shard_counts=self.plan.val_counts,
        )
        return make_loader(spec, self.eval_transform, prefetch_factor=d.prefetch_factor, pin_memory=self.pin_memory)


def assemble(parts: list[Batch], chunk: int, out: Optional[torch.Tensor], pin: bool) -> tuple[Batch, torch.Tensor]:
    """One step's parts -> the rank's batch, its samples in canonical stream order (so the micro batches are the
    same whatever the worker count). One part is already in order: no copy. ``out``: a buffer to reuse."""
    steps = {p.step for p in parts}
    if len(steps) != 1:
        raise RuntimeError(f"loader parts of different steps arrived together: {sorted(steps)}")
    skipped, error = sum(p.skipped for p in parts), next((p.error for p in reversed(parts) if p.error), "")
    if len(parts) == 1:
        p = parts[0]
        return Batch(p.images, p.labels, skipped, error, p.keys, p.step), out
    pieces = []  # (stream, images, labels, keys) of each stream's share
    for p in parts:
        start = 0
        for stream, count in p.counts:
            pieces.append(
                (
                    stream,
                    p.images[start : start + count],
                    p.labels[start : start + count],
                    p.keys[start : start + count],
                )
            )
            start += count
    pieces.sort(key=lambda piece: piece[0])
    total = sum(len(piece[2]) for piece in pieces)
    sample_shape = max((piece[1].shape[1:] for piece in pieces if len(piece[2])), default=(3, 1, 1))
    first = parts[0].images
    channels_last = first.ndim == 4 and first.is_contiguous(memory_format=torch.channels_last)  # as the workers wrote
    if (
        out is None
        or out.shape[1:] != sample_shape
        or out.shape[0] < total
        or out.is_contiguous(memory_format=torch.channels_last) != channels_last
    ):
        out = _batch_buffer(total, tuple(sample_shape), first.dtype, pin, channels_last)
    images = out[:total]
    if total:
        torch.cat([piece[1] for piece in pieces if len(piece[2])], out=images)
    labels = torch.cat([piece[2] for piece in pieces])
    keys = [k for piece in pieces for k in piece[3]]
    return Batch(images, labels, skipped, error, keys, parts[0].step), out


def _batch_buffer(total: int, sample_shape: tuple, dtype: torch.dtype, pin: bool, channels_last: bool) -> torch.Tensor:
    """(total, C, H, W) in the workers' memory layout, so that gathering the parts is a plain copy."""
    if channels_last and len(sample_shape) == 3:
        c, h, w = sample_shape
        return torch.empty((total, h, w, c), dtype=dtype, pin_memory=pin).permute(0, 3, 1, 2)
    return torch.empty((total, *sample_shape), dtype=dtype, pin_memory=pin)


def split(batch: Batch, micro_batches: int) -> Iterator[Batch]:
    """The step's micro batches (views); drops are reported with the first."""
    images = torch.tensor_split(batch.images, micro_batches)
    labels = torch.tensor_split(batch.labels, micro_batches)
    start = 0
    for i, (imgs, labs) in enumerate(zip(images, labels)):
        keys = batch.keys[start : start + len(labs)]
        start += len(labs)
        yield Batch(imgs, labs, batch.skipped if i == 0 else 0, batch.error if i == 0 else "", keys, batch.step)
