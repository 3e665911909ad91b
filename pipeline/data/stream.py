"""Streaming WebDataset loader: canonical sample streams for training, resumable at any step on any world size.

How training data is laid out, and why:

* The training shards feed ``C`` canonical streams (``data.streams``, fixed for the run). In epoch ``e`` the
  shards are shuffled by ``(seed, e)`` and stream ``s`` reads every C-th of them, through its own seeded
  shuffle buffer. Optimizer step ``t`` takes the next ``chunk = batch_size / C`` samples of EVERY stream:
  the global batch of a step is the same set of samples whatever the number of ranks and loader workers
  (Mosaic Streaming's canonical nodes, for tar shards). Ranks own contiguous blocks of C / W streams, loader
  workers own every k-th stream of their rank, so each stream is read by exactly one process, sequentially.
* Every rank therefore takes the same number of steps, whatever the shard sizes (a stream that runs out of
  shards starts another pass over a new deal); no rank ever waits for another at an epoch's end.
* Everything random is a function of ``(seed, epoch, stream, position)``: shard order, the shuffle buffer and
  each sample's augmentation (the RNGs are re-seeded per sample). A resumed run, on the same or another world
  size, skips the samples it already trained on *before decoding* and continues bit-identically.
* Undecodable samples and unreadable tar members are skipped and counted (the batch is that much smaller);
  the count travels with the batch to the trainer, which reports it. A remote shard whose stream fails is
  retried, continuing after its last delivered sample (pipeline/data/reader.py); one that keeps failing counts
  its undelivered samples as skipped. A label outside the run's classes stops the run (LabelError), naming
  shard and sample.

Evaluation is one unshuffled pass: val shards dealt ``rank::world``, then ``worker::workers``.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.batch import BatchBuilder
from pipeline.data.plan import deal_shards, derive_seed
from pipeline.data.reader import ReadPolicy, shard_samples
from pipeline.data.samples import Counter, LabelError, decode_sample, seed_sample

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """What a loader hands the trainer: uint8 images, labels, and what was dropped on the way."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0  # undecodable samples dropped since the previous batch
    error: str = ""  # the last reason
    keys: list[str] = field(default_factory=list)
    step: int = -1  # training: the optimizer step these samples belong to
    counts: tuple[tuple[int, int], ...] = ()  # training part: (stream, samples) in the order they are stored

    def pin_memory(self) -> Batch:  # the DataLoader's pin-memory thread calls this (CUDA only)
        return Batch(
            self.images.pin_memory(),
            self.labels.pin_memory(),
            self.skipped,
            self.error,
            self.keys,
            self.step,
            self.counts,
        )


@dataclass(frozen=True)
class StreamSpec:
    """Everything a loader worker needs; plain data so it pickles into worker processes."""

    shards: tuple[str, ...]
    seed: int
    rank: int
    world: int
    workers: int  # usable workers (0: in the main process)
    training: bool
    batch_size: int = 0  # eval: samples per batch
    streams: int = 1  # training: canonical streams (C)
    chunk: int = 0  # training: samples each stream gives a global batch (batch_size / C)
    epoch_steps: int = 0  # training: optimizer steps per epoch
    start_step: int = 0  # training: the first step to serve (resume)
    shuffle_buffer: int = 1000
    resampled: bool = False
    # Each worker reuses this many shared image buffers in turn (0: a new one per batch). Only for a consumer
    # that is done with a batch when it asks for the next (the trainer is): a worker is at most
    # prefetch_factor batches ahead, so prefetch_factor + 3 buffers are never reused while still in use.
    recycle_buffers: int = 0
    require_labels: bool = True  # False: samples without .cls are served with label -1 (self-supervised)
    num_classes: int = 0  # labels must be below this (0: unchecked)
    read: ReadPolicy = ReadPolicy()  # retries and timeouts of remote shards
    shard_counts: tuple[int, ...] = ()  # samples per shard (manifest or index), sizes what a lost shard costs
    keep_keys: Optional[frozenset] = None  # training: only these sample keys (data.train_subset)

    def rank_streams(self) -> range:
        per_rank = self.streams // self.world
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


