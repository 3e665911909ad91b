"""MLflow tracking from global rank 0: one MLflow run per pipeline run directory, continued on resume.

Tracking must never break training: every call to the tracking store is guarded, and a failure is
reported once as a warning rather than raised.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def tracking_uri(config) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a sqlite store in the runs folder."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(config.run.root).resolve() / 'mlflow.db'}"


def artifact_location(config) -> Optional[str]:
    """Where a new experiment keeps artifacts; a remote server decides for itself unless configured."""
    if config.tracking.artifact_location:
        return config.tracking.artifact_location
    if tracking_uri(config).startswith("sqlite:"):
        return (Path(config.run.root).resolve() / "mlartifacts").as_uri()
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """The MLflow run of one pipeline run; a no-op on ranks other than 0 or when tracking is disabled."""

    def __init__(self, config, run_dir: Path, *, enabled: bool):
        self.enabled = enabled and config.tracking.enabled
        self.run_id: Optional[str] = None
        self._client = None
        self._warned = False
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            self._open(config, run_dir)
        except Exception as exc:  # the store is unreachable: train anyway, say so once
            self._warn(exc)

    # -- setup -------------------------------------------------------------------------------------
    def _open(self, config, run_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(config)
        if uri.startswith("sqlite:"):
            Path(config.run.root).mkdir(parents=True, exist_ok=True)
        self._client = client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / RUN_ID_FILE
        if id_file.exists():  # resumed (or requeued): continue the same MLflow run
            self.run_id = id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
            return
        name = config.tracking.experiment or "default"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            name, artifact_location=artifact_location(config))
        run = client.create_run(experiment_id, run_name=run_dir.name, tags={
            "stage": config.run.stage, "run_dir": str(run_dir.resolve()), "model": config.model.name,
            "git_commit": git_commit(), "mlflow.source.git.commit": git_commit()})
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("MLflow tracking failed (%s: %s); training continues without it",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._warned = True

    def _guard(self, fn, *args, **kwargs) -> Any:
        if self._client is None or self.run_id is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the store is down or refused: training goes on
            self._warn(exc)
            return None

    # -- logging -----------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if not self.enabled:
            return
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self._guard(self._client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if self.enabled:
            self._guard(self._client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if not self.enabled:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self._guard(self._client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._guard(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED; an interrupted run that will resume is left RUNNING."""
        if self.enabled:
            self._guard(self._client.set_terminated, self.run_id, status)


def host_tags(world_size: int, hosts: list[str]) -> dict[str, Any]:
    return {"world_size": world_size, "hosts": ",".join(sorted(set(hosts))), "launch_host": socket.gethostname()}
