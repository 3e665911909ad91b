"""Tracking pieces that need no server: the MFU inputs, run names, the tracking settings' checks, a disabled tracker."""

from __future__ import annotations

import time

import pytest

from pipeline.config import Config, ConfigError, load_config
from pipeline.rundir import RunDir
from pipeline.tracking.telemetry import forward_flops_per_image, peak_tflops
from pipeline.tracking.tracker import Tracker, readable_run_name


def test_peak_table_matches_device_names_and_precisions():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA A100 80GB PCIe", "fp32") == 19.5
    assert peak_tflops("NVIDIA A10", "bf16") == 125.0
    assert peak_tflops("NVIDIA A10G", "bf16") is None  # not A10, not A100: unknown rather than wrong
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None and peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert peak_tflops(None, "bf16") is None  # CPU: no MFU


def test_flops_are_counted_for_one_image_without_touching_training_state():
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    model.train()
    assert forward_flops_per_image(model, 8, 3) == 2 * 3 * 8 * 8 * 10  # one multiply-add = 2 FLOPs
    assert model.training


def test_readable_run_name():
    when = time.mktime((2026, 11, 21, 9, 33, 0, 0, 0, -1))
    assert readable_run_name("pretrain", "vit_tiny_patch16_224", 32, when) == "pretrain vit_tiny 32px 2026-11-21 09:33"
    assert readable_run_name("finetune", "swin_base_patch4_window7_224.ms_in22k", 224, when).startswith(
        "finetune swin_base 224px "
    )


def test_tracking_settings_are_checked_with_one_clear_error():
    with pytest.raises(ConfigError, match=r"tracking\.flush_every_s=0.0 must be > 0"):
        load_config(None, ["tracking.flush_every_s=0"])
    with pytest.raises(ConfigError, match=r"tracking\.final_wait_s=-1.0 must be >= 0"):
        load_config(None, ["tracking.final_wait_s=-1"])
    with pytest.raises(
        ConfigError, match=r"tracking\.tracking_uri='localhost:5000' is not an MLflow store URI; use one of http:"
    ):
        load_config(None, ["tracking.tracking_uri=localhost:5000"])


def test_disabled_tracker_writes_nothing(tmp_path):
    config = Config()
    config.tracking.tracking_uri, config.tracking.enabled = "http://127.0.0.1:9", False
    tracker = Tracker(config, tmp_path / "run", enabled=True)
    tracker.log_metrics({"train_loss": 1.0}, 1)
    tracker.finish()
    assert tracker.close() and not RunDir(tmp_path / "run").spool.exists() and not (tmp_path / "run").exists()
