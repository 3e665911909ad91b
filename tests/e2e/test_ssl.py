"""Self-supervised pretraining through the CLI with real DeepSpeed processes: MAE on unlabelled shards (2 ranks,
ZeRO-2, 2 micro batches per step) stopped and resumed to the uninterrupted losses, its k-NN probe and picture in
MLflow, a fine-tune from it (decoder dropped, pos_embed resampled), MAE under ZeRO-3,
SimMIM with a Swin, and a supervised run refused on unlabelled shards. (`make pipeline` with MAE:
tests/e2e/test_pipeline_command.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

TOTAL_STEPS = 6
STOP_AT = 3
MAE_CONFIG = "configs/pretrain/digits_mae.yaml"


def tiny(unlabeled: Path, labelled: Path, runs: Path, name: str, *extra: str, steps: int = TOTAL_STEPS) -> list[str]:
    """A 16 px, 1-block ViT with a 1-block decoder, global batch 32; val: the labelled digits (k-NN, picture)."""
    return [
        "--config",
        MAE_CONFIG,
        f"data.train_shards={unlabeled}/train-{{000000..000003}}.tar",
        f"data.val_shards={labelled}/val-000000.tar",
        "data.batch_size=32",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "model.img_size=16",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "objective.decoder_dim=16",
        "objective.decoder_depth=1",
        "objective.decoder_heads=2",
        "objective.pictures=4",
        f"optim.epochs={steps * 32 / 1497}",
        "optim.warmup_epochs=0.01",
        "deepspeed.precision=fp32",
        "checkpoint.every_steps=3",
        "eval.every_steps=3",
        "tracking.log_every_steps=1",
        f"run.root={runs}",
        f"run.name={name}",
        *extra,
    ]


ZERO2 = ("launch.nproc=2", "deepspeed.zero_stage=2", "optim.grad_accum_steps=2")


@pytest.fixture(scope="module")
def mae_runs(unlabeled_shards, digits_shards, tmp_path_factory):
    """An uninterrupted MAE run, one stopped at step 3 and started again, and a fine-tune of the first at 32 px."""
    root = tmp_path_factory.mktemp("ssl_runs")

    def pretrain(name, *extra):
        return run_cli("pretrain", *tiny(unlabeled_shards, digits_shards, root, name, *ZERO2, *extra), cwd=ROOT)

    results = {
        "full": pretrain("full"),
        "first": pretrain("resumed", f"run.stop_at_step={STOP_AT}"),
        "second": pretrain("resumed"),
    }
    results["finetune"] = run_cli(
        "finetune",
        "--config",
        "configs/finetune/digits_mae.yaml",
        "--pretrained",
        str(root / "full"),
        f"data.train_shards={digits_shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={digits_shards}/val-000000.tar",
        "data.train_subset=40",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.shuffle_buffer=40",
        "model.img_size=32",  # the 4x4 patch grid of pretraining becomes 8x8
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "deepspeed.precision=fp32",
        "eval.every_steps=0",
        f"run.root={root}",
        "run.name=finetune",
        cwd=ROOT,
    )
    return root, results


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


def _losses(run_dir: Path) -> dict[int, float]:
    return dict(map(tuple, json.loads((run_dir / "summary.json").read_text())["loss_history"]))


def test_mae_resumed_run_continues_with_the_uninterrupted_losses(mae_runs):
    """The masks of a step are the same after a resume (drawn from seed, step, micro batch and rank)."""
    root, results = mae_runs
    _ok(results["full"])
    assert results["first"].returncode == 3, results["first"].stderr[-3000:]
    _ok(results["second"])
    assert f"resumed from step{STOP_AT:08d}" in results["second"].stderr
    full, resumed = _losses(root / "full"), _losses(root / "resumed")
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert full[TOTAL_STEPS] < full[1], "the reconstruction loss falls"
    summary = json.loads((root / "full/summary.json").read_text())
    assert summary["objective"] == "mae" and summary["world_size"] == 2
    assert summary["optimizer_steps"] == TOTAL_STEPS and summary["micro_batches"] == 2 * TOTAL_STEPS


def test_mae_run_logs_knn_reconstruction_loss_and_pictures(mae_runs):
    from mlflow.tracking import MlflowClient

    root, results = mae_runs
    _ok(results["full"])
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits_mae")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["run_dir"].endswith("full")]
    assert run.data.tags["objective"] == "mae" and run.data.params["objective.name"] == "mae"
    knn = client.get_metric_history(run.info.run_id, "val_knn_top1")
    assert sorted(m.step for m in knn) == [0, 3, 6]  # at random init, mid-way, the end
    assert all(0 <= m.value <= 100 for m in knn)
    recon = client.get_metric_history(run.info.run_id, "val_recon_loss")
    assert sorted(m.step for m in recon) == [0, 3, 6] and all(m.value > 0 for m in recon)
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {f"pictures/reconstruction_step{s:08d}.png" for s in (0, 3, 6)}
    from PIL import Image

    grid = Image.open(root / "full/pictures/reconstruction_step00000006.png")
    assert grid.size == (4 * 18, 3 * 18)  # 4 val images of 16 px framed, rows: original, masked, reconstructed


def test_finetune_from_mae_drops_the_decoder_resamples_pos_embed_and_trains(mae_runs):
    root, results = mae_runs
    _ok(results["finetune"])
    report = json.loads((root / "finetune/adaptation.json").read_text())
    dropped = set(report["dropped"])
    assert "mask_token" in dropped and any(k.startswith("decoder_") for k in dropped)
    assert not any(k.startswith("encoder.") for k in dropped), "the encoder loads under the timm model's names"
    (adapted,) = report["adapted"]
    assert adapted["name"] == "pos_embed" and adapted["new_shape"] == [1, 65, 32]  # 4x4 + cls -> 8x8 + cls
    assert set(report["missing"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    summary = json.loads((root / "finetune/summary.json").read_text())
    assert summary["objective"] == "supervised" and summary["final"]["val_samples"] == 300
    assert summary["step"] == 2 * (40 // 8)  # 2 epochs of the 40-image subset


def test_mae_under_zero3_and_simmim_with_swin_train(unlabeled_shards, digits_shards, tmp_path):
    """ZeRO-3 gathers the encoder's tokens and position embeddings although the ViT's own forward never runs
    (registered as external parameters); SimMIM puts its mask token into a timm Swin, here in bf16 (DeepSpeed's
    bf16 optimizer with fp32 masters)."""
    mae = run_cli(
        "pretrain",
        *tiny(
            unlabeled_shards,
            digits_shards,
            tmp_path,
            "zero3",
            "launch.nproc=2",
            "deepspeed.zero_stage=3",
            steps=2,
        ),
        cwd=ROOT,
    )
    _ok(mae)
    simmim = run_cli(
        "pretrain",
        "--config",
        "configs/pretrain/digits_simmim_swin.yaml",
        f"data.train_shards={unlabeled_shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={digits_shards}/val-000000.tar",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.shuffle_buffer=32",
        "model.embed_dim=16",
        "model.depth=[1,1]",
        "model.num_heads=[1,2]",
        "optim.epochs=0.03",
        "optim.warmup_epochs=0.01",
        "eval.every_steps=0",
        "deepspeed.precision=bf16",
        f"run.root={tmp_path}",
        "run.name=simmim",
        cwd=ROOT,
    )
    _ok(simmim)
    for name in ("zero3", "simmim"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["step"] >= 1 and "val_knn_top1" in summary["final"], name
    simmim_summary = json.loads((tmp_path / "simmim/summary.json").read_text())
    assert simmim_summary["objective"] == "simmim" and all(
        math.isfinite(loss) for _, loss in simmim_summary["loss_history"]
    )


def test_a_supervised_run_on_unlabelled_shards_is_refused(unlabeled_shards, tmp_path):
    result = run_cli(
        "pretrain",
        f"data.train_shards={unlabeled_shards}/train-{{000000..000003}}.tar",
        f"run.root={tmp_path}",
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "hold no labels" in last and "objective.name=mae" in last
    assert not any(tmp_path.iterdir()), "nothing was started"
