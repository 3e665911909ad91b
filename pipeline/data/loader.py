"""The train and val loaders of one rank, built from the plan and the config."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader

from pipeline.data.plan import DataPlan, deal_shards, read_policy, usable_workers
from pipeline.data.stream import StreamSpec, make_loader
from pipeline.data.transforms import build_transforms


class RankData:
    """Train and val loaders for one rank, epoch by epoch."""

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

    def train_batches(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """Training batches from micro batch ``skip_batches`` of ``epoch`` on, running on through the later
        epochs: one loader, and one start-up of its workers, for the whole run (measured: a new loader per
        epoch cost ~0.2 s of waiting and discarded its prefetched batches at every epoch, ~6% of the demo).
        The caller must be done with a batch's images when it asks for the next (buffers are recycled)."""
        d = self.config.data
        workers = (
            d.num_workers if d.resampled else usable_workers(d.num_workers, len(self.plan.train_shards), self.world)
        )
        epoch_batches = self.plan.steps_per_epoch * self.config.optim.grad_accum_steps
        spec = StreamSpec(
            tuple(self.plan.train_shards),
            self.micro_batch,
            self.config.run.seed,
            epoch,
            self.rank,
            self.world,
            workers,
            True,
            d.shuffle_buffer,
            d.resampled,
            skip_batches,
            epoch_batches,
            recycle_buffers=d.prefetch_factor + 3,
            require_labels=self.require_labels,
            num_classes=self.num_classes,
            read=read_policy(d),
            shard_counts=self.plan.train_counts,
        )
        return make_loader(spec, self.train_transform, prefetch_factor=d.prefetch_factor, pin_memory=self.pin_memory)

    def val_batches(self) -> Optional[DataLoader]:
        """This rank's share of the val shards (possibly none), one pass, unshuffled."""
        mine = deal_shards(self.plan.val_shards, seed=0, epoch=0, rank=self.rank, world=self.world, shuffle=False)
        if not mine:
            return None
        d = self.config.data
        spec = StreamSpec(
            tuple(self.plan.val_shards),
            self.micro_batch,
            0,
            0,
            self.rank,
            self.world,
            min(d.num_workers, len(mine)),
            False,
            require_labels=self.require_labels,
            num_classes=self.num_classes,
            read=read_policy(d),
            shard_counts=self.plan.val_counts,
        )
        return make_loader(spec, self.eval_transform, prefetch_factor=d.prefetch_factor, pin_memory=self.pin_memory)
