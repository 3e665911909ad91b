"""The pretrained weights in the fine-tune model (every rank), and the lineage that links the runs (rank 0).

Every rank, right after the model is built: the cached weights are adapted to the model (pipeline/model/adapt.py:
position embeddings resampled, head kept or re-initialised) and loaded; rank 0 prints the report and keeps it as
``adaptation.json``. In MLflow the fine-tune run gets the pretraining run's id, checkpoint and adaptation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.files import atomic_write
from pipeline.finetune.resolve import INFO_FILE, adapt_kwargs
from pipeline.rundir import RunDir

log = logging.getLogger("pipeline")


def load_pretrained(model: torch.nn.Module, config: Config, run: RunDir, *, is_main: bool):
    """Load the converted pretrained weights into the freshly built model, adapted to it; returns the
    AdaptationReport. (A resumed run is not given them: its own checkpoint holds the weights.)"""
    from safetensors.torch import load_file

    from pipeline.model.adapt import load_adapted

    weights = Path(config.finetune.weights or "")
    if not weights.is_file():
        raise FileNotFoundError(
            f"finetune.weights={config.finetune.weights}: the converted pretrained weights "
            f"are gone; start the fine-tune again with --pretrained to convert them"
        )
    report = load_adapted(model, load_file(str(weights)), **adapt_kwargs(config))
    if is_main:
        info_file = weights.parent / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        atomic_write(run.pretrained_info, json.dumps(info, indent=2))
        atomic_write(run.adaptation, json.dumps({**report.to_dict(), "pretrained": info}, indent=2))
        log.info("%s\n  (saved as %s)", report.summary(), run.adaptation)
    return report


def log_lineage(tracker, run: RunDir) -> None:
    """Tags and params linking the fine-tune run to its pretraining run, and the adaptation report."""
    info_file, report_file = run.pretrained_info, run.adaptation
    if not info_file.exists():
        return
    info = json.loads(info_file.read_text())
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    lineage = {
        "pretrain_run_id": info.get("mlflow_run_id") or "unknown",
        "pretrain_checkpoint": info["checkpoint"],
        "pretrain_run_dir": info["run_dir"],
        "pretrain_zero_stage": info["zero_stage"],
        "pretrain_world_size": info["world_size"],
    }
    tracker.set_tags(
        {
            **lineage,
            "adaptation": ", ".join(
                f"{len(report.get(k, []))} {k}" for k in ("adapted", "reinitialized", "dropped", "missing")
            ),
        }
    )
    tracker.log_params(lineage)
    tracker.log_datasets(pretraining_datasets(info))
    for path in (info_file, report_file):
        if path.exists():
            tracker.log_artifact(path, "lineage")


def pretraining_datasets(info: dict) -> list[dict]:
    """The pretraining run's training shards as an input of the fine-tune run too (context ``pretrain``), so the
    registered model names all its data. Under its own name: MLflow links a dataset (name + digest) to a run
    once, so the same shards fine-tuned on again would otherwise lose the ``pretrain`` context."""
    return [
        {**d, "name": f"{d['name']} (pretraining)", "context": "pretrain"}
        for d in info.get("datasets") or []
        if d.get("context") == "train"
    ]
