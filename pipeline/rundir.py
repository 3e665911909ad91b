"""The run folder: every path of ``<run.root>/<stage>-<family>-<timestamp>/``, and which folder a command uses.

The same folder means the same run: starting it again resumes it. This module is the only place that spells
the layout; everything else asks a ``RunDir`` (or ``RunsRoot`` for what sits beside the runs).

    config.yaml            the resolved config (the run's identity: a changed config is refused on resume)
    checkpoints/stepN/     DeepSpeed checkpoints; only those with a COMPLETE marker are used
    logs/rankN.log         ranks other than 0 (local launcher)
    heartbeat/rankN.json   each rank's progress, read by the hang watchdog (launch/watchdog.py)
    failures.jsonl         the cause of each failed attempt (automatic retries, launch.max_failures)
    slurm/                 submitit's pickles and logs, status.json (Slurm launcher)
    train_log.jsonl        one line per log step (loss, lr, ...): the loss curve, kept out of checkpoints
    summary.json           written once the run is complete
    mlflow_run_id, tracking_spool.*   the MLflow run and its journal (pipeline/tracking/)
    datasets.json          the shard sets (train, val) as logged to MLflow: name, source, digest, samples
    pretrained.json, adaptation.json, model/   fine-tuning: lineage and the exported model
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from pipeline.config import Config, ConfigError, flatten, from_yaml_file, to_dict, to_yaml
from pipeline.files import atomic_write

EXIT_RESUMABLE = 3  # a run (or rank) that stopped on request after saving a checkpoint: start it again to resume

# Keys that may differ when a run is continued: they do not change what is computed.
RESUMABLE_DIFFERENCES = (
    "run.name",
    "run.stop_at_step",
    "launch.wait",
    "launch.cluster",
    "checkpoint.keep_last",
    "launch.slurm",  # partition, time limit, profile...: where it runs, not what
    "launch.hang_timeout_s",  # how faults are handled, not what is computed
    "launch.startup_grace_s",
    "launch.heartbeat_s",
    "launch.max_failures",
    "launch.nproc",  # the world size: a run resumes on another (elastic, pipeline/train/checkpoint.py)
    "launch.nodes",
    "launch.gpus_per_node",
    "launch.tasks_per_node",
    "deepspeed.zero_stage",  # between ZeRO-1 and 2 on any world size; checked at resume
    "data.shard_retries",  # how hard remote shards are tried (a flaky store may need more on the next attempt)
    "data.read_timeout_s",
    "tracking.",  # tracking never changes what is computed (parent run, server, intervals...)
)


class RunDir:
    """One run's folder and the names of everything in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # the layout
    config = property(lambda self: self.path / "config.yaml")
    checkpoints = property(lambda self: self.path / "checkpoints")
    logs = property(lambda self: self.path / "logs")
    slurm = property(lambda self: self.path / "slurm")
    summary = property(lambda self: self.path / "summary.json")
    train_log = property(lambda self: self.path / "train_log.jsonl")
    restarts = property(lambda self: self.path / "restarts")
    mlflow_run_id = property(lambda self: self.path / "mlflow_run_id")
    spool = property(lambda self: self.path / "tracking_spool.jsonl")
    spool_sent = property(lambda self: self.path / "tracking_spool.sent")
    spool_lock = property(lambda self: self.path / "tracking_spool.jsonl.lock")
    datasets = property(lambda self: self.path / "datasets.json")  # the data lineage logged to MLflow
    pretrained_info = property(lambda self: self.path / "pretrained.json")
    adaptation = property(lambda self: self.path / "adaptation.json")
    pretrained_ready = property(lambda self: self.path / "pretrained.ready")
    model_dir = property(lambda self: self.path / "model")
    heartbeats = property(lambda self: self.path / "heartbeat")  # rankNNNNN.json: each rank's progress
    failures = property(lambda self: self.path / "failures.jsonl")  # one line per failed attempt: its cause
    startup = property(lambda self: self.path / "startup.json")  # the latest attempt's start-up, phase by phase

    def keys(self, rank: int) -> Path:
        """data.record_keys: the sample keys of each step on this rank."""
        return self.path / "keys" / f"rank{rank:05d}.jsonl"

    def heartbeat(self, rank: int) -> Path:
        return self.heartbeats / f"rank{rank:05d}.json"

    def record_failure(self, record: dict) -> None:
        with open(self.failures, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def read_failures(self) -> list[dict]:
        if not self.failures.exists():
            return []
        out = []
        for line in self.failures.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def is_complete(self) -> bool:
        return self.summary.exists()

    def write_config(self, config: Config) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config, to_yaml(config))
        return self.config

    def load_config(self) -> Config:
        return from_yaml_file(self.config)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def bump_restarts(self) -> int:
        """How many times this run has been started again (the count, after this start)."""
        count = int(self.restarts.read_text()) + 1 if self.restarts.exists() else 1
        atomic_write(self.restarts, str(count))
        return count

    # the loss curve: appended at log steps, cut back to the checkpoint a resumed run starts from
    def append_train_log(self, record: dict) -> None:
        with open(self.train_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def read_train_log(self) -> list[dict]:
        if not self.train_log.exists():
            return []
        records = []
        for line in self.train_log.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut by a crash
                continue
        return records

    def truncate_train_log(self, step: int) -> None:
        """Drop what an attempt logged after the checkpoint the run now resumes from."""
        kept = [r for r in self.read_train_log() if r.get("step", 0) <= step]
        atomic_write(self.train_log, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


class RunsRoot:
    """What sits beside the runs under ``run.root``: the default MLflow store, the converted weights, and the
    shard index of remote shards and of read-only shard folders (pipeline/data/index.py)."""

    def __init__(self, root: str | Path):
        self.path = Path(root)

    mlflow_db = property(lambda self: self.path / "mlflow.db")
    mlartifacts = property(lambda self: self.path / "mlartifacts")
    pretrained_cache = property(lambda self: self.path / "pretrained")
    subsets = property(lambda self: self.path / "subsets")  # data.train_subset: the chosen keys, per shard set
    bench = property(lambda self: self.path / "bench")
    shard_index = property(lambda self: self.path / "shard-index")

    def runs_of(self, stage: str, family: str) -> list[RunDir]:
        """Run folders of one stage and config family, oldest first."""
        found = sorted(
            (p for p in self.path.glob(f"{stage}-{family}-*") if (p / "config.yaml").exists()), key=lambda p: p.name
        )
        return [RunDir(p) for p in found]

    def latest_finished(self, stage: str, family: Optional[str] = None) -> Optional[RunDir]:
        """The newest finished run of a stage (and family), for chaining fine-tuning after pretraining."""
        done = [RunDir(p) for p in self.path.glob(f"{stage}-{family}-*" if family else f"{stage}-*")]
        done = [r for r in done if r.is_complete()]
        return max(done, key=lambda r: r.summary.stat().st_mtime) if done else None


def config_differences(saved: Config, new: Config) -> list[str]:
    """Keys whose values differ and that a continued run may not change."""
    a, b = flatten(to_dict(saved)), flatten(to_dict(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_DIFFERENCES))


def choose_run_dir(config: Config, family: str) -> tuple[RunDir, bool]:
    """(run dir, resuming?). An explicit run.name is that folder; otherwise the latest unfinished run of this
    family with the same config is continued, or a new timestamped folder is made."""
    root = RunsRoot(config.run.root)
    if config.run.name:
        run = RunDir(root.path / config.run.name)
        if run.config.exists():
            diff = config_differences(run.load_config(), config)
            if diff:
                raise ConfigError(
                    f"run.name={config.run.name}: that run was made with a different config "
                    f"({', '.join(diff[:6])}); continue it unchanged or choose a new run.name"
                )
            return run, True
        return run, False
    for run in reversed(root.runs_of(config.run.stage, family)):
        if not run.is_complete() and not config_differences(run.load_config(), config):
            return run, True
        break  # only the latest run is a candidate
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RunDir(root.path / f"{config.run.stage}-{family}-{stamp}"), False
