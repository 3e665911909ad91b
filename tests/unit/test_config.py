"""Config errors are caught before any work starts, with the key named, exit code 2."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config, to_yaml
from pipeline.train.engine import deepspeed_config
from tests.conftest import ROOT, run_cli

DEMO = ROOT / "configs/pretrain/digits_vit.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], r"optim\.lrr.*Did you mean.*lr"),
    (["optim.lr=fast"], r"optim\.lr.*could not be converted"),
    (["data.batch_size=100", "launch.nproc=3"], r"data\.batch_size=100.*world size 3.*multiple of 3"),
    (["data.batch_size=64", "launch.nproc=2", "optim.grad_accum_steps=3"], r"multiple of 6"),
    (["deepspeed.zero_stage=4"], r"deepspeed\.zero_stage=4.*0, 1, 2, 3"),
    (["deepspeed.precision=fp8"], r"deepspeed\.precision.*fp32, bf16, fp16"),
    (["optim.warmup_epochs=70"], r"optim\.warmup_epochs=70.*below optim\.epochs=60"),
    (["model.name=vit_gigantic_banana"], r"model\.name='vit_gigantic_banana' is not a timm model; e\.g\. vit_"),
    (["launch.cluster=k8s"], r"launch\.cluster='k8s'.*local, slurm, auto"),
    (["data.resampled=true"], r"data\.samples_per_epoch"),
    (["launch.cluster=slurm", "launch.gpus_per_node=8", "launch.tasks_per_node=4"], r"tasks_per_node=4.*gpus_per_node=8"),
    (["optim.lr"], r"not key=value"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, overrides)


def test_yaml_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.5\n  epochs: 10\nmodel:\n  depth: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  epochs: 20\n")
    config = load_config(tmp_path / "child.yaml", ["model.depth=[2,2,6,2]"])
    assert config.optim.lr == 0.5 and config.optim.epochs == 20 and list(config.model.depth) == [2, 2, 6, 2]
    (tmp_path / "typo.yaml").write_text("base: base.yaml\noptimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*optimizer"):
        load_config(tmp_path / "typo.yaml")


def test_deepspeed_json_is_derived_from_the_typed_config():
    config = load_config(DEMO, ["data.batch_size=96", "launch.nproc=2", "optim.grad_accum_steps=3",
                                "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "optim.grad_clip=0.5"])
    ds = deepspeed_config(config, 2)
    assert ds["train_batch_size"] == 96 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    with pytest.raises(ConfigError, match="world size 5"):
        deepspeed_config(config, 5)  # the real world size is checked again at start


def test_every_shipped_config_is_valid():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.parent.name == "cluster":
            continue
        text = to_yaml(load_config(path))
        assert "model:" in text, path


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    result = run_cli("pretrain", "--config", str(DEMO), "data.batch_size=100", "launch.nproc=3",
                     f"run.root={tmp_path}/runs", cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.batch_size=100")
    assert not (tmp_path / "runs").exists(), "nothing may be created for a rejected config"


def test_cli_rejects_missing_shards(tmp_path):
    result = run_cli("pretrain", f"data.train_shards={tmp_path}/none-{{0..3}}.tar", cwd=ROOT)
    assert result.returncode == 2 and "data.train_shards" in result.stderr and "make shards" in result.stderr


def test_cli_help():
    for command in ("pretrain", "finetune", "shards", "ui"):
        result = run_cli(command, "--help", cwd=ROOT)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), command
