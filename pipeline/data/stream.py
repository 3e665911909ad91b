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
import itertools
import json
import logging
import math
import os
import random
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

log = logging.getLogger(__name__)
# BatchBuilder only reads images through torch.from_numpy(np.asarray(pil_image)), which is read-only.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)

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


def decode_sample(sample: dict, lazy: bool = False) -> tuple[Image.Image, int]:
    """Raw tar sample -> (RGB image, class index). Raises on anything malformed.

    ``lazy``: return the image opened but not decoded, for transforms that decode it themselves at the
    size they need (pipeline/transforms.py); decoding errors then surface in the transform.
    """
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    if image_key is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    if "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no .cls label")
    label = int(sample["cls"].decode().strip())
    img = Image.open(io.BytesIO(sample[image_key]))
    if lazy:
        return img, label
    with img:
        img.load()  # force the decode here so truncated files fail now
        return img.convert("RGB"), label


def seed_sample(seed: int) -> None:
    """Seed every RNG an augmentation may draw from: Python's (timm's crops), NumPy's (timm's RandAugment,
    mixup) and torch's CPU generator (torchvision's flips and jitter). Only the CPU generator: torch.manual_seed
    would also queue CUDA/MPS/XPU seeding, which cost ~0.1 ms per image here (docs/performance.md)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


class BatchBuilder:
    """Collects transformed samples into one batch, writing each image straight into the batch tensor.

    In a loader worker that tensor is allocated in shared memory, so handing the batch to the trainer moves
    no pixels (torch.stack plus the DataLoader's copy into shared memory were two copies of every batch).
    PIL images (HWC uint8) are written as CHW; tensors of any shape are copied as they are.

    ``recycle``: reuse a ring of that many shared buffers instead of a fresh one per batch. Fresh shared
    memory is paid for in page faults on first write (measured: ~20% of a worker's time at 224 px), but a
    buffer may only be reused once the consumer is done with it: see ``StreamSpec.recycle_buffers``.
    """

    def __init__(self, batch_size: int, shared: bool, recycle: int = 0):
        self.batch_size, self.shared, self.recycle = batch_size, shared, recycle
        self.images: Optional[torch.Tensor] = None
        self.labels: list[int] = []
        self.ring: list[torch.Tensor] = []
        self.batches = 0

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, item, label: int) -> None:
        tensor = _as_tensor(item)
        if self.images is None:
            self.images = self._buffer((self.batch_size, *tensor.shape), tensor.dtype)
        self.images[len(self.labels)].copy_(tensor)
        self.labels.append(label)

    def _buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        slot = self.batches % self.recycle if self.recycle else None
        self.batches += 1
        if slot is not None and slot < len(self.ring) and self.ring[slot].shape == shape \
                and self.ring[slot].dtype == dtype:
            return self.ring[slot]
        if self.shared:  # allocated in shared memory directly, as torch's default_collate does
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
            buffer = torch.empty(0, dtype=dtype).set_(storage).view(shape)
        else:
            buffer = torch.empty(shape, dtype=dtype)
        if slot is not None:
            self.ring[slot:slot + 1] = [buffer]
        return buffer

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch so far (a partial one is a view of the first rows); the builder starts a new one."""
        images, labels = self.images[: len(self.labels)], torch.tensor(self.labels)
        self.images, self.labels = None, []
        return images, labels


def _as_tensor(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    array = np.asarray(item)  # read-only (Pillow's bytes): only read, by the copy into the batch
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


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
    # Training: micro batches per epoch on this rank. The stream then runs on into the next epochs by itself,
    # so one loader (and its workers) serves the whole run; 0: this epoch only, endlessly.
    epoch_batches: int = 0
    # Each worker reuses this many shared image buffers in turn (0: a new one per batch). Only for a consumer
    # that is done with a batch when it asks for the next (the trainer is): a worker is at most
    # prefetch_factor batches ahead, so prefetch_factor + 3 buffers are never reused while still in use.
    recycle_buffers: int = 0


class ShardStream(IterableDataset):
    """Batches for one rank and one epoch. Training: endless (the trainer stops it); eval: one pass."""

    def __init__(self, spec: StreamSpec, transform: Callable[[Image.Image], torch.Tensor]):
        self.spec = spec
        self.transform = transform

    # -- shard order -------------------------------------------------------------------------------
    def _shard_urls(self, epoch: int, stream: int, streams: int) -> Iterator[str]:
        s = self.spec
        if s.resampled:  # with replacement, independently per stream: any shard count works
            rng = random.Random(derive_seed(s.seed, epoch, s.rank, stream, -1))
            while True:
                yield rng.choice(s.shards)
        cycle = 0
        while True:
            mine = deal_shards(list(s.shards), seed=s.seed, epoch=epoch, rank=s.rank, world=s.world,
                               shuffle=s.training, cycle=cycle)[stream::streams]
            yield from mine
            if not s.training:
                return
            cycle += 1

    # -- samples -----------------------------------------------------------------------------------
    def _shuffled(self, samples: Iterator[dict], epoch: int, stream: int) -> Iterator[dict]:
        """Reservoir-style shuffle buffer with its own seeded RNG (training only)."""
        s = self.spec
        if not s.training or s.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(derive_seed(s.seed, epoch, s.rank, stream, -2))
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

    # -- batches -----------------------------------------------------------------------------------
    # Which batches a worker makes: batch p of epoch e comes from sample stream (e * epoch_batches + p) % W
    # (W workers), each stream having its own share of the shards and its own randomness. The DataLoader
    # hands out batches from its workers round-robin, so a loader that starts at batch s of epoch e gives
    # its worker w stream (e * epoch_batches + s + w) % W for the rest of the run. What a batch holds thus
    # depends only on its position, not on where the loader started: a resumed run sees exactly the batches,
    # augmentation included, that the uninterrupted run would have.

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        s = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        state = _WorkerState(BatchBuilder(s.batch_size, shared=info is not None,
                                          recycle=s.recycle_buffers if s.training and info is not None else 0),
                             Counter(), _SavedRng(active=info is None))
        if not s.training:  # one pass over this worker's share
            yield from self._epoch_stream(s.epoch, worker, workers, 0, state)
            state.rng.restore()
            if len(state.batch):  # the last, partial eval batch
                yield *state.batch.take(), state.counter.skipped, state.counter.last_error
            elif state.counter.skipped:  # report drops even without a final batch
                yield (torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long), state.counter.skipped,
                       state.counter.last_error)
            return
        if not s.epoch_batches:  # this epoch only
            stream = (s.skip_batches + worker) % workers
            yield from self._epoch_stream(s.epoch, stream, workers, len(range(stream, s.skip_batches, workers)), state)
            return
        stream = (s.epoch * s.epoch_batches + s.skip_batches + worker) % workers
        epoch, first = s.epoch, s.skip_batches
        while True:
            start = (stream - epoch * s.epoch_batches) % workers  # this stream's first position in the epoch
            skip = len(range(start, first, workers))
            count = len(range(start, s.epoch_batches, workers)) - skip
            yield from itertools.islice(self._epoch_stream(epoch, stream, workers, skip, state), count)
            epoch, first = epoch + 1, 0

    def _epoch_stream(self, epoch: int, stream: int, streams: int, skip_batches: int, state: "_WorkerState"
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        """Full batches of one sample stream of one epoch (endless when training), the first ``skip_batches``
        skipped before decoding."""
        s = self.spec
        counter, batch, rng = state.counter, state.batch, state.rng
        urls = ({"url": url} for url in self._shard_urls(epoch, stream, streams))
        raw = self._shuffled(iter(tarfile_samples(urls, handler=counter)), epoch, stream)
        skip = skip_batches * s.batch_size
        lazy = getattr(self.transform, "lazy_decode", False)
        rng.save()  # runs when the trainer asks for the next batch: its RNG state as of now
        for index, sample in enumerate(raw):
            if index < skip:
                continue
            try:
                image, label = decode_sample(sample, lazy=lazy)
                # Per-sample seeding makes augmentation independent of what came before: exact resume.
                seed_sample(derive_seed(s.seed, epoch, s.rank, stream, index))
                batch.add(self.transform(image), label)
            except Exception as exc:  # malformed sample: count it, keep going
                counter(exc)
                continue
            if len(batch) == s.batch_size:
                rng.restore()
                yield *batch.take(), counter.skipped, counter.last_error
                rng.save()
                counter.skipped = 0


@dataclass
class _WorkerState:
    """What a worker carries from one epoch's stream to the next."""

    batch: "BatchBuilder"
    counter: Counter
    rng: "_SavedRng"


class _SavedRng:
    """Without loader workers the stream runs in the trainer's process, and its per-sample seeding must not
    replace the trainer's own random streams (dropout, mixup): they are saved whenever the stream resumes and
    put back before each batch is handed over. In a worker process there is nothing to protect."""

    def __init__(self, active: bool):
        self.active = active

    def save(self) -> None:
        if self.active:
            self.state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()

    def restore(self) -> None:
        if self.active:
            random.setstate(self.state[0])
            np.random.set_state(self.state[1])
            torch.default_generator.set_state(self.state[2])


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
    """timm's own train/eval transforms from the augment section, in timm's "prefetcher" form: images stay
    uint8, and normalisation (and random erasing) happen on the device (DeviceNormalize). Measured reason
    (docs/performance.md): less CPU per image in the workers and 4x fewer bytes between worker and trainer
    than float32 tensors. ``accelerate`` then swaps in a faster random resized crop (pipeline/transforms.py)."""
    from timm.data import create_transform

    from pipeline.data.transforms import accelerate

    a = config.augment
    kwargs = dict(input_size=img_size, is_training=training, interpolation=a.interpolation,
                  crop_pct=a.crop_pct, use_prefetcher=True)
    if training:
        kwargs.update(scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip, vflip=a.vflip,
                      color_jitter=a.color_jitter, auto_augment=a.auto_augment)
    return accelerate(create_transform(**kwargs), draft=config.data.draft_decode,
                      torch_resize=config.data.torch_resize)


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
        self.memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        if training and self.erasing is not None:
            images = self.erasing(images)
        return images.contiguous(memory_format=self.memory_format)


class RankData:
    """Train and val loaders for one rank, epoch by epoch."""

    def __init__(self, config, plan: DataPlan, rank: int, world: int, img_size: int, pin_memory: bool):
        self.config, self.plan, self.rank, self.world = config, plan, rank, world
        self.micro_batch = config.micro_batch_size(world)
        self.train_transform = build_transforms(config, img_size, training=True)
        self.eval_transform = build_transforms(config, img_size, training=False)
        self.pin_memory = pin_memory

    def train_batches(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """Training batches from micro batch ``skip_batches`` of ``epoch`` on, running on through the later
        epochs: one loader, and one start-up of its workers, for the whole run (measured: a new loader per
        epoch cost ~0.2 s of waiting and discarded its prefetched batches at every epoch, ~6% of the demo).
        The caller must be done with a batch's images when it asks for the next (buffers are recycled)."""
        d = self.config.data
        workers = d.num_workers if d.resampled else usable_workers(d.num_workers, len(self.plan.train_shards), self.world)
        epoch_batches = self.plan.steps_per_epoch * self.config.optim.grad_accum_steps
        spec = StreamSpec(tuple(self.plan.train_shards), self.micro_batch, self.config.run.seed, epoch, self.rank,
                          self.world, workers, True, d.shuffle_buffer, d.resampled, skip_batches, epoch_batches,
                          recycle_buffers=d.prefetch_factor + 3)
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
