"""The streaming loader on real tar shards: splitting, equal steps, skipping bad samples, exact resume."""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data.loader import RankData, assemble
from pipeline.data.plan import DataError, plan_data, usable_workers
from pipeline.data.stream import ShardStream, StreamSpec, make_loader
from pipeline.data.writer import write_split


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(tmp_path, sizes: list[int], split: str = "train") -> list[str]:
    """Shards of the given sizes; sample i is an 8x8 image of value i (its identity) with label i % 10."""
    paths = []
    start = 0
    for shard_index, size in enumerate(sizes):
        samples = [(f"s{i:05d}", _png(i), i % 10, None) for i in range(start, start + size)]
        spec = write_split(samples, tmp_path / f"part{shard_index}", split, samples_per_shard=size)
        paths += [str(tmp_path / f"part{shard_index}" / s) for s in spec.shards]
        start += size
    return paths


def write_raw_tar(path, members: list[tuple[str, bytes]]) -> str:
    """A tar written by hand, so it can hold what the shard writer would refuse."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def identity(image: Image.Image) -> torch.Tensor:
    """Recovers the sample id from the 8x8 image (pixel value) instead of normalising it."""
    return torch.tensor(np.asarray(image)[:1, :1, 0].astype(np.int64))


def sample_ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b.images.flatten().tolist()]


def spec(shards, **kw) -> StreamSpec:
    """A training stream spec: 4 canonical streams, 2 samples each per step, an epoch longer than any test reads."""
    base = dict(
        shards=tuple(shards),
        seed=7,
        rank=0,
        world=1,
        workers=0,
        training=True,
        streams=4,
        chunk=2,
        epoch_steps=10**6,
        shuffle_buffer=16,
    )
    base.update(kw)
    return StreamSpec(**base)


def eval_spec(shards, **kw) -> StreamSpec:
    base = dict(shards=tuple(shards), seed=0, rank=0, world=1, workers=0, training=False, batch_size=4)
    base.update(kw)
    return StreamSpec(**base)


def rank_steps(shards, steps: int, *, world: int = 1, rank: int = 0, workers: int = 0, transform=None, **kw):
    """A rank's batch per optimizer step (the loader's parts put together as RankData does), as copies."""
    s = spec(shards, world=world, rank=rank, workers=workers, **kw)
    parts = iter(make_loader(s, transform or identity))
    out, buffer = [], None
    for _ in range(steps):
        batch, buffer = assemble([next(parts) for _ in range(max(1, s.workers))], s.chunk, buffer, False)
        out.append((batch.images.clone(), batch.labels.clone(), list(batch.keys), batch.step))
    return out


def test_eval_split_across_two_ranks_and_two_workers_is_disjoint_and_complete(tmp_path):
    shards = make_shards(tmp_path, [10, 10, 10, 10, 10, 10, 10, 10])
    seen_per_rank = []
    for rank in range(2):
        loader = make_loader(eval_spec(shards, rank=rank, world=2, workers=2, batch_size=3), identity)
        seen_per_rank.append(sample_ids(loader))
    everything = seen_per_rank[0] + seen_per_rank[1]
    assert sorted(everything) == list(range(80)), "each sample exactly once across ranks and workers"
    assert not set(seen_per_rank[0]) & set(seen_per_rank[1])
    assert len(seen_per_rank[0]) == len(seen_per_rank[1]) == 40


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 1), (4, 0), (1, 3), (4, 1)])
def test_every_global_batch_is_the_same_samples_on_any_world_size_and_worker_count(tmp_path, world, workers):
    """Elastic determinism: step t's global batch (all ranks together) is the same set of samples, and each rank
    sees its streams' samples in the same canonical order, whatever the number of ranks and loader workers."""
    shards = make_shards(tmp_path, [6, 9, 4, 7, 8, 5, 10, 3])  # uneven shards, 8 of them for 4 streams
    steps = 14  # more than one pass over several streams' shards
    reference = [sorted(ids) for ids in (sample_ids([_b(images)]) for images, *_ in rank_steps(shards, steps))]
    per_rank = [rank_steps(shards, steps, world=world, rank=r, workers=workers) for r in range(world)]
    for t in range(steps):
        together = sorted(i for r in range(world) for i in sample_ids([_b(per_rank[r][t][0])]))
        assert together == reference[t], f"step {t} differs on {world} ranks x {workers} workers"
        assert all(per_rank[r][t][3] == t for r in range(world))
    full = rank_steps(shards, steps, workers=0)
    for r in range(world):  # a rank's samples are its block of the 1-rank batch, in the same order
        block = 8 // world
        for t in range(steps):
            assert sample_ids([_b(per_rank[r][t][0])]) == sample_ids([_b(full[t][0])])[r * block : (r + 1) * block]


