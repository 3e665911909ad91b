"""`python -m pipeline pipeline` (make pipeline) locally: pretrain, then fine-tune from that run, in one command,
both nested under one parent MLflow run. (On Slurm the two stages are chained jobs: tests/slurm/test_slurm.py.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

STEPS = 4


def test_pipeline_pretrains_then_fine_tunes_from_that_run(digits_shards, tmp_path):
    result = run_cli(
        "pipeline",
        f"data.train_shards={digits_shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={digits_shards}/val-000000.tar",
        "data.batch_size=32",
        "data.num_workers=0",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        f"optim.epochs={STEPS * 32 / 1497}",
        "optim.warmup_epochs=0.05",
        "deepspeed.precision=fp32",
        "checkpoint.every_steps=0",
        "launch.nproc=1",
        f"run.root={tmp_path}",
        "run.name=p",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    pretrain, finetune = tmp_path / "p-pretrain", tmp_path / "p-finetune"
    assert (
        result.stderr.index(f"new pretrain run: {pretrain}")
        < result.stderr.index(f"finished: {pretrain}")
        < result.stderr.index("new finetune run")
    )
    assert json.loads((pretrain / "summary.json").read_text())["step"] == STEPS
    assert json.loads((finetune / "summary.json").read_text())["step"] == STEPS
    source = json.loads((finetune / "pretrained.json").read_text())
    assert source["run_dir"] == str(pretrain.resolve()) and source["tag"] == f"step{STEPS:08d}"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_stage = {run.data.tags.get("stage"): run for run in runs}
    assert sorted(by_stage) == ["finetune", "pipeline", "pretrain"] and len(runs) == 3
    parent = by_stage["pipeline"]
    for stage in ("pretrain", "finetune"):
        assert by_stage[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert by_stage[stage].info.status == "FINISHED", stage
    assert parent.info.status == "FINISHED", "the last stage ends the pipeline run"