class ShardStream(IterableDataset):
    """Training: one part per optimizer step (this worker's streams' samples), endless. Eval: one pass."""

    def __init__(self, spec: StreamSpec, transform: Callable[[Image.Image], torch.Tensor]):
        self.spec = spec
        self.transform = transform

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = _SavedRng(active=info is None)
        if self.spec.training:
            yield from self._train_parts(worker, workers, info is not None, rng)
        else:
            yield from self._eval_batches(worker, workers, info is not None, rng)

    # -- training ----------------------------------------------------------------------------------
    def _train_parts(self, worker: int, workers: int, shared: bool, rng: _SavedRng) -> Iterator[Batch]:
        s = self.spec
        mine = list(s.rank_streams())[worker::workers]
        builder = BatchBuilder(len(mine) * s.chunk, shared=shared, recycle=s.recycle_buffers if shared else 0)
        counter = Counter()
        sources: dict[int, Iterator] = {}
        epoch = None
        for step in itertools.count(s.start_step):
            if step // s.epoch_steps != epoch:  # a new epoch: a new deal for every stream
                epoch = step // s.epoch_steps
                skip = (step - epoch * s.epoch_steps) * s.chunk
                sources = {stream: self._stream(epoch, stream, skip, counter) for stream in mine}
            rng.save()  # runs when the trainer asks for the next part: its RNG state as of now
            counts = []
            for stream in mine:
                before = len(builder)
                for image, label, key in itertools.islice(sources[stream], s.chunk):
                    if image is not None:
                        builder.add(image, label, key)
                counts.append((stream, len(builder) - before))
            rng.restore()
            images, labels, keys = builder.take()
            yield Batch(images, labels, counter.skipped, counter.last_error, keys, step, tuple(counts))
            counter.skipped = 0

    def _stream(self, epoch: int, stream: int, skip: int, counter: Counter) -> Iterator:
        """Canonical stream ``stream`` of ``epoch``, endless: (transformed image | None if undecodable, label,
        key) per sample position, the first ``skip`` positions passed over without decoding."""
        s = self.spec
        read = [0]  # samples read so far: a pass over the stream's shards that yields none is an error, not a hang
        expected = dict(zip(s.shards, s.shard_counts)) if s.shard_counts else None
        samples = shard_samples(self._train_urls(epoch, stream, read, counter), counter.lost, s.read, expected)
        if s.keep_keys is not None:  # data.train_subset: the other samples are passed over before decoding
            samples = (sample for sample in samples if sample.get("__key__") in s.keep_keys)
        raw = self._shuffled(_counted(samples, read), derive_seed(s.seed, epoch, stream, -2))
        for index, sample in enumerate(raw):
            if index >= skip:
                yield self._decode(sample, derive_seed(s.seed, epoch, stream, index), counter)

    def _train_urls(self, epoch: int, stream: int, read: list, counter: Counter) -> Iterator[str]:
        s = self.spec
        if s.resampled:  # with replacement, independently per stream: any shard count works
            rng = random.Random(derive_seed(s.seed, epoch, stream, -1))
            while True:
                yield rng.choice(s.shards)
        for cycle in itertools.count():
            before = read[0]
            mine = deal_shards(list(s.shards), seed=s.seed, epoch=epoch, rank=stream, world=s.streams, cycle=cycle)
            yield from mine
            if cycle and read[0] == before:  # the previous pass read something, or this is the first pass
                raise RuntimeError(
                    f"training stream {stream}: none of its shards yields a readable sample "
                    f"({', '.join(mine[:3])}{' ...' if len(mine) > 3 else ''}); the last error: "
                    f"{counter.last_error}"
                )

    def _shuffled(self, samples: Iterator[dict], seed: int) -> Iterator[dict]:
        """Reservoir-style shuffle buffer with its own seeded RNG (training only)."""
        size = self.spec.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        rng = random.Random(seed)
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, sample: dict, seed: int, counter: Counter):
        """(transformed image, label, key), or (None, ...) for a sample that cannot be decoded (counted)."""
        key = str(sample.get("__key__", ""))
        try:
            lazy = getattr(self.transform, "lazy_decode", False)
            image, label = decode_sample(sample, lazy, self.spec.require_labels, self.spec.num_classes)
            # Per-sample seeding makes augmentation independent of what came before: exact resume.
            seed_sample(seed)
            return self.transform(image), label, key
        except LabelError:
            raise
        except Exception as exc:  # malformed sample: count it, keep going
            counter.sample(sample, exc)
            return None, -1, key

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_batches(self, worker: int, workers: int, shared: bool, rng: _SavedRng) -> Iterator[Batch]:
        """One pass over this worker's share of this rank's val shards, in full batches and a last partial one."""
        s = self.spec
        builder, counter = BatchBuilder(s.batch_size, shared=shared), Counter()
        urls = deal_shards(list(s.shards), seed=0, epoch=0, rank=s.rank, world=s.world, shuffle=False)[worker::workers]
        expected = dict(zip(s.shards, s.shard_counts)) if s.shard_counts else None
        rng.save()
        for sample in shard_samples(urls, counter.lost, s.read, expected):
            image, label, key = self._decode(sample, derive_seed(s.seed, -1, len(builder)), counter)
            if image is not None:
                builder.add(image, label, key)
            if len(builder) == s.batch_size:
                rng.restore()
                images, labels, keys = builder.take()
                yield Batch(images, labels, counter.skipped, counter.last_error, keys)
                rng.save()
                counter.skipped = 0
        rng.restore()
        if len(builder) or counter.skipped:  # the last, partial batch; or only a count of drops
            images, labels, keys = (
                builder.take() if len(builder) else (torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long), [])
            )
            yield Batch(images, labels, counter.skipped, counter.last_error, keys)


def _counted(samples, read: list) -> Iterator[dict]:
    for sample in samples:
        read[0] += 1
        yield sample


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
    return DataLoader(
        ShardStream(spec, transform),
        batch_size=None,
        num_workers=spec.workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(spec.seed),
        collate_fn=_keep,
        **kwargs,
    )


def _keep(batch: Batch) -> Batch:
    return batch


def _quiet_stop_signals(_worker_id: int) -> None:
    """Slurm signals every process of a task. A loader worker killed by SIGTERM (torch's default) makes
    torch raise in the rank's main process, from its SIGCHLD handler, wherever it is: in the middle of the
    checkpoint the same signal asked for. So a worker exits quietly (status 0, which torch does not treat
    as a failure) on SIGTERM, also what it gets when its loader shuts down, and ignores USR2; the main
    process decides when to stop."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