def _b(images):
    from pipeline.data.stream import Batch

    return Batch(images, torch.empty(0))


def test_training_shard_order_changes_with_epoch_but_not_with_rerun(tmp_path):
    shards = make_shards(tmp_path, [8] * 4)
    first = lambda start: sample_ids([_b(rank_steps(shards, 1, start_step=start, epoch_steps=5)[0][0])])  # noqa: E731
    assert first(0) == first(0)
    assert first(0) != first(5)  # step 5 is the first of epoch 1: a new deal and new shuffles


def test_uneven_shards_give_every_rank_the_same_full_steps(tmp_path):
    shards = make_shards(tmp_path, [50, 2, 10, 30])  # stream 1 holds 2 samples' worth, stream 0 holds 50
    for rank in range(2):
        batches = rank_steps(shards, 12, world=2, rank=rank, workers=1)
        assert len(batches) == 12 and all(images.shape[0] == 2 * 2 for images, *_ in batches)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    corrupt = {3, 14, 15}
    shards = []
    for part in range(2):
        members = []
        for i in range(part * 10, part * 10 + 10):
            members += [(f"s{i:05d}.png", b"not an image" if i in corrupt else _png(i)), (f"s{i:05d}.cls", b"1")]
        shards.append(write_raw_tar(tmp_path / f"bad-{part}.tar", members))
    batches = list(make_loader(eval_spec(shards, batch_size=4), identity))
    ids = sample_ids(batches)
    assert sorted(ids) == sorted(set(range(20)) - {3, 14, 15})
    assert sum(b.skipped for b in batches) == 3
    assert any("cannot identify image" in b.error or "UnidentifiedImageError" in b.error for b in batches)
    parts = list(itertools.islice(iter(make_loader(spec(shards, streams=2, chunk=5, shuffle_buffer=1), identity)), 2))
    assert sum(p.skipped for p in parts) == 3 and sum(len(p.labels) for p in parts) == 20 - 3  # training: counted too


def test_resume_at_any_step_continues_with_identical_batches_and_augmentation(tmp_path):
    """Steps k.. of a stream restarted at k equal steps k.. of the uninterrupted stream (2 workers), random
    augmentation included, across epoch ends: what a step holds depends only on its position."""
    shards = make_shards(tmp_path, [9] * 5)

    def noisy(image):  # a random "augmentation": id + a random draw
        return identity(image).float() + torch.rand(1)

    full = rank_steps(shards, 12, workers=2, transform=noisy, epoch_steps=5)
    for start in (1, 4, 5, 7):
        resumed = rank_steps(shards, 12 - start, workers=2, transform=noisy, epoch_steps=5, start_step=start)
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2], start


def test_too_few_shards_for_the_streams_or_ranks_is_a_clear_error(tmp_path):
    shards = make_shards(tmp_path, [10, 10])
    config = load_config(
        None,
        [
            f"data.train_shards={shards[0]}::{shards[1]}",
            "data.val_shards=null",
            "data.train_samples=20",
            "data.batch_size=4",
            "launch.nproc=4",
        ],
    )
    with pytest.raises(DataError, match=r"data\.streams=2 \(the default\) cannot be split evenly over 4 ranks"):
        plan_data(config, 4)
    config.data.streams = 4
    with pytest.raises(DataError, match=r"data\.streams=4 needs at least that many train shards, there are 2"):
        plan_data(config, 4)
    assert usable_workers(num_workers=4, shards=3, world=2) == 1  # never a worker without a shard


def test_missing_shards_are_a_clear_error(tmp_path):
    config = load_config(None, [f"data.train_shards={tmp_path}/train-{{000000..000003}}.tar"])
    with pytest.raises(DataError, match="data.train_shards.*not found"):
        plan_data(config, 1)


