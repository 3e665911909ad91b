"""Streaming WebDataset loader: shards split across ranks and loader workers, resumable mid-epoch.

How an epoch is laid out, and why:

* Shards are shuffled by ``(seed, epoch)`` and dealt out ``rank::world`` and then ``worker::workers``.
  One pass over that split is disjoint and complete (tested).
* Training needs the *same number of steps on every rank*, whatever the shard sizes, or the job hangs in
  a collective at epoch end. Every rank therefore takes exactly ``steps_per_epoch`` micro batches per
  epoch (from the manifest's sample count), and a worker that runs out of shards starts another pass
  (re-dealt with a new seed). A rank with fewer samples sees a few twice; none ever waits for another.
* Everything random is a function of ``(seed, epoch, rank, worker, position)``: shard order, the shuffle
  buffer and each sample's augmentation (the RNGs are re-seeded per sample). A resumed run rebuilds the
  epoch and skips the batches it already trained on *before decoding*, so it continues bit-identically.
* Undecodable samples and unreadable tar members are skipped and counted; the count travels with each
  batch to the trainer, which reports it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")


class DataError(ValueError):
    """The data cannot serve this job as configured; the message says what to change."""


# ----------------------------------------------------------------------------------------------------
# Shard lists and the manifest


def expand_shards(pattern: str, key: str = "data.train_shards") -> list[str]:
    """Brace/``::`` pattern -> shard URLs; local files must exist (remote ``pipe:``/URLs pass through)."""
    urls = expand_urls(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{key}: shard {missing[0]} not found{more}; build shards with 'make shards' "
                        f"or point {key} at existing .tar files")
    if not urls:
        raise DataError(f"{key}={pattern!r} matches no shards")
    return urls


def find_manifest(shards: list[str], explicit: Optional[str] = None) -> Optional[dict]:
    """The shard writer's manifest (class names, sample counts), if there is one next to the shards."""
    path = Path(explicit) if explicit else Path(shards[0]).parent / "manifest.json"
    if "://" in str(path) or not path.is_file():
        if explicit:
            raise DataError(f"data.manifest: {explicit} not found")
        return None
    return json.loads(path.read_text())


def count_in_manifest(manifest: dict, shards: list[str]) -> Optional[int]:
    """Samples in these shards according to the manifest (None when a shard is not listed)."""
    counts: dict[str, int] = {}
    for split in manifest.get("splits", {}).values():
        counts.update(zip(split.get("shards", []), split.get("counts", [])))
    names = [os.path.basename(s) for s in shards]
    if not all(n in counts for n in names):
        return None
    return sum(counts[n] for n in names)


# ----------------------------------------------------------------------------------------------------
# Deterministic randomness


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() is salted per process, so not that)."""
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF


def deal_shards(shards: list[str], *, seed: int, epoch: int, rank: int, world: int,
                shuffle: bool = True, cycle: int = 0) -> list[str]:
    """This rank's shards for one pass: shuffled by (seed, epoch, cycle), then every world-th."""
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, epoch, cycle)).shuffle(order)
    return order[rank::world]


