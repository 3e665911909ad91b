"""Real 2-process CPU DeepSpeed (ZeRO-2, 2 micro batches per step) runs through the CLI: checkpoint, exact resume
(past a partial checkpoint a killed save left), a changed config refused, the MLflow store."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

TOTAL_STEPS = 8
STOP_AT = 4


def overrides(shards: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """A tiny ViT on digits, 2 ranks x 2 accumulated micro batches of 8, ZeRO-2, 8 steps, loss logged every step."""
    return [
        f"data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={shards}/val-000000.tar",
        "data.batch_size=32",
        "optim.grad_accum_steps=2",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "model.drop_path_rate=0.1",
        "augment.mixup=0.2",  # exercises the main-process RNG too
        f"optim.epochs={TOTAL_STEPS * 32 / 1497}",
        "optim.warmup_epochs=0.05",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=fp32",
        "launch.nproc=2",
        "checkpoint.every_steps=3",
        "eval.every_steps=0",
        "tracking.log_every_steps=1",
        f"run.root={runs}",
        f"run.name={name}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    """An uninterrupted run, and one stopped at step 4 then started again with the same command."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    results["full"] = run_cli("pretrain", *overrides(digits_shards, root, "full"), cwd=ROOT)
    results["first"] = run_cli(
        "pretrain", *overrides(digits_shards, root, "resumed", f"run.stop_at_step={STOP_AT}"), cwd=ROOT
    )
    results["changed"] = run_cli("pretrain", *overrides(digits_shards, root, "resumed", "optim.lr=0.5"), cwd=ROOT)
    partial = root / "resumed/checkpoints" / f"step{STOP_AT + 1:08d}"  # a save killed half-way: no COMPLETE marker
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    results["second"] = run_cli("pretrain", *overrides(digits_shards, root, "resumed"), cwd=ROOT)
    background = overrides(digits_shards, root, "background", "checkpoint.background_write=true")
    results["bg_first"] = run_cli("pretrain", *background, f"run.stop_at_step={STOP_AT}", cwd=ROOT)
    shutil.rmtree(root / "background/checkpoints" / f"step{STOP_AT:08d}", ignore_errors=True)  # resume from step 3
    results["bg_second"] = run_cli("pretrain", *background, cwd=ROOT)
    return root, results


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


def test_uninterrupted_run_completes_with_checkpoints_and_eval(runs):
    root, results = runs
    _ok(results["full"])
    summary = json.loads((root / "full/summary.json").read_text())
    assert summary["step"] == TOTAL_STEPS and summary["world_size"] == 2
    # DeepSpeed's own counters: one optimizer step per 2 micro batches
    assert summary["optimizer_steps"] == TOTAL_STEPS and summary["micro_batches"] == 2 * TOTAL_STEPS
    assert summary["final"]["val_samples"] == 300  # both ranks' val shards, each sample once
    tags = sorted(p.name for p in (root / "full/checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000006", "step00000008"]  # every 3 steps, keep_last=2, and the end
    for tag in tags:
        assert (root / "full/checkpoints" / tag / "COMPLETE").exists()
        assert (root / "full/checkpoints" / tag / "rng_rank00001.pt").exists()
    assert (root / "full/checkpoints/latest").read_text() == "step00000008"
    assert (root / "full/config.yaml").exists()


def test_stopped_run_leaves_a_resumable_checkpoint(runs):
    root, results = runs
    assert results["first"].returncode == 3, results["first"].stderr[-3000:]
    assert "resume" in results["first"].stderr
    assert "resuming pretrain run" in results["second"].stderr
    _ok(results["second"])


def test_a_changed_config_is_refused_and_the_run_left_as_it_was(runs):
    root, results = runs
    changed = results["changed"]
    assert changed.returncode == 2 and "optim.lr" in changed.stderr.strip().splitlines()[-1], changed.stderr[-2000:]
    assert "resumed" in changed.stderr and "lr: 0.5" not in (root / "resumed/config.yaml").read_text()


def test_resumed_run_continues_with_the_uninterrupted_losses(runs):
    root, results = runs
    _ok(results["full"])
    _ok(results["second"])
    assert f"resumed from step{STOP_AT:08d}" in results["second"].stderr, "the partial save is never resumed from"
    assert not (root / "resumed/checkpoints" / f"step{STOP_AT + 1:08d}").exists(), "a partial save is cleaned up"
    summary = json.loads((root / "resumed/summary.json").read_text())  # DeepSpeed restores its step count, and
    assert summary["optimizer_steps"] == TOTAL_STEPS  # this attempt ran 2 micro batches for each remaining step
    assert summary["micro_batches"] == 2 * (TOTAL_STEPS - STOP_AT)
    full = dict(map(tuple, json.loads((root / "full/summary.json").read_text())["loss_history"]))
    resumed = dict(map(tuple, json.loads((root / "resumed/summary.json").read_text())["loss_history"]))
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(STOP_AT + 1, TOTAL_STEPS + 1):  # after the resume: same data, RNG, optimizer state
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert full[TOTAL_STEPS] != full[1]


def test_background_written_checkpoints_resume_to_the_same_losses_and_weights(runs):
    """checkpoint.background_write: stopped at step 4 (the stop waits for the write), resumed from the interval
    checkpoint of step 3 (written in the background while training went on): the uninterrupted run's losses, and
    the checkpoint of step 6 holds the synchronous run's weights, bit for bit, in DeepSpeed's format."""
    import torch

    from pipeline.finetune.consolidate import consolidate

    root, results = runs
    assert results["bg_first"].returncode == 3, results["bg_first"].stderr[-3000:]
    assert "writing in the background" in results["bg_first"].stderr
    _ok(results["bg_second"])
    assert "resumed from step00000003" in results["bg_second"].stderr
    full = dict(map(tuple, json.loads((root / "full/summary.json").read_text())["loss_history"]))
    resumed = dict(map(tuple, json.loads((root / "background/summary.json").read_text())["loss_history"]))
    for step in range(4, TOTAL_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    tag = "step00000006"
    ours, theirs = root / "background/checkpoints" / tag, root / "full/checkpoints" / tag
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())  # no markers left
    a, b = consolidate(ours).state_dict, consolidate(theirs).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optim = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sa, sb = (torch.load(d / optim, weights_only=False)["optimizer_state_dict"] for d in (ours, theirs))
    moments_a, moments_b = sa["base_optimizer_state"]["state"], sb["base_optimizer_state"]["state"]
    assert all(torch.equal(moments_a[i]["exp_avg_sq"], moments_b[i]["exp_avg_sq"]) for i in moments_b)


def test_mlflow_store_holds_one_run_per_pipeline_run_with_params_and_metrics(runs):
    from mlflow.tracking import MlflowClient

    root, results = runs
    _ok(results["second"])
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits_vit")
    found = client.search_runs([experiment.experiment_id])
    by_name = {}
    for run in found:
        by_name.setdefault(Path(run.data.tags["run_dir"]).name, []).append(run)  # run names are for people
    assert sorted(by_name) == ["background", "full", "resumed"] and len(by_name["resumed"]) == 1, (
        "a resume continues its run"
    )
    run = by_name["resumed"][0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.tags["world_size"] == "2" and run.data.tags["restarts"] == "1"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == head and len(head) == 40
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted({m.step for m in losses}) == list(range(1, TOTAL_STEPS + 1))
    for key in ("lr", "grad_norm", "images_per_s", "val_top1", "val_top5", "skipped_samples"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
