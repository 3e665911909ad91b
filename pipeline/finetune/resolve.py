"""Which pretraining checkpoint a fine-tune starts from, converted once to full fp32 weights, checked to fit.

Runs in the CLI process before any rank starts (or, for a fine-tune chained after its pretraining job, once in
that job: pipeline/finetune/hooks.py): ``--pretrained`` (a run dir, one of its ``checkpoints/stepNNNNNNNN``
dirs or an MLflow run id; default: the latest finished pretraining run of the config family) -> its newest
complete checkpoint -> full fp32 weights (pipeline/finetune/consolidate.py, any ZeRO stage, any world size),
mapped to the timm model's keys by the pretraining objective, cached as
``<run.root>/pretrained/<run>-<tag>-<hash>/pretrained.safetensors`` + ``pretrained.json``. The adaptation is
dry-run against the fine-tune model on the meta device. Every problem is a ConfigError: one line, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.config import Config, ConfigError, from_yaml_file
from pipeline.files import temp_path
from pipeline.rundir import RunDir, RunsRoot
from pipeline.train import checkpoint as ckpt

WEIGHTS_FILE = "pretrained.safetensors"
INFO_FILE = "pretrained.json"
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
WHAT = "give a pretraining run dir, one of its checkpoints/stepNNNNNNNN dirs, or an MLflow run id"


def resolve_pretrained(config: Config, pretrained: Optional[str], family: Optional[str]) -> None:
    """Fill config.finetune.{pretrained, weights, register_as} from --pretrained; ConfigError when unusable."""
    source = pretrained or config.finetune.pretrained
    tag_dir = find_checkpoint(source, config, family)
    cache = RunsRoot(config.run.root).pretrained_cache / _cache_name(tag_dir)
    info = convert(tag_dir, cache)
    check_adaptable(config, cache / WEIGHTS_FILE, tag_dir)
    config.finetune.pretrained = str(tag_dir)
    config.finetune.weights = str((cache / WEIGHTS_FILE).resolve())
    if config.finetune.register_as is None and family:
        config.finetune.register_as = f"{family}-finetuned"
    print(
        f"pretrained: {tag_dir} (ZeRO-{info['zero_stage']}, {info['world_size']} rank(s), "
        f"MLflow run {info['mlflow_run_id'] or 'unknown'})",
        file=sys.stderr,
    )


def find_checkpoint(source: Optional[str], config: Config, family: Optional[str]) -> Path:
    """The complete checkpoint folder --pretrained points at (absolute)."""
    if source is None:
        root = Path(config.run.root)
        run = RunsRoot(root).latest_finished("pretrain", family)
        if run is None:
            raise ConfigError(
                f"--pretrained not given and no finished pretraining run of '{family}' under {root}/ "
                f"(pretrain-{family}-*/summary.json); run 'make pretrain' first, or {WHAT}"
            )
        return _checkpoint_in(run.path, f"the latest finished pretraining run {run}")
    path = Path(source)
    if path.exists():
        return _checkpoint_in(path, f"--pretrained {source}")
    if MLFLOW_RUN_ID.fullmatch(source):
        return _checkpoint_in(_run_dir_of(source, config), f"--pretrained {source} (MLflow run)")
    raise ConfigError(
        f"--pretrained {source}: no such file or directory, and not an MLflow run id (32 hex digits); {WHAT}"
    )


def _checkpoint_in(path: Path, what: str) -> Path:
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file; {WHAT}")
    checkpoints = RunDir(path.parent.parent).checkpoints.name
    if path.parent.name == checkpoints and path.name.startswith("step"):  # one checkpoint
        if not (path / ckpt.MARKER).exists():
            raise ConfigError(
                f"{what}: checkpoint {path.name} is incomplete (no {ckpt.MARKER} marker: its save "
                f"did not finish); give the run dir to use its newest complete checkpoint"
            )
        return path
    ckpt_dir = path if path.name == checkpoints else RunDir(path).checkpoints
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{what}: {path} is not a pipeline run (no checkpoints/ folder in it); {WHAT}")
    tag = ckpt.latest_complete(ckpt_dir)
    if tag is None:
        raise ConfigError(
            f"{what}: {ckpt_dir} holds no complete checkpoint (none has a {ckpt.MARKER} marker); "
            f"resume that run first or {WHAT}"
        )
    if not RunDir(ckpt_dir.parent).is_complete():
        print(f"note: {ckpt_dir.parent} has not finished; using its newest complete checkpoint {tag}", file=sys.stderr)
    return ckpt_dir / tag


def _run_dir_of(run_id: str, config: Config) -> Path:
    """The run dir an MLflow run was logged from (its run_dir tag) in the project's tracking store."""
    from pipeline.tracking.store import tracking_uri

    uri = tracking_uri(config)
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as exc:  # RESOURCE_DOES_NOT_EXIST, or the store is unreachable
        raise ConfigError(
            f"--pretrained {run_id}: no such MLflow run in {uri} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); {WHAT}"
        ) from None
    run_dir = run.data.tags.get("run_dir")
    if not run_dir:
        raise ConfigError(f"--pretrained {run_id}: MLflow run has no run_dir tag (not logged by this pipeline); {WHAT}")
    if not Path(run_dir).is_dir():
        raise ConfigError(
            f"--pretrained {run_id}: its run dir {run_dir} does not exist on this machine; give "
            f"a copy of it as --pretrained <dir>"
        )
    return Path(run_dir)


