"""Data lineage: what the plan says a shard set is (name, digest, source, count), and that it reaches the journal as
MLflow dataset inputs without the training thread waiting (the store side: tests/e2e/test_foreign_data_e2e.py)."""

from __future__ import annotations

import json

from pipeline.config import Config, load_config
from pipeline.data.lineage import dataset_name
from pipeline.data.plan import plan_data
from pipeline.rundir import RunDir
from tests.foreign import write_foreign


def test_dataset_names_are_the_folder_and_the_file_pattern():
    assert dataset_name("data/x/train-{0000..0007}.tar") == "x/train-{0000..0007}.tar"
    assert dataset_name("https://host/bucket/set/val-{00..03}.tar") == "set/val-{00..03}.tar"
    assert dataset_name("pipe:aws s3 cp s3://b/imgs/train-{0..9}.tar -") == "imgs/train-{0..9}.tar"
    assert dataset_name("a/x-{0..1}.tar::b/y-{0..1}.tar") == "a/x-{0..1}.tar (+more)"


def test_the_digest_follows_the_data_not_where_it_is_mounted(tmp_path):
    def train_record(folder):
        config = load_config(None, [f"data.train_shards={folder}/p-{{0000..0002}}.tar", "data.val_shards=null",
                                    "data.batch_size=4"])  # fmt: skip
        return plan_data(config, 1).datasets[0]

    write_foreign(tmp_path / "a", "p", 3, 6)
    write_foreign(tmp_path / "b", "p", 3, 6)  # the same shards elsewhere
    first, copy = train_record(tmp_path / "a"), train_record(tmp_path / "b")
    assert first["digest"] == copy["digest"] and len(first["digest"]) == 16
    assert first["source"] == f"{tmp_path}/a/p-{{0000..0002}}.tar" and first["source_type"] == "local"
    assert first["context"] == "train" and first["profile"]["num_rows"] == 18 and first["profile"]["shards"] == 3
    write_foreign(tmp_path / "b", "p", 3, 5)  # changed data
    assert train_record(tmp_path / "b")["digest"] != first["digest"]


def test_a_shard_is_named_by_its_file_wherever_it_is_served_from():
    from pipeline.data.lineage import shard_file_name

    assert shard_file_name("data/x/train-0003.tar") == "train-0003.tar"
    assert shard_file_name("https://host:8080/b/train-0003.tar?sig=1") == "train-0003.tar"
    assert shard_file_name("pipe:aws s3 cp s3://bucket/x/train-0003.tar -") == "train-0003.tar"
    assert shard_file_name("pipe:gsutil cat gs://bucket/x/train-0003.tar") == "train-0003.tar"


def test_datasets_are_journaled_and_become_mlflow_dataset_inputs(tmp_path):
    from pipeline.finetune.lineage import log_lineage
    from pipeline.tracking.delivery import dataset_inputs
    from pipeline.tracking.tracker import Tracker

    record = {"name": "x/train-{0..7}.tar", "digest": "0123456789abcdef", "source": "data/x/train-{0..7}.tar",
              "source_type": "local", "context": "train", "profile": {"num_rows": 1497, "shards": 8}}  # fmt: skip
    config = Config()
    config.tracking.tracking_uri, config.tracking.flush_every_s = "http://127.0.0.1:9", 3600.0  # never reached
    run = RunDir(tmp_path / "run")
    tracker = Tracker(config, run.path, enabled=True)
    run.pretrained_info.write_text(
        json.dumps({"checkpoint": "c", "run_dir": "r", "zero_stage": 1, "world_size": 1, "datasets": [record]})
    )
    tracker.log_datasets([record, {**record, "context": "val", "name": "x/val"}])
    log_lineage(tracker, run)
    journal = [json.loads(line) for line in run.spool.read_text().splitlines()]
    sent = [r["values"] for r in journal if r["t"] == "datasets"]
    tracker.close(wait_s=0)
    assert [[d["context"] for d in group] for group in sent] == [["train", "val"], ["pretrain"]]
    assert sent[1][0]["name"] == "x/train-{0..7}.tar (pretraining)" and sent[1][0]["digest"] == record["digest"]

    (entity,) = dataset_inputs([record])
    assert entity.dataset.name == record["name"] and entity.dataset.digest == record["digest"]
    assert json.loads(entity.dataset.source) == {"uri": record["source"]}
    assert json.loads(entity.dataset.profile)["num_rows"] == 1497
    assert [(t.key, t.value) for t in entity.tags] == [("mlflow.data.context", "train")]
