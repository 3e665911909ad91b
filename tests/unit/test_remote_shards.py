"""Remote shards against a real HTTP server on 127.0.0.1 and real ``pipe:`` commands: they train, evaluate and
index like local ones; a stream that breaks half-way is retried and continues after its last delivered sample (no
sample twice); one that keeps failing (dropped, silent, a command exiting non-zero) is given up, counted and named,
in the loader and in the index alike (only a split none of whose shards can be read stops the run)."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.index import index_shards
from pipeline.data.plan import plan_data
from pipeline.data.reader import ReadPolicy, shard_samples
from pipeline.data.samples import Counter
from tests.conftest import ROOT, run_cli
from tests.foreign import tar_listing, write_foreign
from tests.shardserver import ShardServer

FAST = ReadPolicy(retries=2, timeout_s=5.0, backoff_s=0.01)


@pytest.fixture
def shards(tmp_path):
    return write_foreign(tmp_path / "web", "train", 3, 10)


def read_all(urls, policy=FAST, expected=None):
    counter = Counter()
    keys = [(s["__url__"], s["__key__"]) for s in shard_samples(urls, counter.lost, policy, expected)]
    return keys, counter


def local_keys(shards) -> list[str]:
    return [k for path in shards.shards for k, _ in shards.samples[path]]


def test_http_shards_serve_what_the_local_files_hold(shards):
    with ShardServer(shards.shards[0].rsplit("/", 1)[0]) as server:
        urls = [server.url(Path(p).name) for p in shards.shards]
        keys, counter = read_all(urls)
        indexed = index_shards(urls, runs_root=str(Path(shards.shards[0]).parent.parent / "runs"))
    assert [k for _, k in keys] == local_keys(shards) and counter.skipped == 0
    assert [e["samples"] for e in indexed.entries.values()] == [10, 10, 10]


@pytest.mark.parametrize("ranges", [True, False])
def test_a_dropped_connection_is_retried_from_the_last_delivered_sample(shards, ranges):
    """The server cuts the first request for shard 1 half-way; the retry asks for the rest (Range) or, from a
    server without ranges, skips what was delivered: every sample exactly once, nothing counted as lost."""
    with ShardServer(Path(shards.shards[0]).parent, ranges=ranges) as server:
        server.faults["train-0001.tar"] = ["drop"]
        urls = [server.url(Path(p).name) for p in shards.shards]
        keys, counter = read_all(urls)
        requests = server.requests["train-0001.tar"]
    assert [k for _, k in keys] == local_keys(shards), "no sample twice, none missing"
    assert counter.skipped == 0 and len(requests) == 2 and requests[0] is None
    assert requests[1] is not None and requests[1].startswith("bytes="), "the retry asks for the rest only"


def test_a_shard_that_keeps_dropping_is_given_up_counted_and_named(shards):
    with ShardServer(Path(shards.shards[0]).parent) as server:
        server.faults["train-0001.tar"] = ["drop", "drop", "drop"]
        urls = [server.url(Path(p).name) for p in shards.shards]
        keys, counter = read_all(urls, expected=dict.fromkeys(urls, 10))
        assert len(server.requests["train-0001.tar"]) == 3  # the first try and data.shard_retries=2 more
    got = [k for _, k in keys]
    from_one = [k for u, k in keys if u.endswith("train-0001.tar")]
    assert got[:10] == local_keys(shards)[:10] and got[-10:] == local_keys(shards)[-10:]
    assert 0 < len(from_one) < 10 and len(set(from_one)) == len(from_one), "each delivered once"
    assert counter.skipped == 10 - len(from_one)
    assert (
        "train-0001.tar given up after 3 attempts" in counter.last_error and "connection closed" in counter.last_error
    )


def test_a_shard_that_keeps_dropping_while_indexing_is_lost_named_and_walked_again(shards, tmp_path):
    """Retried like a training stream, then an entry of 0 samples: cached only for the run's own ranks
    (build=False), walked again by the next run."""
    runs = str(tmp_path / "runs")
    with ShardServer(Path(shards.shards[0]).parent) as server:
        server.faults["train-0001.tar"] = ["drop"] * 3  # the first try and FAST's 2 retries
        urls = [server.url(Path(p).name) for p in shards.shards]
        first = index_shards(urls, runs_root=runs, policy=FAST)
        tried = len(server.requests["train-0001.tar"])
        for_ranks = index_shards(urls, runs_root=runs, policy=FAST, build=False, need_labels=False)  # as a rank asks
        again = index_shards(urls, runs_root=runs, policy=FAST)
        requests = server.requests["train-0001.tar"]
    lost = first.entries[urls[1]]
    assert lost["source"] == "lost" and tried == 3
    assert "after 3 attempts" in lost["lost"] and "connection closed" in lost["lost"]
    assert [e["samples"] for e in first.entries.values()] == [10, 0, 10] and first.scanned == 3
    assert [e["samples"] for e in for_ranks.entries.values()] == [10, 0, 10] and for_ranks.scanned == 0
    assert [e["samples"] for e in again.entries.values()] == [10, 10, 10] and again.scanned == 1, "walked again"
    assert len(requests) == 4 and again.entries[urls[1]]["source"] == "tar"


def test_a_run_plans_past_a_shard_it_cannot_index_and_stops_only_when_none_can_be_read(shards, tmp_path):
    with ShardServer(Path(shards.shards[0]).parent) as server:
        server.faults["train-0001.tar"] = ["drop"] * 2  # data.shard_retries=1: every try
        settings = ["data.val_shards=null", "data.batch_size=4"]
        pattern = server.url("train-{0000..0002}.tar")
        typed = [f"data.train_shards={pattern}", "data.shard_retries=1", f"run.root={tmp_path}/runs", *settings]
        plan = plan_data(load_config(None, typed), 1)
        server.faults["train-0002.tar"] = ["drop"]  # the only shard, tried once (data.shard_retries=0)
        only = server.url("train-0002.tar")
        typed = [f"data.train_shards={only}", "data.shard_retries=0", f"run.root={tmp_path}/other", *settings]
        refused = run_cli("pretrain", *typed, cwd=ROOT, timeout=120)  # a fresh run.root: nothing cached
    assert plan.train_samples == 20 and plan.train_counts == (10, 0, 10) and plan.num_classes == 10
    assert (
        f"; 1 shard(s) could not be read, counted as 0 samples, not cached as good: {server.url('train-0001.tar')} "
        "(cannot read it after 2 attempts: ShardStreamError: connection closed after " in plan.notes[-1]
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: data.train_shards: none of its 1 shard(s) could be read to index it ({only}: cannot read it: "
        f"ShardStreamError: connection closed after {refused.stderr.split('connection closed after ')[1].split(' of ')[0]}"
        f" of {Path(shards.shards[2]).stat().st_size:,} bytes of {only}); fix the path, URL or command"
    ]
    assert not [p for p in (tmp_path / "other").glob("*") if p.name != "shard-index"], "no run was created"


def test_pipe_shards_are_indexed_and_evaluated_and_a_failing_command_is_lost_in_both(shards, tmp_path):
    """https:// goes through the same urllib opener as http:// (pipeline/data/remote.py); pipe: has its own."""
    import torch

    from pipeline.data.stream import StreamSpec, make_loader

    good = [f"pipe:cat {shlex.quote(p)}" for p in shards.shards]
    failing = f"pipe:head -c 30000 {shlex.quote(shards.shards[1])}; exit 3"
    indexed = index_shards([good[0], failing, good[2]], runs_root=str(tmp_path / "runs"), policy=FAST)
    entries = list(indexed.entries.values())
    assert [e["samples"] for e in entries] == [10, 0, 10] and [e["members"] for e in entries[::2]] == [
        tar_listing(p)[0] for p in shards.shards[::2]
    ]
    assert entries[1]["source"] == "lost" and "exited with status 3" in entries[1]["lost"]

    spec = StreamSpec(
        (good[0], failing, good[2]), seed=0, rank=0, world=1, workers=1, training=False, batch_size=4, read=FAST,
        num_classes=10, shard_counts=(10, 10, 10),
    )  # fmt: skip
    batches = list(make_loader(spec, lambda im: torch.tensor(im.size)))
    keys = [k for b in batches for k in b.keys]
    from_failing = [k for k in keys if k.startswith("train0001/")]
    assert keys[:10] == [k for k, _ in shards.samples[shards.shards[0]]] and keys[-10:] == local_keys(shards)[-10:]
    assert 0 < len(from_failing) < 10 and len(keys) == 20 + len(from_failing)
    assert sum(b.skipped for b in batches) == 10 - len(from_failing), "the failing command's undelivered samples"
    labels = [int(label) for b in batches for label in b.labels]
    assert labels[:10] == [c for _, c in shards.samples[shards.shards[0]]]