def usable_workers(num_workers: int, shards: int, world: int) -> int:
    """Workers that each get at least one shard on every rank (an empty worker would spin or hang)."""
    return max(1, min(num_workers, shards // world)) if num_workers > 0 else 0


# ----------------------------------------------------------------------------------------------------
# Sample decoding


@dataclass
class Counter:
    """Samples dropped since the last batch, with the last reason (shipped inside each batch)."""

    skipped: int = 0
    last_error: str = ""

    def __call__(self, exc: Exception) -> bool:  # a webdataset handler: count and continue
        self.skipped += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        return True


def decode_sample(sample: dict) -> tuple[Image.Image, int]:
    """Raw tar sample -> (RGB image, class index). Raises on anything malformed."""
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    if "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no .cls label")
    with Image.open(io.BytesIO(sample[image_key])) as img:
        img.load()  # force the decode here so truncated files fail now
        rgb = img.convert("RGB")
    return rgb, int(sample["cls"].decode().strip())


# ----------------------------------------------------------------------------------------------------
# The per-worker streams


@dataclass(frozen=True)
class StreamSpec:
    """Everything a loader worker needs; plain data so it pickles into worker processes."""

    shards: tuple[str, ...]
    batch_size: int  # micro batch per rank
    seed: int
    epoch: int
    rank: int
    world: int
    workers: int  # usable workers (0: in the main process)
    training: bool
    shuffle_buffer: int = 1000
    resampled: bool = False
    skip_batches: int = 0  # micro batches of this epoch already consumed on this rank (resume)


class ShardStream(IterableDataset):
    """Batches for one rank and one epoch. Training: endless (the trainer stops it); eval: one pass."""

    def __init__(self, spec: StreamSpec, transform: Callable[[Image.Image], torch.Tensor]):
        self.spec = spec
        self.transform = transform

    # -- shard order -------------------------------------------------------------------------------
    def _shard_urls(self, worker: int, workers: int) -> Iterator[str]:
        s = self.spec
        if s.resampled:  # with replacement, independently per worker: any shard count works
            rng = random.Random(derive_seed(s.seed, s.epoch, s.rank, worker, -1))
            while True:
                yield rng.choice(s.shards)
        cycle = 0
        while True:
            mine = deal_shards(list(s.shards), seed=s.seed, epoch=s.epoch, rank=s.rank, world=s.world,
                               shuffle=s.training, cycle=cycle)[worker::workers]
            yield from mine
            if not s.training:
                return
            cycle += 1

    # -- samples -----------------------------------------------------------------------------------
    def _shuffled(self, samples: Iterator[dict], worker: int) -> Iterator[dict]:
        """Reservoir-style shuffle buffer with its own seeded RNG (training only)."""
        s = self.spec
        if not s.training or s.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(derive_seed(s.seed, s.epoch, s.rank, worker, -2))
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < s.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        s = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        counter = Counter()
        urls = ({"url": url} for url in self._shard_urls(worker, workers))
        raw = self._shuffled(iter(tarfile_samples(urls, handler=counter)), worker)
        # The DataLoader takes batches from its workers round-robin, so of the first k batches, worker w
        # made len(range(w, k, workers)). Skip that many batches' worth of raw samples, undecoded.
        skip = len(range(worker, s.skip_batches, workers)) * s.batch_size
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for index, sample in enumerate(raw):
            if index < skip:
                continue
            try:
                image, label = decode_sample(sample)
                # Per-sample seeding makes augmentation independent of what came before: exact resume.
                sample_seed = derive_seed(s.seed, s.epoch, s.rank, worker, index)
                random.seed(sample_seed)
                torch.manual_seed(sample_seed)
                images.append(self.transform(image))
                labels.append(label)
            except Exception as exc:  # malformed sample: count it, keep going
                counter(exc)
                continue
            if len(images) == s.batch_size:
                yield torch.stack(images), torch.tensor(labels), counter.skipped, counter.last_error
                images, labels, counter.skipped = [], [], 0
        if images and not s.training:  # the last, partial eval batch
            yield torch.stack(images), torch.tensor(labels), counter.skipped, counter.last_error
        elif counter.skipped and not s.training:  # report drops even without a final batch
            yield torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long), counter.skipped, counter.last_error


