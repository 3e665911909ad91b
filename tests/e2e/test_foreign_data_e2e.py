"""The new user's scenario, end to end through ``make``: shards another tool wrote (directory-prefixed keys, .JPEG and
other suffixes, non-square JPEGs, captions, a corrupt image, a tar cut short, no manifest.json), the brace pattern
passed through the Makefile, indexed locally through ``make shards``, then trained and evaluated over HTTP from a
real server on 127.0.0.1 whose connection for one train shard drops on every try (the shard is given up and its
lost samples counted) and for a val shard once (retried from where it broke, nothing lost), neither
data.train_samples nor model.num_classes given."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.foreign import tar_listing, truncate, write_foreign
from tests.shardserver import ShardServer

pytestmark = pytest.mark.slow

SMALL_RUN = [  # a tiny model, two epochs, a metric every step
    "run.name=foreign", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.batch_size=16",
    "data.num_workers=1", "data.shuffle_buffer=32", "optim.epochs=2", "optim.warmup_epochs=0.5",
    "checkpoint.every_steps=0", "eval.every_steps=0", "tracking.log_every_steps=1",
]  # fmt: skip


def make(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(["make", "-s", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_foreign_shards_train_through_make_without_counts_or_classes(tmp_path):
    train = write_foreign(tmp_path / "x", "train", 8, 24, corrupt=((7, 3),))
    complete = truncate(train.shards[5])
    write_foreign(tmp_path / "web", "val", 2, 20, corrupt=((1, 4),), seed=100)
    pattern = f"{tmp_path}/x/train-{{0000..0007}}.tar"
    expected = [len(tar_listing(p)[1]) if i != 5 else len(complete) for i, p in enumerate(train.shards)]

    # the index, explicitly, through make: its counts are what the tar listings hold
    indexed = make("shards", f"SHARDS_ARGS=--index {shlex.quote(pattern)}")
    assert indexed.returncode == 0, indexed.stderr
    assert indexed.stdout.startswith(f"indexed 8 shard(s) ({sum(expected):,} samples, 10 classes) in "), indexed.stdout
    cache = json.loads((tmp_path / "x" / ".vitpipe-index.json").read_text())["shards"]
    assert [cache[Path(p).name]["samples"] for p in train.shards] == expected
    assert [cache[Path(p).name]["members"] for p in train.shards if p != train.shards[5]] == [
        tar_listing(p)[0] for p in train.shards if p != train.shards[5]
    ]

    with ShardServer(tmp_path) as server:
        # the run indexes the shards over HTTP first (one request each, "ok"), then trains: train-0003 drops on
        # every try and retry (data.shard_retries=1; two streams may read it in one epoch); val-0000 drops once,
        # in the final evaluation (one reader)
        server.faults["x/train-0003.tar"] = ["ok"] + ["drop"] * 40
        server.faults["web/val-0000.tar"] = ["ok", "drop"]
        http_pattern = server.url("x/train-{0000..0007}.tar")
        args = [f"data.train_shards={http_pattern}", f"data.val_shards={server.url('web/val-{0000..0001}.tar')}"]
        args += ["data.shard_retries=1", f"run.root={tmp_path}/runs", *SMALL_RUN]
        twice = make("pretrain", f"ARGS={' '.join(args)} data.batch_size=32")
        result = make("pretrain", f"ARGS={' '.join(args)}")
        requests = {name: list(server.requests[name]) for name in ("x/train-0003.tar", "web/val-0000.tar")}
        dropped, recovered = server.url("x/train-0003.tar"), server.url("web/val-0000.tar")
    errors = [line for line in twice.stderr.splitlines() if line.startswith("error: ")]
    assert twice.returncode == 2 and len(errors) == 1 and "data.batch_size is given 2 times" in errors[0]
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert f"indexed 10 shard(s) ({sum(expected) + 40:,} samples, 10 classes) in " in output  # all over HTTP
    assert "; 1 shard(s) cut short, read up to the break (" in output and "train-0005.tar: " in output

    run = tmp_path / "runs" / "foreign"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["train_samples"] == sum(expected) and config["model"]["num_classes"] == 10
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["val_samples"] == 40 - 1 and summary["final"]["val_skipped"] == 1  # every readable one
    lost = check_http_faults(output, requests, dropped, recovered)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    skipped = sum(m.value for m in client.get_metric_history(run_id, "skipped_samples"))
    assert skipped >= lost + 2, "train-0003.tar's lost samples, the corrupt image, the lost end of train-0005.tar"
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    assert inputs["train"].name == "x/train-{0000..0007}.tar"
    assert json.loads(inputs["train"].source) == {"uri": http_pattern} and inputs["train"].source_type == "http"
    assert json.loads(inputs["train"].profile)["num_rows"] == sum(expected)
    assert inputs["val"].source_type == "http" and json.loads(inputs["val"].profile)["num_rows"] == 40
    lineage = json.loads((run / "datasets.json").read_text())
    assert [d["digest"] for d in lineage] == [inputs["train"].digest, inputs["val"].digest]


def check_http_faults(output: str, requests: dict, dropped: str, recovered: str) -> int:
    """The shards cut short or dropping on every try are named as given up, the one dropping once is resumed with a
    Range request and not given up; returns the samples the dropping train shard (24 of them) did not deliver."""
    assert "train-0005.tar given up after 2 attempts at sample" in output, "the shard cut short is named"
    gave_up = re.search(
        rf"shard {re.escape(dropped)} given up after 2 attempts at sample (\d+): ShardStreamError: [^\n]*? "
        rf"\((\d+) sample\(s\) not read\)",
        output,
    )
    assert gave_up, [line for line in output.splitlines() if "train-0003" in line]
    delivered, lost = int(gave_up[1]), int(gave_up[2])
    assert 0 < delivered < 24 and lost == 24 - delivered, "its undelivered samples, sized by the index"
    assert len(requests["x/train-0003.tar"]) >= 3 and f"{recovered} given up" not in output
    assert re.search(rf"shard {re.escape(recovered)} failed after \d+ sample\(s\) .*; retry 1/1 in ", output)
    index, evaluation, retry = requests["web/val-0000.tar"]  # the retry asks for the rest; val_samples above: all
    assert index is None and evaluation is None and retry.startswith("bytes="), requests["web/val-0000.tar"]
    return lost
