"""Run directories: ``<run.root>/<stage>-<family>-<timestamp>/`` holding the resolved config, checkpoints,
logs and, once finished, ``summary.json``. The same directory means the same run: starting it again
resumes it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from pipeline.config import Config, ConfigError, to_dict, to_yaml
from pipeline.train.trainer import SUMMARY_FILE

# Keys that may differ when a run is continued: they do not change what is computed.
RESUMABLE_DIFFERENCES = ("run.name", "run.stop_at_step", "launch.wait", "launch.cluster", "checkpoint.keep_last",
                         "launch.slurm",  # partition, time limit, profile...: where it runs, not what
                         "tracking.")  # tracking never changes what is computed (parent run, server, intervals...)


def is_complete(run_dir: Path) -> bool:
    return (run_dir / SUMMARY_FILE).exists()


def _flat(config_dict: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config_dict.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Config, new: Config) -> list[str]:
    """Keys whose values differ and that a continued run may not change."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_DIFFERENCES))


def load_saved(run_dir: Path) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / "config.yaml")))


def runs_of(root: Path, stage: str, family: str) -> list[Path]:
    """Run folders of one stage and config family, oldest first."""
    return sorted((p for p in root.glob(f"{stage}-{family}-*") if (p / "config.yaml").exists()),
                  key=lambda p: p.name)


def choose_run_dir(config: Config, family: str) -> tuple[Path, bool]:
    """(run dir, resuming?). An explicit run.name is that folder; otherwise the latest unfinished run of
    this family with the same config is continued, or a new timestamped folder is made."""
    root = Path(config.run.root)
    if config.run.name:
        run_dir = root / config.run.name
        if (run_dir / "config.yaml").exists():
            diff = config_differences(load_saved(run_dir), config)
            if diff:
                raise ConfigError(f"run.name={config.run.name}: that run was made with a different config "
                                  f"({', '.join(diff[:6])}); continue it unchanged or choose a new run.name")
            return run_dir, True
        return run_dir, False
    for run_dir in reversed(runs_of(root, config.run.stage, family)):
        if not is_complete(run_dir) and not config_differences(load_saved(run_dir), config):
            return run_dir, True
        break  # only the latest run is a candidate
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{config.run.stage}-{family}-{stamp}", False


def write_config(run_dir: Path, config: Config) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(to_yaml(config))
    return path


def latest_finished(root: Path, stage: str, family: Optional[str] = None) -> Optional[Path]:
    """The newest finished run of a stage (and family), for chaining fine-tuning after pretraining."""
    pattern = f"{stage}-{family}-*" if family else f"{stage}-*"
    done = [p for p in root.glob(pattern) if is_complete(p)]
    return max(done, key=lambda p: (p / SUMMARY_FILE).stat().st_mtime) if done else None
