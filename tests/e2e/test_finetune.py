"""Fine-tuning from real pipeline checkpoints: every ZeRO stage converts to the exact fp32 weights; a pretrained
model keeps its accuracy at 2x resolution once its position embeddings are resampled; the fine-tune run is
linked to its pretraining run in MLflow; a bad --pretrained stops before any work with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import cli
from pipeline.config import load_config
from pipeline.data.loader import RankData
from pipeline.data.plan import plan_data
from pipeline.data.transforms import DeviceNormalize
from pipeline.finetune.consolidate import consolidate, load_file
from pipeline.model.adapt import load_adapted
from pipeline.model.factory import create_model
from tests.conftest import ROOT, run_cli

FINETUNE = ROOT / "configs/finetune/digits_vit.yaml"


def data_overrides(shards: Path) -> list[str]:
    return [
        f"data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={shards}/val-000000.tar",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
    ]


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


def _model_states(tag_dir: Path) -> dict:
    return load_file(sorted(tag_dir.glob("*model_states.pt"))[0])


# ----------------------------------------------------------------------------------------------------
# Checkpoint -> weights, for every ZeRO stage


STAGES = {  # name: (zero stage, precision, ranks); ZeRO-0 fp32 is the quick pretraining run further down
    "zero0_bf16": (0, "bf16", 1),
    "zero1_bf16": (1, "bf16", 1),
    "zero2": (2, "fp32", 2),
    "zero3": (3, "fp32", 2),
}
# ZeRO-0 low precision keeps one fp32 master group per optimizer param group, laid out as the run grouped them:
# layer-wise lr decay makes many groups, so that layout is rebuilt from the run's config, not assumed
EXTRA = {"zero0_bf16": ["optim.layer_decay=0.75"]}


@pytest.fixture(scope="module")
def stage_runs(digits_shards, tmp_path_factory):
    """3 optimizer steps of a tiny ViT per ZeRO stage, same seed and data; the final checkpoint of each."""
    root = tmp_path_factory.mktemp("stages")
    tags = {}
    for name, (stage, precision, ranks) in STAGES.items():
        result = run_cli(
            "pretrain",
            *data_overrides(digits_shards),
            "data.batch_size=32",
            "model.embed_dim=32",
            "model.depth=1",
            "model.num_heads=2",
            f"optim.epochs={3 * 32 / 1497}",
            "optim.warmup_epochs=0.01",
            f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={precision}",
            f"launch.nproc={ranks}",
            # no clipping: ZeRO-2 and ZeRO-3 sum the gradient norm in different orders, so a clipped
            # step differs in the last bits (measured: 7e-9) and the bitwise comparison below would
            # test the norm's rounding instead of where each partition goes
            "optim.grad_clip=0",
            "checkpoint.every_steps=0",
            "tracking.enabled=false",
            f"run.root={root}",
            f"run.name={name}",
            *EXTRA.get(name, []),
            cwd=ROOT,
        )
        _ok(result)
        tags[name] = root / name / "checkpoints/step00000003"
    return tags


@pytest.mark.slow
def test_every_zero_stage_converts_to_the_complete_fp32_model(stage_runs):
    config = load_config(
        ROOT / "configs/pretrain/digits_vit.yaml",
        ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.num_classes=10"],
    )
    reference = create_model(config.model, 10).state_dict()
    for name, (stage, precision, ranks) in STAGES.items():
        result = consolidate(stage_runs[name])
        assert (result.zero_stage, result.precision, result.world_size) == (stage, precision, ranks), name
        sd = result.state_dict
        assert list(sd) == list(reference), name
        assert all(sd[k].shape == reference[k].shape and sd[k].dtype == torch.float32 for k in sd), name
        create_model(config.model, 10).load_state_dict(sd, strict=True)


@pytest.mark.slow
def test_converted_weights_are_the_training_weights_of_that_step(stage_runs):
    """fp32 ZeRO-2 keeps the full fp32 weights in the module too: its partitions must reassemble to exactly
    those. bf16 runs keep bf16 module weights: the fp32 masters must round to exactly them (a misplaced
    partition would not). ZeRO-3 keeps no module weights; it computes the same reductions as ZeRO-2, so the
    same 2-rank run must give bit-identical weights."""
    converted = {name: consolidate(tag).state_dict for name, tag in stage_runs.items()}
    module = _model_states(stage_runs["zero2"])["module"]
    for key, value in converted["zero2"].items():
        assert torch.equal(value, module[key]), key
    groups = _model_states(stage_runs["zero0_bf16"])["optimizer"]
    assert len(groups.get("fp32_groups_flat") or groups["fp32_groups"]) > 2, "layer decay: one group per layer"
    for name in ("zero0_bf16", "zero1_bf16"):
        module = _model_states(stage_runs[name])["module"]
        differs = 0
        for key, value in converted[name].items():
            assert module[key].dtype == torch.bfloat16
            assert torch.equal(value.to(torch.bfloat16), module[key]), (name, key)
            differs += not torch.equal(value, module[key].float())
        assert differs > 0, f"{name}: the fp32 masters carry more than the bf16 weights"
    assert _model_states(stage_runs["zero3"])["module"]["pos_embed"].numel() == 0  # only a placeholder
    for key, value in converted["zero3"].items():
        assert torch.equal(value, converted["zero2"][key]), key


# ----------------------------------------------------------------------------------------------------
# A quick pretraining run of the digits demo, used by the functional and lineage tests


PRETRAIN_MODEL = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2"]


def test_a_conversion_another_fine_tune_finished_meanwhile_is_kept(stage_runs, tmp_path, monkeypatch):
    """Fine-tunes started together convert the same checkpoint side by side; the one that finishes second must
    not delete (or fail to replace) the cache the first is already loading."""
    from pipeline.finetune import consolidate as consolidation
    from pipeline.finetune import resolve

    tag, cache, first = stage_runs["zero2"], tmp_path / "cache", {}
    weights = cache / resolve.WEIGHTS_FILE

    def consolidate_while_another_converts(tag_dir):
        result = consolidate(tag_dir)
        monkeypatch.setattr(consolidation, "consolidate", consolidate)
        resolve.convert(tag_dir, cache)  # the other fine-tune, done first
        first["inode"] = weights.stat().st_ino
        return result

    monkeypatch.setattr(consolidation, "consolidate", consolidate_while_another_converts)
    info = resolve.convert(tag, cache)
    assert info["checkpoint"] == str(tag)
    assert weights.stat().st_ino == first["inode"], "the first conversion's files were replaced under its reader"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "a temporary conversion was left behind"


@pytest.fixture(scope="module")
def pretrained(digits_shards, tmp_path_factory):
    """The digits demo ViT made shallow and trained briefly at 32x32 (ZeRO-0 fp32, 1 rank): a real pipeline run,
    also the ZeRO-0 case of the conversion (its converted weights must score exactly the run's final eval)."""
    root = tmp_path_factory.mktemp("runs")
    result = run_cli(
        "pretrain",
        *data_overrides(digits_shards),
        *PRETRAIN_MODEL,
        "data.batch_size=64",
        "optim.epochs=12",
        "optim.warmup_epochs=1",
        "optim.lr=3e-3",
        "augment.scale=[0.25,1]",  # zooms up to 2x: the scale the 64px model sees
        "deepspeed.zero_stage=0",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        "tracking.log_every_steps=50",
        f"run.root={root}",
        "run.name=pre",
        cwd=ROOT,
        timeout=1500,
    )  # ~1 min idle; shared CPUs
    _ok(result)
    return root, root / "pre"


def val_accuracy(model: torch.nn.Module, shards: Path, img_size: int) -> float:
    """Top-1 on the val shards with the pipeline's own eval transform at img_size."""
    config = load_config(FINETUNE, [*data_overrides(shards), f"model.img_size={img_size}"])
    data = RankData(config, plan_data(config, 1), 0, 1, img_size, pin_memory=False)
    normalize = DeviceNormalize(config, torch.device("cpu"))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_batches():
            correct += (model(normalize(batch.images, training=False)).argmax(1) == batch.labels).sum().item()
            total += batch.labels.numel()
    assert total == 300
    return 100.0 * correct / total


@pytest.mark.slow
def test_resampled_position_embeddings_keep_accuracy_at_twice_the_resolution(pretrained, digits_shards):
    """Measured on the quick run (2 busy cores): 54.7% at 32px, 41.3% adapted to 64px (0.76x), 11.3% with fresh
    position embeddings. On the 60-epoch demo run: 97.7%, 84.3% (0.86x), 40.0%."""
    _, run_dir = pretrained
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = consolidate(Path(summary["checkpoint"])).state_dict
    config = load_config(FINETUNE, [*PRETRAIN_MODEL, "model.num_classes=10"])

    config.model.img_size = 32
    at_32 = create_model(config.model, 10)
    at_32.load_state_dict(weights, strict=True)
    acc_32 = val_accuracy(at_32, digits_shards, 32)
    assert acc_32 == pytest.approx(summary["final"]["val_top1"], abs=1e-9), "converted weights = trained weights"

    config.model.img_size = 64
    adapted = create_model(config.model, 10)
    report = load_adapted(adapted, weights, method="bicubic", antialias=False)
    assert [name for name, _, _ in report.adapted] == ["pos_embed"]
    acc_adapted = val_accuracy(adapted, digits_shards, 64)

    fresh = create_model(config.model, 10)
    fresh.load_state_dict({k: v for k, v in adapted.state_dict().items() if k != "pos_embed"}, strict=False)
    acc_fresh = val_accuracy(fresh, digits_shards, 64)
    print(f"val top-1: {acc_32:.1f}% at 32px, {acc_adapted:.1f}% adapted to 64px, {acc_fresh:.1f}% fresh pos_embed")
    assert acc_32 >= 40, "the quick pretraining run itself did not learn"
    assert acc_adapted >= 0.6 * acc_32
    assert acc_fresh <= acc_adapted - 20


# ----------------------------------------------------------------------------------------------------
# A fine-tune run: lineage in MLflow, EMA kept in checkpoints, the model exported and registered


@pytest.fixture(scope="module")
def finetuned(pretrained, digits_shards):
    """Fine-tune of the quick run, named by its MLflow run id: 2 ranks, ZeRO-2, EMA, 3 steps."""
    root, pre = pretrained
    args = [
        "finetune",
        "--config",
        str(FINETUNE),
        "--pretrained",
        (pre / "mlflow_run_id").read_text().strip(),
        *data_overrides(digits_shards),
        *PRETRAIN_MODEL,
        "data.batch_size=64",
        f"optim.epochs={3 * 64 / 1497}",
        "optim.warmup_epochs=0.01",
        "optim.ema_decay=0.9",
        "deepspeed.zero_stage=2",
        "launch.nproc=2",
        "tracking.log_every_steps=1",
        f"run.root={root}",
        "run.name=ft",
    ]
    return root, pre, root / "ft", run_cli(*args, cwd=ROOT)


@pytest.mark.slow
def test_finetune_run_is_linked_to_its_pretraining_run_in_mlflow(finetuned):
    from mlflow.tracking import MlflowClient

    root, pre, run_dir, result = finetuned
    _ok(result)
    pre_id = (pre / "mlflow_run_id").read_text().strip()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["pretrain_run_id"] == pre_id and run.data.params["pretrain_run_id"] == pre_id
    checkpoint = str(Path(json.loads((pre / "summary.json").read_text())["checkpoint"]).resolve())
    assert run.data.tags["pretrain_checkpoint"] == checkpoint == run.data.params["finetune.pretrained"]
    assert (
        run.data.params["finetune.pos_embed_method"] == "bicubic" and run.data.params["finetune.antialias"] == "False"
    )
    assert {"val_top1", "val_top1_ema"} <= set(run.data.metrics)

    artifacts = {a.path for folder in ("", "lineage", "model") for a in client.list_artifacts(run_id, folder or None)}
    assert {
        "lineage/adaptation.json",
        "lineage/pretrained.json",
        "model/model.safetensors",
        "model/model_ema.safetensors",
        "model/config.yaml",
    } <= artifacts
    report = json.loads((run_dir / "adaptation.json").read_text())
    assert report["adapted"] == [{"name": "pos_embed", "old_shape": [1, 65, 64], "new_shape": [1, 257, 64]}]
    assert report["method"] == "bicubic" and report["pretrained"]["mlflow_run_id"] == pre_id

    versions = client.search_model_versions("name='digits_vit-finetuned'")
    assert [(v.run_id, v.source.endswith(f"{run_id}/artifacts/model")) for v in versions] == [(run_id, True)]
    assert run.data.tags["registered_model"] == f"digits_vit-finetuned/{versions[0].version}"

    # the registered model's run names the shards it was fine-tuned on and those its weights were pretrained on
    def inputs(of: str) -> dict:
        return {i.tags[0].value: i.dataset for i in client.get_run(of).inputs.dataset_inputs}

    mine, pretraining = inputs(versions[0].run_id), inputs(pre_id)
    assert set(mine) == {"train", "val", "pretrain"} and set(pretraining) == {"train", "val"}
    assert mine["pretrain"].digest == pretraining["train"].digest
    assert mine["pretrain"].name == pretraining["train"].name + " (pretraining)"
    assert json.loads(mine["train"].profile)["num_rows"] == json.loads(pretraining["train"].profile)["num_rows"]


@pytest.mark.slow
def test_exported_model_is_the_final_checkpoint_with_its_ema(finetuned):
    from safetensors.torch import load_file as load_safetensors

    _, _, run_dir, result = finetuned
    _ok(result)
    model = load_safetensors(str(run_dir / "model/model.safetensors"))
    final = consolidate(run_dir / "checkpoints/step00000003").state_dict
    assert model.keys() == final.keys() and all(torch.equal(model[k], final[k]) for k in model)
    ema = load_safetensors(str(run_dir / "model/model_ema.safetensors"))
    saved = _model_states(run_dir / "checkpoints/step00000003")["ema"]  # in the checkpoint: a resume continues it
    assert ema.keys() == saved.keys() and all(torch.equal(ema[k], saved[k]) for k in ema)
    assert any(not torch.equal(ema[k], model[k]) for k in ema)


# ----------------------------------------------------------------------------------------------------
# Bad --pretrained: one clear error, exit 2, nothing started


def test_bad_pretrained_is_one_error_and_exit_2(tmp_path, digits_shards, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "runs"
    unfinished = tmp_path / "half"
    (unfinished / "checkpoints/step00000005").mkdir(parents=True)  # a save that never completed
    cases = {
        str(tmp_path / "nope"): "no such file or directory",
        str(tmp_path): "is not a pipeline run",
        str(unfinished): "holds no complete checkpoint",
        str(unfinished / "checkpoints/step00000005"): "is incomplete",
        "0123456789abcdef0123456789abcdef": "no such MLflow run",
        None: "no finished pretraining run of 'digits_vit'",
    }
    for pretrained, message in cases.items():
        argv = ["finetune", "--config", str(FINETUNE), *data_overrides(digits_shards), f"run.root={root}"]
        code = cli.main(argv + (["--pretrained", pretrained] if pretrained else []))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (pretrained, err)
        assert err[-1].startswith("error: --pretrained") and message in err[-1], (pretrained, err)
    assert not any(p.name.startswith("finetune-") for p in root.glob("*")), "no run may be created"


@pytest.mark.slow
def test_pretrained_of_another_architecture_is_refused_before_launch(pretrained, digits_shards):
    root, pre = pretrained
    result = run_cli(
        "finetune",
        "--config",
        str(FINETUNE),
        "--pretrained",
        str(pre),
        *data_overrides(digits_shards),
        "model.embed_dim=96",
        "model.depth=2",
        "model.num_heads=2",
        f"run.root={root}",
        cwd=ROOT,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --pretrained") and "does not fit" in last and "blocks.0" in last
    assert not list(root.glob("finetune-*"))