def _cache_name(tag_dir: Path) -> str:
    digest = hashlib.sha1(str(tag_dir).encode()).hexdigest()[:8]
    return f"{tag_dir.parent.parent.name}-{tag_dir.name}-{digest}"


def convert(tag_dir: Path, cache: Path) -> dict:
    """Full fp32 weights of the checkpoint as safetensors + pretrained.json, once (reused when cached)."""
    from pipeline.finetune.consolidate import CheckpointError, consolidate, save_safetensors

    cached = _cached_conversion(cache, tag_dir)
    if cached is not None:
        return cached
    start = time.perf_counter()
    try:
        result = consolidate(tag_dir)
    except CheckpointError as exc:
        raise ConfigError(f"--pretrained: {exc}") from None
    run = RunDir(tag_dir.parent.parent)
    state_dict = _backbone_state(run, result.state_dict)
    info = {
        "checkpoint": str(tag_dir),
        "run_dir": str(run.path),
        "tag": tag_dir.name,
        "step": ckpt.step_of(tag_dir.name),
        "mlflow_run_id": run.mlflow_run_id.read_text().strip() if run.mlflow_run_id.exists() else None,
        "zero_stage": result.zero_stage,
        "world_size": result.world_size,
        "precision": result.precision,
        "deepspeed_version": result.ds_version,
        "tensors": len(state_dict),
        "parameters": sum(v.numel() for v in state_dict.values()),
        "final_eval": run.read_summary().get("final") if run.is_complete() else None,
        "datasets": json.loads(run.datasets.read_text()) if run.datasets.exists() else [],  # its data lineage
    }
    tmp = temp_path(cache)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(state_dict, tmp / WEIGHTS_FILE, metadata={"source": str(tag_dir)})
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    # fine-tunes started together convert the same checkpoint side by side: the first one's cache stays (another
    # may be reading it); only a cache of another checkpoint is replaced
    if _cached_conversion(cache, tag_dir) is None:
        shutil.rmtree(cache, ignore_errors=True)
        try:
            tmp.replace(cache)
        except OSError:  # another conversion landed in between
            if _cached_conversion(cache, tag_dir) is None:
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"converted {tag_dir} (ZeRO-{result.zero_stage}, {result.world_size} rank(s)) to {cache / WEIGHTS_FILE} "
        f"in {time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return info


def _cached_conversion(cache: Path, tag_dir: Path) -> dict | None:
    """The info of a complete conversion of ``tag_dir`` in ``cache``, if there is one."""
    try:
        info = json.loads((cache / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("checkpoint") == str(tag_dir) and (cache / WEIGHTS_FILE).exists() else None


def _backbone_state(run: RunDir, state_dict: dict) -> dict:
    """The trained module's weights under the timm model's names, as the pretraining objective maps them."""
    from pipeline.train.objectives import backbone_state

    config = from_yaml_file(run.config) if run.config.exists() else None
    return backbone_state(config, state_dict)


def adapt_kwargs(config: Config) -> dict:
    f = config.finetune
    return {
        "method": f.pos_embed_method,
        "antialias": f.antialias,
        "rel_pos_method": f.rel_pos_method,
        "reinit_head": None if f.reinit_head == "never" else f.reinit_head,
    }


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
        raise ConfigError(
            f"--pretrained {tag_dir} does not fit model.name={config.model.name} as configured "
            f"(the model section must match the pretraining run's, except img_size/window_size "
            f"and num_classes): {lines[0]} {'; '.join(lines[1:4])}"
        ) from None
    classifier = model.pretrained_cfg.get("classifier") or "head"
    fresh = (f"{classifier}.", "fc_norm.")  # a new head; global_pool=avg's norm after pooling (MAE fine-tuning)
    missing = [k for k in report.missing if not k.startswith(fresh)]
    if missing:
        raise ConfigError(
            f"--pretrained {tag_dir} lacks {len(missing)} tensor(s) the model has, e.g. "
            f"{missing[:3]}; it is another architecture (compare the model sections)"
        )
