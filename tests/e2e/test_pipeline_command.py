"""`python -m pipeline pipeline` (make pipeline) locally: pretrain, then fine-tune from that run, in one command,
both nested under one parent MLflow run. One run covers both objectives: an MAE pretraining on unlabelled shards,
then a supervised fine-tune on labelled ones (each stage reads its own shards). (On Slurm the two stages are
chained jobs: tests/slurm/test_slurm.py.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

PRETRAIN_STEPS = 4
FINETUNE_STEPS = 40 // 8  # a 40-image subset, batch 8, one epoch


def test_make_pipeline_pretrains_mae_then_fine_tunes_from_that_run(unlabeled_shards, digits_shards, tmp_path):
    """`make pipeline PRETRAIN_CONFIG=configs/pretrain/digits_mae.yaml FINETUNE_CONFIG=configs/finetune/digits_mae.yaml`
    with the data and sizes of the tests."""
    pretrain_config, finetune_config = tmp_path / "mae.yaml", tmp_path / "finetune.yaml"
    pretrain_config.write_text(
        f"base: {ROOT / 'configs/pretrain/digits_mae.yaml'}\n"
        f"data: {{train_shards: '{unlabeled_shards}/train-{{000000..000003}}.tar', batch_size: 32}}\n"
        "model: {img_size: 16}\n"
        "objective: {decoder_dim: 16, decoder_depth: 1, decoder_heads: 2, pictures: 2}\n"
        f"optim: {{epochs: {PRETRAIN_STEPS * 32 / 1497}, warmup_epochs: 0.01}}\n"
    )
    finetune_config.write_text(
        f"base: {ROOT / 'configs/finetune/digits_mae.yaml'}\n"
        f"data: {{train_shards: '{digits_shards}/train-{{000000..000003}}.tar', train_subset: 40, batch_size: 8}}\n"
        "model: {img_size: 32}\n"
        "optim: {epochs: 1, warmup_epochs: 0.5}\n"
    )
    result = run_cli(
        "pipeline",
        "--pretrain-config",
        str(pretrain_config),
        "--finetune-config",
        str(finetune_config),
        f"data.val_shards={digits_shards}/val-000000.tar",
        "data.num_workers=1",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "deepspeed.precision=fp32",
        "checkpoint.every_steps=0",
        "eval.every_steps=0",
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
    pretrain_summary = json.loads((pretrain / "summary.json").read_text())
    assert pretrain_summary["objective"] == "mae" and pretrain_summary["step"] == PRETRAIN_STEPS
    summary = json.loads((finetune / "summary.json").read_text())
    assert summary["objective"] == "supervised" and summary["step"] == FINETUNE_STEPS
    source = json.loads((finetune / "pretrained.json").read_text())
    assert source["run_dir"] == str(pretrain.resolve()) and source["tag"] == f"step{PRETRAIN_STEPS:08d}"
    report = json.loads((finetune / "adaptation.json").read_text())
    assert any(k.startswith("decoder_") for k in report["dropped"])
    assert report["adapted"][0]["new_shape"] == [1, 65, 32]  # 4x4 patches + cls -> 8x8 + cls

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