def make_loader(spec: StreamSpec, transform, *, prefetch_factor: int = 4, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream; batch_size=None because the workers batch."""
    kwargs = dict(prefetch_factor=prefetch_factor, worker_init_fn=_quiet_stop_signals) if spec.workers > 0 else {}
    # Its own generator: otherwise creating the loader draws from the global torch RNG, and a resumed run
    # (which creates it at a different point) would continue with different dropout/mixup randomness.
    return DataLoader(ShardStream(spec, transform), batch_size=None, num_workers=spec.workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(spec.seed), **kwargs)


def _quiet_stop_signals(_worker_id: int) -> None:
    """Slurm signals every process of a task. A loader worker killed by SIGTERM (torch's default) makes
    torch raise in the rank's main process, from its SIGCHLD handler, wherever it is: in the middle of the
    checkpoint the same signal asked for. So a worker exits quietly (status 0, which torch does not treat
    as a failure) on SIGTERM, also what it gets when its loader shuts down, and ignores USR2; the main
    process decides when to stop."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------
# What the trainer uses


@dataclass
class DataPlan:
    """The resolved facts about the data for a run: shards, counts, classes, steps per epoch."""

    train_shards: list[str]
    val_shards: list[str]
    train_samples: int
    val_samples: Optional[int]
    classes: Optional[list[str]]
    steps_per_epoch: int


def plan_data(config, world_size: int) -> DataPlan:
    """Check the shards against the job before it starts (missing files, too few shards, counts)."""
    d = config.data
    train = expand_shards(d.train_shards, "data.train_shards")
    val = expand_shards(d.val_shards, "data.val_shards") if d.val_shards else []
    manifest = find_manifest(train, d.manifest)
    train_samples = d.train_samples or (manifest and count_in_manifest(manifest, train))
    if not train_samples and not d.samples_per_epoch:
        raise DataError("data.train_samples is unknown: no manifest.json lists these shards; set "
                        "data.train_samples (samples in one pass) or data.resampled=true with data.samples_per_epoch")
    if not d.resampled and len(train) < world_size:
        raise DataError(f"data.train_shards: {len(train)} shard(s) for {world_size} ranks; every rank needs at "
                        f"least one. Write more, smaller shards (make shards ARGS='--samples-per-shard N') "
                        f"or set data.resampled=true with data.samples_per_epoch")
    per_epoch = d.samples_per_epoch or train_samples
    steps = per_epoch // d.batch_size
    if steps < 1:
        raise DataError(f"data.batch_size={d.batch_size} is larger than an epoch ({per_epoch} samples)")
    val_samples = manifest and val and count_in_manifest(manifest, val) or None
    classes = manifest.get("classes") if manifest else None
    return DataPlan(train, val, int(train_samples or per_epoch), val_samples, classes, steps)


def build_transforms(config, img_size: int, training: bool):
    """timm's own train/eval transforms from the augment section, in timm's "prefetcher" form: they end in
    uint8 CHW tensors, and normalisation (and random erasing) happen on the device (DeviceNormalize).
    Measured reason (docs/performance.md): less CPU per image in the workers and 4x fewer bytes between
    worker and trainer than float32 tensors."""
    from timm.data import create_transform

    a = config.augment
    kwargs = dict(input_size=img_size, is_training=training, interpolation=a.interpolation,
                  crop_pct=a.crop_pct, use_prefetcher=True)
    if training:
        kwargs.update(scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip, vflip=a.vflip,
                      color_jitter=a.color_jitter, auto_augment=a.auto_augment)
    return create_transform(**kwargs)


class DeviceNormalize:
    """uint8 batch on the device -> normalised float batch (+ timm's RandomErasing when training)."""

    def __init__(self, config, dev: torch.device):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.data.random_erasing import RandomErasing

        a = config.augment
        mean = tuple(a.mean) if a.mean is not None else IMAGENET_DEFAULT_MEAN
        std = tuple(a.std) if a.std is not None else IMAGENET_DEFAULT_STD
        self.mean = torch.tensor([255 * m for m in mean], device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=dev).view(1, -1, 1, 1)
        self.erasing = RandomErasing(a.re_prob, mode="pixel", device=str(dev)) if a.re_prob > 0 else None

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        if training and self.erasing is not None:
            images = self.erasing(images)
        return images


class RankData:
    """Train and val loaders for one rank, epoch by epoch."""

    def __init__(self, config, plan: DataPlan, rank: int, world: int, img_size: int, pin_memory: bool):
        self.config, self.plan, self.rank, self.world = config, plan, rank, world
        self.micro_batch = config.micro_batch_size(world)
        self.train_transform = build_transforms(config, img_size, training=True)
        self.eval_transform = build_transforms(config, img_size, training=False)
        self.pin_memory = pin_memory

    def train_batches(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        d = self.config.data
        workers = d.num_workers if d.resampled else usable_workers(d.num_workers, len(self.plan.train_shards), self.world)
        spec = StreamSpec(tuple(self.plan.train_shards), self.micro_batch, self.config.run.seed, epoch, self.rank,
                          self.world, workers, True, d.shuffle_buffer, d.resampled, skip_batches)
        return make_loader(spec, self.train_transform, prefetch_factor=d.prefetch_factor, pin_memory=self.pin_memory)

    def val_batches(self) -> Optional[DataLoader]:
        """This rank's share of the val shards (possibly none), one pass, unshuffled."""
        mine = deal_shards(self.plan.val_shards, seed=0, epoch=0, rank=self.rank, world=self.world, shuffle=False)
        if not mine:
            return None
        d = self.config.data
        spec = StreamSpec(tuple(self.plan.val_shards), self.micro_batch, 0, 0, self.rank, self.world,
                          min(d.num_workers, len(mine)), False)
        return make_loader(spec, self.eval_transform, prefetch_factor=d.prefetch_factor, pin_memory=self.pin_memory)
