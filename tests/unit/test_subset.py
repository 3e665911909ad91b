"""data.train_subset: a deterministic, class-balanced subset chosen from the .cls headers of real shards."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.subset import SubsetError, choose, labelled_keys, subset_keys

FINETUNE = Path(__file__).resolve().parents[2] / "configs/finetune/digits_mae.yaml"


def test_choose_is_balanced_deterministic_and_independent_of_order():
    keys = [(f"k{i:04d}", i % 10) for i in range(1000)]
    picked = choose(keys, 150, seed=0)
    assert len(picked) == 150 and len(set(picked)) == 150
    label = dict(keys)
    assert Counter(label[k] for k in picked) == dict.fromkeys(range(10), 15)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert choose(shuffled, 150, seed=0) == picked  # shard order and count do not matter
    assert choose(keys, 150, seed=1) != picked  # the seed does
    uneven = Counter(label[k] for k in choose(keys, 13, seed=0))
    assert sorted(uneven.values()) == [1] * 7 + [2] * 3  # the first n % classes classes get one more


def test_choose_refuses_what_a_class_cannot_give():
    keys = [(f"a{i}", 0) for i in range(20)] + [(f"b{i}", 1) for i in range(3)]
    with pytest.raises(SubsetError, match=r"class 1 has 3 sample\(s\), 5 wanted; use at most 6"):
        choose(keys, 10, seed=0)
    with pytest.raises(SubsetError, match="no labelled sample"):
        choose([], 10, seed=0)


def test_subset_of_real_shards_reads_labels_from_headers_and_is_cached(tmp_path):
    from pipeline.data.sources import write_digits

    write_digits(tmp_path / "d", samples_per_shard=400)
    shards = [str(tmp_path / "d" / f"train-{i:06d}.tar") for i in range(4)]
    pairs = [p for s in shards for p in labelled_keys(s)]
    assert len(pairs) == 1497 and {label for _, label in pairs} == set(range(10))
    first = subset_keys(shards, 150, seed=0, runs_root=str(tmp_path / "runs"))
    (cached,) = (tmp_path / "runs" / "subsets").glob("*.json")
    assert subset_keys(shards, 150, seed=0, runs_root=str(tmp_path / "runs")) == first
    assert len(first) == 150 and cached.exists()
    with pytest.raises(SubsetError, match="more than the 1497 labelled train samples"):
        subset_keys(shards, 5000, seed=0, runs_root=str(tmp_path / "runs"))


def test_the_subset_follows_its_own_seed_not_the_training_seed(tmp_path):
    """Runs with other run.seeds fine-tune on the same labels; data.train_subset_seed picks another split."""
    from pipeline.config import load_config
    from pipeline.data.sources import write_digits
    from pipeline.data.subset import maybe_subset

    write_digits(tmp_path / "d", samples_per_shard=400)
    shards = [str(tmp_path / "d" / f"train-{i:06d}.tar") for i in range(4)]

    def keys(*overrides):
        config = load_config(FINETUNE, [f"run.root={tmp_path / 'runs'}", *overrides])
        return maybe_subset(config, shards)

    default = keys()
    assert len(default) == 150
    assert keys("run.seed=1") == keys("run.seed=2") == default
    assert keys("data.train_subset_seed=1") != default
