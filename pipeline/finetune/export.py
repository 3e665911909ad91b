"""The end of a fine-tune: the final weights and config as the run's ``model`` artifact, registered in MLflow."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from pipeline.config import Config
from pipeline.rundir import RunDir

log = logging.getLogger("pipeline")

MODEL_DIR = "model"  # the artifact folder (and run_dir/model on disk)


def export_model(config: Config, run: RunDir, tag: str, ema_state: Optional[dict], tracker, final: dict) -> Path:
    """run_dir/model/: the final fp32 weights (from the final checkpoint, so exact for any ZeRO stage and
    precision; under the timm model's names), the EMA weights when kept, and the resolved config; logged as the
    run's ``model`` artifact and registered under finetune.register_as."""
    from pipeline.finetune.consolidate import consolidate, save_safetensors
    from pipeline.train.objectives import backbone_state

    out = run.model_dir
    out.mkdir(exist_ok=True)
    meta = {
        "run_dir": str(run.path),
        "checkpoint": tag,
        "model": config.model.name,
        "img_size": config.model.img_size,
        "num_classes": config.model.num_classes,
    }
    weights = backbone_state(config, consolidate(run.checkpoints / tag).state_dict)
    save_safetensors(weights, out / "model.safetensors", meta)
    if ema_state is not None:
        save_safetensors(
            backbone_state(config, {k: v.float().clone() for k, v in ema_state.items()}),
            out / "model_ema.safetensors",
            meta,
        )
    shutil.copyfile(run.config, out / run.config.name)
    (out / "metrics.json").write_text(json.dumps(final, indent=2))
    for path in sorted(out.iterdir()):
        tracker.log_artifact(path, MODEL_DIR)
    # the tracker sends in the background: the run must exist, and its artifacts should be in the store,
    # before a model version points at them (bounded waits; registration is skipped, not fatal, without an id)
    run_id = tracker.wait_for_run_id(60.0)
    tracker.flush(120.0)
    version = register(config, run_id, run)
    if version:
        tracker.set_tags({"registered_model": f"{config.finetune.register_as}/{version}"})
        log.info("registered %s version %s in MLflow", config.finetune.register_as, version)
    return out


def register(config: Config, run_id: Optional[str], run: RunDir) -> Optional[str]:
    """A model version (source: this run's ``model`` artifact dir) under finetune.register_as; once per run.
    A tracking failure is a warning: the trained model is on disk either way."""
    name = config.finetune.register_as
    if not name or not run_id or not config.tracking.enabled:
        return None
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from pipeline.tracking.store import tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri(config))
        try:
            client.create_registered_model(name, description="fine-tuned by vitpipe (pipeline/finetune/)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if existing:  # a resumed export: the run is registered already
            return str(existing[0].version)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
        info = json.loads(run.pretrained_info.read_text()) if run.pretrained_info.exists() else {}
        tags = {
            "pretrain_run_id": info.get("mlflow_run_id") or "unknown",
            "pretrain_checkpoint": info.get("checkpoint"),
        }
        return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)
    except Exception as exc:
        log.warning(
            "registering the model as %r in MLflow failed (%s: %s); it is in %s",
            name,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
            MODEL_DIR,
        )
        return None