def test_rank_data_serves_micro_batches_of_timm_transformed_digits(tmp_path):
    from pipeline.data.sources import write_digits

    write_digits(tmp_path, samples_per_shard=200)
    config = load_config(
        None,
        [
            f"data.train_shards={tmp_path}/train-{{000000..000007}}.tar",
            f"data.val_shards={tmp_path}/val-{{000000..000001}}.tar",
            "data.batch_size=16",
            "data.num_workers=2",
            "model.img_size=32",
            "augment.hflip=0",
            "optim.grad_accum_steps=2",
        ],
    )
    plan = plan_data(config, 1)
    assert plan.train_samples == 1497 and plan.classes == [str(i) for i in range(10)]
    assert plan.steps_per_epoch == 1497 // 16 and plan.streams == 8
    data = RankData(config, plan, rank=0, world=1, img_size=32, pin_memory=False)
    batches = list(itertools.islice(data.train_batches(start_step=0), 4))
    assert [b.step for b in batches] == [0, 0, 1, 1] and all(b.images.shape == (8, 3, 32, 32) for b in batches)
    assert batches[0].images.dtype == torch.uint8 and batches[0].skipped == 0  # normalised on the device
    assert all(0 <= b.labels.min() and b.labels.max() <= 9 for b in batches)
    assert len({k for b in batches[:2] for k in b.keys}) == 16
    val = list(data.val_batches())
    assert sum(b.images.shape[0] for b in val) == 300


def test_a_stream_pickled_into_a_worker_serves_the_same_batches(tmp_path):
    """Loader workers get the stream by pickling: what they serve must equal what the original serves."""
    import pickle

    shards = make_shards(tmp_path, [6, 6, 6, 6])
    stream = ShardStream(spec(shards), identity)
    copy = pickle.loads(pickle.dumps(stream))
    take = lambda s: sample_ids(itertools.islice(iter(s), 5))  # noqa: E731
    assert take(copy) == take(stream) and len(take(stream)) == 5 * 4 * 2


def test_resampled_mode_serves_any_number_of_ranks_from_one_shard(tmp_path):
    shards = make_shards(tmp_path, [10])
    config = load_config(
        None,
        [
            f"data.train_shards={shards[0]}",
            "data.val_shards=null",
            "data.resampled=true",
            "data.samples_per_epoch=40",
            "data.batch_size=8",
            "launch.nproc=4",
        ],
    )
    plan = plan_data(config, 4)
    assert plan.steps_per_epoch == 5 and plan.streams == 8
    per_rank = [
        sample_ids(
            [_b(i) for i, *_ in rank_steps(shards, 5, world=4, rank=r, workers=2, streams=8, chunk=1, resampled=True)]
        )
        for r in range(4)
    ]
    assert all(len(ids) == 10 and set(ids) <= set(range(10)) for ids in per_rank)
    assert len({tuple(ids) for ids in per_rank}) == 4, "streams draw independently"


def test_without_workers_the_trainers_random_streams_are_left_alone(tmp_path):
    """In the main process the per-sample seeding must not rewind or replace the trainer's RNG (dropout)."""
    shards = make_shards(tmp_path, [8] * 4)
    loader = iter(make_loader(spec(shards, workers=0, epoch_steps=2), identity))
    torch.manual_seed(123)
    expected = [torch.rand(3) for _ in range(6)]
    torch.manual_seed(123)
    drawn = []
    for _ in range(6):  # across epoch boundaries (2 steps per epoch)
        next(loader)
        drawn.append(torch.rand(3))
    assert all(torch.equal(a, b) for a, b in zip(expected, drawn))


def test_recycled_shared_buffers_hold_the_same_batches_for_a_one_at_a_time_consumer(tmp_path):
    """Workers reuse prefetch_factor + 3 shared buffers in turn; a consumer that is done with each batch when
    it asks for the next (the trainer) still sees exactly the batches of a non-recycling loader."""
    shards = make_shards(tmp_path, [12] * 4)

    def noisy(image):
        return identity(image).float() + torch.rand(1)

    def batches(recycle):
        loader = make_loader(spec(shards, workers=2, recycle_buffers=recycle), noisy, prefetch_factor=2)
        seen, storages = [], set()
        for part in itertools.islice(iter(loader), 40):
            storages.add(part.images.untyped_storage().data_ptr())
            seen.append((part.images.clone(), part.labels.clone()))  # a copy: the buffer itself is reused
        return seen, storages

    plain, _ = batches(0)
    recycled, storages = batches(2 + 3)
    assert len(storages) <= 2 * 5, "each worker cycles through its ring of buffers"
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, recycled))
