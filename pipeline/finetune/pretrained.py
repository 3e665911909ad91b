"""Fine-tuning from a pretraining checkpoint: find it, convert it once, adapt it on every rank, keep the lineage.

1. CLI process, before any process starts (``resolve_pretrained``): ``--pretrained`` (a run dir, one of its
   ``checkpoints/stepNNNNNNNN`` dirs or an MLflow run id; default: the latest finished pretraining run of
   the config family) -> its newest complete checkpoint -> full fp32 weights (pipeline/weights.py, any ZeRO
   stage) cached as ``<run.root>/pretrained/<run>-<tag>-<hash>/pretrained.safetensors`` + ``pretrained.json``
   (source run, MLflow run id, tag, ZeRO stage). The adaptation is dry-run against the fine-tune model built
   on the meta device, so a checkpoint that does not fit is refused here. Every problem is a ConfigError:
   one line, exit 2, nothing started.
2. Every rank, right after the model is built (``load_pretrained``): the cached weights are adapted to the
   model (pipeline/adapt.py: position embeddings resampled, head kept or re-initialised) and loaded;
   rank 0 prints the report and saves it as ``run_dir/adaptation.json``.
3. Rank 0: lineage tags, params and artifacts in MLflow (``log_lineage``), and at the end the final weights
   with the resolved config as the run's ``model`` artifact, registered as a model version (``export_model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.train import checkpoint as ckpt
from pipeline.config import Config, ConfigError

log = logging.getLogger("pipeline")

CACHE_DIR = "pretrained"
WEIGHTS_FILE = "pretrained.safetensors"
INFO_FILE = "pretrained.json"
REPORT_FILE = "adaptation.json"
MODEL_DIR = "model"
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
WHAT = "give a pretraining run dir, one of its checkpoints/stepNNNNNNNN dirs, or an MLflow run id"


# ----------------------------------------------------------------------------------------------------
# 1. In the CLI process: which checkpoint, converted once


def resolve_pretrained(config: Config, pretrained: Optional[str], family: str) -> None:
    """Fill config.finetune.{pretrained, weights, register_as} from --pretrained; ConfigError when unusable."""
    source = pretrained or config.finetune.pretrained
    tag_dir = find_checkpoint(source, config, family)
    cache = Path(config.run.root) / CACHE_DIR / _cache_name(tag_dir)
    info = convert(tag_dir, cache)
    check_adaptable(config, cache / WEIGHTS_FILE, tag_dir)
    config.finetune.pretrained = str(tag_dir)
    config.finetune.weights = str((cache / WEIGHTS_FILE).resolve())
    if config.finetune.register_as is None:
        config.finetune.register_as = f"{family}-finetuned"
    print(f"pretrained: {tag_dir} (ZeRO-{info['zero_stage']}, {info['world_size']} rank(s), "
          f"MLflow run {info['mlflow_run_id'] or 'unknown'})", file=sys.stderr)


def find_checkpoint(source: Optional[str], config: Config, family: str) -> Path:
    """The complete checkpoint folder --pretrained points at (absolute)."""
    from pipeline.rundir import latest_finished

    if source is None:
        root = Path(config.run.root)
        run = latest_finished(root, "pretrain", family)
        if run is None:
            raise ConfigError(f"--pretrained not given and no finished pretraining run of '{family}' under {root}/ "
                              f"(pretrain-{family}-*/summary.json); run 'make pretrain' first, or {WHAT}")
        return _checkpoint_in(run, f"the latest finished pretraining run {run}")
    path = Path(source)
    if path.exists():
        return _checkpoint_in(path, f"--pretrained {source}")
    if MLFLOW_RUN_ID.fullmatch(source):
        return _checkpoint_in(_run_dir_of(source, config), f"--pretrained {source} (MLflow run)")
    raise ConfigError(f"--pretrained {source}: no such file or directory, and not an MLflow run id "
                      f"(32 hex digits); {WHAT}")


def _checkpoint_in(path: Path, what: str) -> Path:
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file; {WHAT}")
    if path.parent.name == "checkpoints" and path.name.startswith("step"):  # one checkpoint
        if not (path / ckpt.MARKER).exists():
            raise ConfigError(f"{what}: checkpoint {path.name} is incomplete (no {ckpt.MARKER} marker: its save "
                              f"did not finish); give the run dir to use its newest complete checkpoint")
        return path
    ckpt_dir = path if path.name == "checkpoints" else path / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{what}: {path} is not a pipeline run (no checkpoints/ folder in it); {WHAT}")
    tag = ckpt.latest_complete(ckpt_dir)
    if tag is None:
        raise ConfigError(f"{what}: {ckpt_dir} holds no complete checkpoint (none has a {ckpt.MARKER} marker); "
                          f"resume that run first or {WHAT}")
    if not (ckpt_dir.parent / "summary.json").exists():
        print(f"note: {ckpt_dir.parent} has not finished; using its newest complete checkpoint {tag}",
              file=sys.stderr)
    return ckpt_dir / tag


def _run_dir_of(run_id: str, config: Config) -> Path:
    """The run dir an MLflow run was logged from (its run_dir tag) in the project's tracking store."""
    from pipeline.tracking.tracker import tracking_uri

    uri = tracking_uri(config)
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as exc:  # RESOURCE_DOES_NOT_EXIST, or the store is unreachable
        raise ConfigError(f"--pretrained {run_id}: no such MLflow run in {uri} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); {WHAT}") from None
    run_dir = run.data.tags.get("run_dir")
    if not run_dir:
        raise ConfigError(f"--pretrained {run_id}: MLflow run has no run_dir tag (not logged by this pipeline); {WHAT}")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--pretrained {run_id}: its run dir {run_dir} does not exist on this machine; give "
                          f"a copy of it as --pretrained <dir>")
    return Path(run_dir)