def test_a_silent_server_times_out_instead_of_hanging(shards):
    with ShardServer(Path(shards.shards[0]).parent, stall_s=3.0) as server:
        server.faults["train-0000.tar"] = ["stall", "stall"]
        keys, counter = read_all([server.url("train-0000.tar")], ReadPolicy(retries=1, timeout_s=0.3, backoff_s=0.01))
    assert 0 < len(keys) < 10 and counter.skipped == 1 and "no data for 0.3 s" in counter.last_error


def test_pipe_shards_and_a_command_that_fails_half_way(shards):
    good = [f"pipe:cat {shlex.quote(p)}" for p in shards.shards]
    keys, counter = read_all(good)
    assert [k for _, k in keys] == local_keys(shards) and counter.skipped == 0

    path = shards.shards[1]
    failing = f"pipe:head -c 30000 {shlex.quote(path)}; exit 3"
    keys, counter = read_all([good[0], failing, good[2]], expected={failing: 10})
    from_failing = [k for u, k in keys if u == failing]
    assert 0 < len(from_failing) < 10 and from_failing == [k for k, _ in shards.samples[path]][: len(from_failing)]
    assert counter.skipped == 10 - len(from_failing), "the undelivered samples, each delivered one once"
    assert "exited with status 3" in counter.last_error and "after 3 attempts" in counter.last_error
    assert len(keys) == 20 + len(from_failing)


