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
from pipeline.data.loader import RankData
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
    return [int(v) for images, _labels, _skipped, _err in batches for v in images.flatten().tolist()]


def spec(shards, **kw) -> StreamSpec:
    """A training stream whose epoch is longer than any test reads (unless epoch_batches is given)."""
    base = dict(
        shards=tuple(shards),
        batch_size=4,
        seed=7,
        epoch=0,
        rank=0,
        world=1,
        workers=0,
        training=True,
        shuffle_buffer=16,
        epoch_batches=10**6,
    )
    base.update(kw)
    return StreamSpec(**base)


def test_split_across_two_ranks_and_two_workers_is_disjoint_and_complete(tmp_path):
    shards = make_shards(tmp_path, [10, 10, 10, 10, 10, 10, 10, 10])
    seen_per_rank = []
    for rank in range(2):
        loader = make_loader(spec(shards, rank=rank, world=2, workers=2, training=False, batch_size=3), identity)
        seen_per_rank.append(sample_ids(loader))
    everything = seen_per_rank[0] + seen_per_rank[1]
    assert sorted(everything) == list(range(80)), "each sample exactly once across ranks and workers"
    assert not set(seen_per_rank[0]) & set(seen_per_rank[1])
    assert len(seen_per_rank[0]) == len(seen_per_rank[1]) == 40


def test_training_shard_order_changes_with_epoch_but_not_with_rerun(tmp_path):
    shards = make_shards(tmp_path, [8] * 4)

    def first(epoch):
        return sample_ids(itertools.islice(iter(make_loader(spec(shards, epoch=epoch), identity)), 8))

    assert first(0) == first(0)
    assert first(0) != first(1)


def test_uneven_shards_give_every_rank_the_same_number_of_steps(tmp_path):
    # 3 shards of very different sizes over 2 ranks: one rank holds 2 samples' worth of data, the other 60.
    shards = make_shards(tmp_path, [50, 2, 10])
    steps = 12  # what the trainer takes per epoch, whatever each rank holds
    for rank in range(2):
        loader = make_loader(spec(shards, rank=rank, world=2, workers=1), identity)
        batches = list(itertools.islice(iter(loader), steps))
        assert len(batches) == steps and all(b[0].shape[0] == 4 for b in batches)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    corrupt = {3, 14, 15}
    shards = []
    for part in range(2):
        members = []
        for i in range(part * 10, part * 10 + 10):
            members += [(f"s{i:05d}.png", b"not an image" if i in corrupt else _png(i)), (f"s{i:05d}.cls", b"1")]
        shards.append(write_raw_tar(tmp_path / f"bad-{part}.tar", members))
    batches = list(make_loader(spec(shards, training=False, batch_size=4), identity))
    ids = sample_ids(batches)
    assert sorted(ids) == sorted(set(range(20)) - {3, 14, 15})
    assert sum(b[2] for b in batches) == 3
    assert any("cannot identify image" in b[3] or "UnidentifiedImageError" in b[3] for b in batches)