def _cache_name(tag_dir: Path) -> str:
    digest = hashlib.sha1(str(tag_dir).encode()).hexdigest()[:8]
    return f"{tag_dir.parent.parent.name}-{tag_dir.name}-{digest}"


def convert(tag_dir: Path, cache: Path) -> dict:
    """Full fp32 weights of the checkpoint as safetensors + pretrained.json, once (reused when cached)."""
    from pipeline.finetune.consolidate import CheckpointError, consolidate, save_safetensors

    info_path = cache / INFO_FILE
    if info_path.exists() and (cache / WEIGHTS_FILE).exists():
        info = json.loads(info_path.read_text())
        if info.get("checkpoint") == str(tag_dir):
            return info
    start = time.perf_counter()
    try:
        result = consolidate(tag_dir)
    except CheckpointError as exc:
        raise ConfigError(f"--pretrained: {exc}") from None
    run_dir = tag_dir.parent.parent
    id_file = run_dir / "mlflow_run_id"
    summary = run_dir / "summary.json"
    info = {"checkpoint": str(tag_dir), "run_dir": str(run_dir), "tag": tag_dir.name, "step": ckpt.step_of(tag_dir.name),
            "mlflow_run_id": id_file.read_text().strip() if id_file.exists() else None,
            "zero_stage": result.zero_stage, "world_size": result.world_size, "precision": result.precision,
            "deepspeed_version": result.ds_version, "tensors": len(result.state_dict),
            "parameters": sum(v.numel() for v in result.state_dict.values()),
            "final_eval": json.loads(summary.read_text()).get("final") if summary.exists() else None}
    tmp = cache.with_name(f".{cache.name}.tmp{time.time_ns()}")
    tmp.mkdir(parents=True)
    save_safetensors(result.state_dict, tmp / WEIGHTS_FILE, metadata={"source": str(tag_dir)})
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.replace(cache)
    print(f"converted {tag_dir} (ZeRO-{result.zero_stage}, {result.world_size} rank(s)) to {cache / WEIGHTS_FILE} "
          f"in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return info


def adapt_kwargs(config: Config) -> dict:
    f = config.finetune
    return {"method": f.pos_embed_method, "antialias": f.antialias, "rel_pos_method": f.rel_pos_method,
            "reinit_head": None if f.reinit_head == "never" else f.reinit_head}


def check_adaptable(config: Config, weights: Path, tag_dir: Path) -> None:
    """Dry-run of the adaptation against the fine-tune model on the meta device (shapes only, no memory):
    a checkpoint of another architecture fails here, not on every rank after launch."""
    from safetensors.torch import load_file

    from pipeline.model.adapt import AdaptationError, adapt_state_dict
    from pipeline.model.factory import create_model

    with torch.device("meta"):
        model = create_model(config.model, config.model.num_classes)
    try:
        _, report = adapt_state_dict(load_file(str(weights)), model, **adapt_kwargs(config))
    except AdaptationError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        raise ConfigError(f"--pretrained {tag_dir} does not fit model.name={config.model.name} as configured "
                          f"(the model section must match the pretraining run's, except img_size/window_size "
                          f"and num_classes): {lines[0]} {'; '.join(lines[1:4])}") from None
    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = {k for k in model.state_dict() if k.startswith(f"{classifier}.")}
    missing = [k for k in report.missing if k not in heads]
    if missing:
        raise ConfigError(f"--pretrained {tag_dir} lacks {len(missing)} tensor(s) the model has, e.g. "
                          f"{missing[:3]}; it is another architecture (compare the model sections)")


# ----------------------------------------------------------------------------------------------------
# 2. On every rank: adapt and load


def load_pretrained(model: torch.nn.Module, config: Config, run_dir: Path, *, is_main: bool):
    """Load the converted pretrained weights into the freshly built model, adapted to it. Skipped when the
    run resumes (its own checkpoint holds the weights). Returns the AdaptationReport, or None."""
    from safetensors.torch import load_file

    from pipeline.model.adapt import load_adapted

    if ckpt.latest_complete(run_dir / "checkpoints") is not None:
        return None
    weights = Path(config.finetune.weights or "")
    if not weights.is_file():
        raise FileNotFoundError(f"finetune.weights={config.finetune.weights}: the converted pretrained weights "
                                f"are gone; start the fine-tune again with --pretrained to convert them")
    report = load_adapted(model, load_file(str(weights)), **adapt_kwargs(config))
    if is_main:
        info_file = weights.parent / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        ckpt.atomic_write(run_dir / INFO_FILE, json.dumps(info, indent=2))
        ckpt.atomic_write(run_dir / REPORT_FILE, json.dumps({**report.to_dict(), "pretrained": info}, indent=2))
        log.info("%s\n  (saved as %s)", report.summary(), run_dir / REPORT_FILE)
    return report


# ----------------------------------------------------------------------------------------------------
# 3. On rank 0: lineage and the final model in MLflow


def log_lineage(tracker, run_dir: Path) -> None:
    """Tags and params linking the fine-tune run to its pretraining run, and the adaptation report."""
    info_file, report_file = run_dir / INFO_FILE, run_dir / REPORT_FILE
    if not info_file.exists():
        return
    info = json.loads(info_file.read_text())
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    lineage = {"pretrain_run_id": info.get("mlflow_run_id") or "unknown", "pretrain_checkpoint": info["checkpoint"],
               "pretrain_run_dir": info["run_dir"], "pretrain_zero_stage": info["zero_stage"],
               "pretrain_world_size": info["world_size"]}
    tracker.set_tags({**lineage, "adaptation": ", ".join(
        f"{len(report.get(k, []))} {k}" for k in ("adapted", "reinitialized", "dropped", "missing"))})
    tracker.log_params(lineage)
    for path in (info_file, report_file):
        if path.exists():
            tracker.log_artifact(path, "lineage")


def export_model(config: Config, run_dir: Path, tag: str, ema, tracker, final: dict) -> Optional[Path]:
    """run_dir/model/: the final fp32 weights (from the final checkpoint, so exact for any ZeRO stage and
    precision), the EMA weights when kept, and the resolved config; logged as the run's ``model`` artifact
    and registered under finetune.register_as."""
    from pipeline.finetune.consolidate import consolidate, save_safetensors

    out = run_dir / MODEL_DIR
    out.mkdir(exist_ok=True)
    meta = {"run_dir": str(run_dir), "checkpoint": tag, "model": config.model.name,
            "img_size": config.model.img_size, "num_classes": config.model.num_classes}
    save_safetensors(consolidate(run_dir / "checkpoints" / tag).state_dict, out / "model.safetensors", meta)
    if ema is not None:
        save_safetensors({k: v.detach().float().cpu().clone() for k, v in ema.module.state_dict().items()},
                         out / "model_ema.safetensors", meta)
    shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    (out / "metrics.json").write_text(json.dumps(final, indent=2))
    for path in sorted(out.iterdir()):
        tracker.log_artifact(path, MODEL_DIR)
    # the tracker may send in the background: the run must exist, and its artifacts should be in the store,
    # before a model version points at them (bounded waits; registration is skipped, not fatal, without an id)
    wait, flush = getattr(tracker, "wait_for_run_id", None), getattr(tracker, "flush", None)
    run_id = wait(60.0) if wait else tracker.run_id
    if flush:
        flush(120.0)
    version = register(config, run_id, run_dir)
    if version:
        tracker.set_tags({"registered_model": f"{config.finetune.register_as}/{version}"})
        log.info("registered %s version %s in MLflow", config.finetune.register_as, version)
    return out


def register(config: Config, run_id: Optional[str], run_dir: Path) -> Optional[str]:
    """A model version (source: this run's ``model`` artifact dir) under finetune.register_as; once per run.
    A tracking failure is a warning: the trained model is on disk either way."""
    name = config.finetune.register_as
    if not name or not run_id or not config.tracking.enabled:
        return None
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from pipeline.tracking.tracker import tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri(config))
        try:
            client.create_registered_model(name, description="fine-tuned by vitpipe (pipeline/finetune.py)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if existing:  # a resumed export: the run is registered already
            return str(existing[0].version)
        run = client.get_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
        info = json.loads((run_dir / INFO_FILE).read_text()) if (run_dir / INFO_FILE).exists() else {}
        tags = {"pretrain_run_id": info.get("mlflow_run_id") or "unknown", "pretrain_checkpoint": info.get("checkpoint")}
        return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)
    except Exception as exc:
        log.warning("registering the model as %r in MLflow failed (%s: %s); it is in %s", name,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", MODEL_DIR)
        return None