def test_a_silent_command_times_out_and_is_ended(shards):
    silent = f"pipe:head -c 30000 {shlex.quote(shards.shards[0])}; exec sleep 60"
    keys, counter = read_all([silent], ReadPolicy(retries=1, timeout_s=0.3, backoff_s=0.01))
    assert 0 < len(keys) < 10 and len(set(keys)) == len(keys) and counter.skipped == 1
    assert "no data for 0.3 s from pipe:" in counter.last_error


def test_a_local_file_cut_short_is_not_retried(tmp_path):
    from tests.foreign import truncate

    shards = write_foreign(tmp_path, "t", 1, 10)
    kept = truncate(shards.shards[0])
    keys, counter = read_all(shards.shards, expected={shards.shards[0]: len(kept)})
    assert [k for _, k in keys] == kept and counter.skipped == 1 and "given up at sample" in counter.last_error


def test_the_training_loader_reads_http_shards_in_worker_processes(shards):
    """The whole loader (a worker process, decoding, batching) over HTTP, with a drop on the way."""
    import torch

    from pipeline.data.stream import StreamSpec, make_loader

    with ShardServer(Path(shards.shards[0]).parent) as server:
        server.faults["train-0002.tar"] = ["drop"]
        urls = tuple(server.url(Path(p).name) for p in shards.shards)
        spec = StreamSpec(
            urls, seed=0, rank=0, world=1, workers=1, training=False, batch_size=5, read=FAST, num_classes=10
        )
        batches = list(itertools.islice(make_loader(spec, lambda im: torch.tensor(im.size)), 10))
    assert sum(b.images.shape[0] for b in batches) == 30 and sum(b.skipped for b in batches) == 0
    sizes = sorted(tuple(s) for b in batches for s in b.images.tolist())
    assert len(set(sizes)) > 3 and any(w != h for w, h in sizes), "the varied, non-square images"


def test_retry_and_timeout_settings_are_checked():
    assert load_config(None, ["data.shard_retries=0"]).data.shard_retries == 0
    with pytest.raises(ConfigError, match=r"data\.shard_retries=-1 must be >= 0"):
        load_config(None, ["data.shard_retries=-1"])
    with pytest.raises(ConfigError, match=r"data\.read_timeout_s=0.0 must be > 0"):
        load_config(None, ["data.read_timeout_s=0"])


def test_retries_and_timeouts_may_change_when_a_run_is_resumed():
    from pipeline.rundir import config_differences

    saved = load_config(None, [])
    assert config_differences(saved, load_config(None, ["data.shard_retries=5", "data.read_timeout_s=120"])) == []
    assert config_differences(saved, load_config(None, ["data.batch_size=64"])) == ["data.batch_size"]


def test_the_loader_stops_on_a_label_outside_the_classes_naming_shard_and_sample(tmp_path):
    """Where no index saw the labels (a manifest vouched for them), the loader refuses rather than skips."""
    import torch

    from pipeline.data.samples import LabelError
    from pipeline.data.stream import StreamSpec, make_loader

    shards = write_foreign(tmp_path, "m", 2, 6, label_of=lambda s, i: "12" if (s, i) == (1, 2) else "1")
    spec = StreamSpec(
        tuple(shards.shards), seed=0, rank=0, world=1, workers=0, training=False, batch_size=4, num_classes=10
    )
    with pytest.raises(LabelError, match=r"shard .*m-0001\.tar, sample m0001/000002: class index 12 is out of range; "
                       r"allowed: 0\.\.9 \(model\.num_classes=10\)"):  # fmt: skip
        list(make_loader(spec, lambda im: torch.zeros(3, 2, 2, dtype=torch.uint8)))
