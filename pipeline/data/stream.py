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
  batch to the trainer, which reports it. A remote shard whose stream fails is retried, continuing after its
  last delivered sample (pipeline/data/reader.py); one that keeps failing counts its undelivered samples as
  skipped. A label outside the run's classes stops the run (LabelError), naming shard and sample.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.batch import BatchBuilder
from pipeline.data.plan import deal_shards, derive_seed
from pipeline.data.reader import ReadPolicy, shard_samples
from pipeline.data.samples import Counter, LabelError, decode_sample, seed_sample

log = logging.getLogger(__name__)


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
    # so one loader (and its workers) serves the whole run.
    epoch_batches: int = 0
    # Each worker reuses this many shared image buffers in turn (0: a new one per batch). Only for a consumer
    # that is done with a batch when it asks for the next (the trainer is): a worker is at most
    # prefetch_factor batches ahead, so prefetch_factor + 3 buffers are never reused while still in use.
    recycle_buffers: int = 0
    require_labels: bool = True  # False: samples without .cls are served with label -1 (self-supervised)
    num_classes: int = 0  # labels must be below this (0: unchecked)
    read: ReadPolicy = ReadPolicy()  # retries and timeouts of remote shards
    shard_counts: tuple[int, ...] = ()  # samples per shard (manifest or index), sizes what a lost shard costs


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
            mine = deal_shards(
                list(s.shards), seed=s.seed, epoch=epoch, rank=s.rank, world=s.world, shuffle=s.training, cycle=cycle
            )[stream::streams]
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
        state = _WorkerState(
            BatchBuilder(
                s.batch_size,
                shared=info is not None,
                recycle=s.recycle_buffers if s.training and info is not None else 0,
            ),
            Counter(),
            _SavedRng(active=info is None),
        )
        if not s.training:  # one pass over this worker's share
            yield from self._epoch_stream(s.epoch, worker, workers, 0, state)
            state.rng.restore()
            if len(state.batch):  # the last, partial eval batch
                yield *state.batch.take(), state.counter.skipped, state.counter.last_error
            elif state.counter.skipped:  # report drops even without a final batch
                yield (
                    torch.empty(0, 3, 1, 1),
                    torch.empty(0, dtype=torch.long),
                    state.counter.skipped,
                    state.counter.last_error,
                )
            return
        stream = (s.epoch * s.epoch_batches + s.skip_batches + worker) % workers
        epoch, first = s.epoch, s.skip_batches
        while True:
            start = (stream - epoch * s.epoch_batches) % workers  # this stream's first position in the epoch
            skip = len(range(start, first, workers))
            count = len(range(start, s.epoch_batches, workers)) - skip
            yield from itertools.islice(self._epoch_stream(epoch, stream, workers, skip, state), count)
            epoch, first = epoch + 1, 0

    def _epoch_stream(
        self, epoch: int, stream: int, streams: int, skip_batches: int, state: _WorkerState
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, str]]:
        """Full batches of one sample stream of one epoch (endless when training), the first ``skip_batches``
        skipped before decoding."""
        s = self.spec
        counter, batch, rng = state.counter, state.batch, state.rng
        expected = dict(zip(s.shards, s.shard_counts)) if s.shard_counts else None
        samples = shard_samples(self._shard_urls(epoch, stream, streams), counter.lost, s.read, expected)
        raw = self._shuffled(samples, epoch, stream)
        skip = skip_batches * s.batch_size
        lazy = getattr(self.transform, "lazy_decode", False)
        rng.save()  # runs when the trainer asks for the next batch: its RNG state as of now
        for index, sample in enumerate(raw):
            if index < skip:
                continue
            try:
                image, label = decode_sample(sample, lazy, s.require_labels, s.num_classes)
                # Per-sample seeding makes augmentation independent of what came before: exact resume.
                seed_sample(derive_seed(s.seed, epoch, s.rank, stream, index))
                batch.add(self.transform(image), label)
            except LabelError:
                raise
            except Exception as exc:  # malformed sample: count it, keep going
                counter.sample(sample, exc)
                continue
            if len(batch) == s.batch_size:
                rng.restore()
                yield *batch.take(), counter.skipped, counter.last_error
                rng.save()
                counter.skipped = 0


@dataclass
class _WorkerState:
    """What a worker carries from one epoch's stream to the next."""

    batch: BatchBuilder
    counter: Counter
    rng: _SavedRng


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
        **kwargs,
    )


def _quiet_stop_signals(_worker_id: int) -> None:
    """Slurm signals every process of a task. A loader worker killed by SIGTERM (torch's default) makes
    torch raise in the rank's main process, from its SIGCHLD handler, wherever it is: in the middle of the
    checkpoint the same signal asked for. So a worker exits quietly (status 0, which torch does not treat
    as a failure) on SIGTERM, also what it gets when its loader shuts down, and ignores USR2; the main
    process decides when to stop."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