def test_resume_skips_exactly_the_consumed_batches_with_identical_augmentation(tmp_path):
    """Batches k.. of a stream restarted at k equal batches k.. of the uninterrupted stream (2 workers),
    including the random augmentation, because randomness is a function of position."""
    shards = make_shards(tmp_path, [12] * 4)

    def noisy(image):  # a random "augmentation": id + a random draw
        return identity(image).float() + torch.rand(1)

    full = list(itertools.islice(iter(make_loader(spec(shards, workers=2), noisy)), 10))
    resumed = list(itertools.islice(iter(make_loader(spec(shards, workers=2, skip_batches=6), noisy)), 4))
    for a, b in zip(full[6:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fewer_shards_than_ranks_is_a_clear_error(tmp_path):
    shards = make_shards(tmp_path, [10])
    config = load_config(
        None,
        [
            f"data.train_shards={shards[0]}",
            "data.val_shards=null",
            "data.train_samples=10",
            "data.batch_size=4",
            "launch.nproc=2",
        ],
    )
    with pytest.raises(DataError, match="1 shard.*2 ranks"):
        plan_data(config, 2)
    assert usable_workers(num_workers=4, shards=3, world=2) == 1  # never a worker without a shard


def test_missing_shards_are_a_clear_error(tmp_path):
    config = load_config(None, [f"data.train_shards={tmp_path}/train-{{000000..000003}}.tar"])
    with pytest.raises(DataError, match="data.train_shards.*not found"):
        plan_data(config, 1)


def test_rank_data_uses_timm_transforms_and_the_manifest(tmp_path):
    from pipeline.data.sources import write_digits

    write_digits(tmp_path, samples_per_shard=400)
    config = load_config(
        None,
        [
            f"data.train_shards={tmp_path}/train-{{000000..000003}}.tar",
            f"data.val_shards={tmp_path}/val-000000.tar",
            "data.batch_size=16",
            "data.num_workers=1",
            "model.img_size=32",
            "augment.hflip=0",
        ],
    )
    plan = plan_data(config, 1)
    assert plan.train_samples == 1497 and plan.classes == [str(i) for i in range(10)]
    assert plan.steps_per_epoch == 1497 // 16
    data = RankData(config, plan, rank=0, world=1, img_size=32, pin_memory=False)
    images, labels, skipped, _ = next(iter(data.train_batches(epoch=0)))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and skipped == 0  # normalised on device
    assert labels.min() >= 0 and labels.max() <= 9
    val = list(data.val_batches())
    assert sum(b[0].shape[0] for b in val) == 300


def test_a_stream_pickled_into_a_worker_serves_the_same_batches(tmp_path):
    """Loader workers get the stream by pickling: what they serve must equal what the original serves."""
    import itertools
    import pickle

    shards = make_shards(tmp_path, [6, 6])
    stream = ShardStream(spec(shards), identity)
    copy = pickle.loads(pickle.dumps(stream))
    take = lambda s: sample_ids(itertools.islice(iter(s), 5))  # noqa: E731
    assert take(copy) == take(stream) and len(take(stream)) == 20


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
    assert plan.steps_per_epoch == 5
    per_rank = []
    for rank in range(4):
        loader = make_loader(spec(shards, rank=rank, world=4, workers=2, resampled=True), identity)
        per_rank.append(sample_ids(itertools.islice(iter(loader), 5)))
    assert all(len(ids) == 20 and set(ids) <= set(range(10)) for ids in per_rank)
    assert len({tuple(ids) for ids in per_rank}) == 4, "ranks draw independently"


def test_one_loader_runs_through_epochs_and_resumes_anywhere_identically(tmp_path):
    """The training loader runs on into later epochs (one set of workers for the run). Restarted at any
    batch of any epoch, odd positions with 2 workers included, it gives exactly the uninterrupted run's
    batches, random augmentation included: what a batch holds depends only on its position."""
    shards = make_shards(tmp_path, [9] * 5)  # 45 samples, batch 5: 9 batches per epoch (odd, with 2 workers)

    def noisy(image):
        return identity(image).float() + torch.rand(1)

    def run(epoch, skip, n):
        loader = make_loader(
            spec(shards, workers=2, batch_size=5, epoch=epoch, skip_batches=skip, epoch_batches=9), noisy
        )
        return [(images.clone(), labels.clone()) for images, labels, _, _ in itertools.islice(iter(loader), n)]

    full = run(0, 0, 30)  # epochs 0-2 and the start of 3
    for epoch, skip in [(0, 1), (0, 8), (1, 0), (1, 3), (2, 4)]:
        start = epoch * 9 + skip
        resumed = run(epoch, skip, 30 - start)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[start:], resumed)), (
            epoch,
            skip,
        )
    ids = [
        sorted(int(v) for images, _ in full[e * 9 : (e + 1) * 9] for v in images.floor().flatten()) for e in range(3)
    ]
    assert ids[0] != ids[1] or [b[0] for b in full[:9]] != [b[0] for b in full[9:18]]  # epochs differ


def test_without_workers_the_trainers_random_streams_are_left_alone(tmp_path):
    """In the main process the per-sample seeding must not rewind or replace the trainer's RNG (dropout)."""
    shards = make_shards(tmp_path, [8] * 2)
    loader = iter(make_loader(spec(shards, workers=0, epoch_batches=4), identity))
    torch.manual_seed(123)
    expected = [torch.rand(3) for _ in range(6)]
    torch.manual_seed(123)
    drawn = []
    for _ in range(6):  # across an epoch boundary (4 batches per epoch)
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
        loader = make_loader(
            spec(shards, workers=2, batch_size=3, epoch_batches=16, recycle_buffers=recycle), noisy, prefetch_factor=2
        )
        seen, storages = [], set()
        for images, labels, _, _ in itertools.islice(iter(loader), 40):
            storages.add(images.untyped_storage().data_ptr())
            seen.append((images.clone(), labels.clone()))  # a copy: the buffer itself is reused
        return seen, storages

    plain, _ = batches(0)
    recycled, storages = batches(2 + 3)
    assert len(storages) <= 2 * 5, "each worker cycles through its ring of buffers"
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, recycled))
