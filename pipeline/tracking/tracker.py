"""MLflow tracking from global rank 0: one MLflow run per pipeline run directory, continued on resume.

Tracking must never slow or break training, for runs that last a week on many nodes:

* Every record (metrics, params, tags, artifacts, run status) is appended to a journal in the run
  directory, ``tracking_spool.jsonl``, and that is all the training thread does (tens of microseconds).
* A background thread sends the journal to MLflow in batches (``MlflowClient.log_batch``) every
  ``tracking.flush_every_s``, and records how far it got in ``tracking_spool.sent``.
* A server that is down at start or goes away mid-run costs nothing but a warning: the MLflow run is
  created once the server answers (its id then goes to ``mlflow_run_id``), and the backlog is sent when it
  is back. At the end the run waits at most ``tracking.final_wait_s`` for it; what is still unsent stays in
  the journal, with a warning naming ``python -m pipeline tracking-sync <run_dir>`` to upload it later. A
  resumed run, or a crashed one started again, sends what its previous attempt left.

Why not mlflow's own ``log_batch(..., synchronous=False)``: its queue lives in memory and a batch that
fails is logged as an error and dropped, it cannot create the run lazily, and nothing survives the
process; a week-long job on a flaky server needs retries, a durable backlog and lazy creation.
"""

from __future__ import annotations

import atexit
import logging
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.tracking.delivery import MAX_PARAM_LEN, Delivery, first_line
from pipeline.tracking.journal import Spool, exclusive
from pipeline.tracking.store import artifact_location, http_defaults, tracking_uri

log = logging.getLogger(__name__)

SYNC_HINT = "python -m pipeline tracking-sync {run_dir}  (or: make tracking-sync RUN_DIR={run_dir})"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def short_model_name(name: str) -> str:
    """vit_tiny_patch16_224.augreg_in21k -> vit_tiny; swin_base_patch4_window7_224 -> swin_base."""
    base = name.split(".")[0]
    kept = [p for p in base.split("_") if not re.fullmatch(r"(patch|window)\d+|\d+", p)]
    return "_".join(kept) or base


def readable_run_name(stage: str, model_name: str, img_size: Optional[int], when: Optional[float] = None) -> str:
    """What the MLflow runs table shows, e.g. 'pretrain vit_tiny 32px 2026-11-21 09:33'."""
    size = f" {img_size}px" if img_size else ""
    return f"{stage} {short_model_name(model_name)}{size} {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))}"


def run_tags(config, run_dir: Path, job_id: str = "") -> dict[str, str]:
    """Tags set when the MLflow run is created: where it came from and how to find it again."""
    commit = git_commit()
    tags = {
        "stage": config.run.stage,
        "run_dir": str(run_dir.resolve()),
        "model": config.model.name,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "launch_host": socket.gethostname(),
    }
    tags.update(attempt_tags(config, job_id))
    return tags


def attempt_tags(config, job_id: str = "") -> dict[str, str]:
    """Tags set again by every attempt: a requeued or resubmitted job may have a new job id, and a run
    first started with its server down may be nested under its pipeline run only on a later attempt."""
    tags = {}
    if job_id:  # the scheduler's job id, as the launcher reported it
        tags["job_id"] = job_id
    if config.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = config.tracking.parent_run_id  # nests this run under the pipeline run
    return tags


def host_tags(world_size: int, hosts: list[str]) -> dict[str, Any]:
    return {"world_size": world_size, "hosts": ",".join(sorted(set(hosts))), "launch_host": socket.gethostname()}


# ----------------------------------------------------------------------------------------------------
# The tracker the training loop uses


class Tracker:
    """The MLflow run of one pipeline run; a no-op on ranks other than 0 or when tracking is disabled.

    All logging methods only append to the journal; ``close`` waits (bounded) for the sender."""

    def __init__(
        self,
        config,
        run_dir: Path,
        *,
        enabled: bool,
        img_size: Optional[int] = None,
        run_name: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        job_id: str = "",
    ):
        self.enabled = enabled and config.tracking.enabled
        self.job_id = job_id
        self.run_dir = Path(run_dir)
        self._closed = False
        if not self.enabled:
            return
        try:
            self._start(config, img_size, run_name, tags)
        except Exception as exc:  # an unwritable run dir and the like: train without tracking, say so
            log.warning("MLflow tracking disabled for this run: %s", first_line(exc))
            self.enabled = False

    def _start(self, config, img_size, run_name, tags) -> None:
        http_defaults()
        import mlflow.tracking  # noqa: F401  here, at startup: importing in the sender would hold the GIL mid-training

        self.flush_every_s = config.tracking.flush_every_s
        self.final_wait_s = config.tracking.final_wait_s
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.run_dir)
        self.delivery = Delivery(
            self.run_dir,
            self.spool,
            tracking_uri(config),
            config.tracking.experiment or "default",
            artifact_location(config),
        )
        # a run whose creation record is still unsent (server down during the previous attempt) is resumed
        self.resumed = self.delivery.run_id is not None or self.spool.has_pending_create()
        self._write_failed = False
        if self.resumed:
            self._record({"t": "status", "status": "RUNNING"})
            self._append("tags", attempt_tags(config, self.job_id))
        else:
            name = run_name or readable_run_name(config.run.stage, config.model.name, img_size)
            self._record(
                {
                    "t": "create",
                    "ts": _now_ms(),
                    "name": name,
                    "tags": {
                        **run_tags(config, self.run_dir, self.job_id),
                        **{k: str(v) for k, v in (tags or {}).items()},
                    },
                }
            )
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._lock_fh = None
        self._thread = threading.Thread(target=self._run, name="mlflow-tracking", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    @property
    def run_id(self) -> Optional[str]:
        return self.delivery.run_id if self.enabled else None

    def wait_for_run_id(self, timeout_s: float) -> Optional[str]:
        """The MLflow run id once the run exists in the store (None if not within timeout_s): e.g. a parent
        pipeline run whose id its stages need."""
        if not self.enabled:
            return None
        self.delivery.created.wait(timeout_s)
        return self.delivery.run_id

    # -- logging (training thread; appends only) -----------------------------------------------------
    def _record(self, record: dict) -> None:
        try:
            self.spool.append(record)
        except Exception as exc:  # disk full, permissions, NFS trouble: lose tracking, never training
            if not self._write_failed:
                self._write_failed = True
                log.warning(
                    "cannot write the tracking journal %s (%s); tracking records are lost until it can",
                    self.spool.path,
                    first_line(exc),
                )

    def _append(self, kind: str, values: dict) -> None:
        if values:
            self._record({"t": kind, "values": values})

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._append("params", {k: str(v)[:MAX_PARAM_LEN] for k, v in sorted(params.items())})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._append("tags", {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if values:
            self._record({"t": "metrics", "ts": _now_ms(), "step": int(step), "values": values})

    def log_datasets(self, datasets: list[dict]) -> None:
        """The run's data as MLflow dataset inputs: records of pipeline/data/lineage.py (name, digest, source,
        source_type, context train/val/pretrain, profile), sent with ``MlflowClient.log_inputs``."""
        if self.enabled and datasets:
            self._record({"t": "datasets", "values": list(datasets)})

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._record({"t": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def log_image(self, image, name: str) -> None:
        """A picture (HxWx3 uint8 array) for people: kept as a PNG under the run's ``pictures/`` folder and sent
        with MLflow's ``log_image`` (shown in the run's artifacts and image grid)."""
        if not self.enabled:
            return
        from PIL import Image

        folder = self.run_dir / "pictures"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / name)
        self._record({"t": "image", "path": str((folder / name).resolve()), "file": f"pictures/{name}"})

    def finish(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED, or KILLED (stopped with a checkpoint: the trainer tags it run_state=stopped, and a
        resumed attempt sets it RUNNING again). Only records it, like every logging call: ``close`` then waits
        for the sender."""
        if self.enabled and not self._closed:
            self._record({"t": "status", "status": status, "ts": _now_ms()})

    # -- delivery (background thread) --------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while True:
            closing = self._closing.is_set()
            try:
                if self._lock_fh is None:  # one sender per journal (tracking-sync refuses while we hold it)
                    self._lock_fh = exclusive(self.run_dir)
                if self._lock_fh is None:
                    self.delivery.last_error = "another process (tracking-sync?) is sending this run's journal"
                    done = False
                else:
                    done = self.delivery.deliver()
            except Exception as exc:  # a bug must not take training down
                self.delivery.last_error = first_line(exc)
                done = False
            if done:
                if failures:
                    log.warning("MLflow tracking store reachable again; the buffered records were sent")
                failures = 0
            else:
                failures += 1
                if failures == 1:
                    log.warning(
                        "MLflow tracking store not reachable (%s); records are kept in %s and sent when it "
                        "is back; training continues",
                        self.delivery.last_error,
                        self.spool.path,
                    )
            if closing and (done or time.monotonic() >= self._deadline):
                return
            if closing:
                wait = 1.0
            elif done:
                wait = self.flush_every_s
            else:  # back off while the store is away, but keep trying
                wait = min(self.flush_every_s * 2 ** min(failures - 1, 6), max(60.0, self.flush_every_s))
            self._wake.wait(wait)
            self._wake.clear()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Ask the sender to send now and wait until nothing is pending (for tests and tools)."""
        if not self.enabled:
            return True
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self._wake.set()
            if not self.spool.has_pending():
                return True
            time.sleep(0.05)
        return not self.spool.has_pending()

    def close(self, wait_s: Optional[float] = None) -> bool:
        """Wait at most ``tracking.final_wait_s`` for the backlog to be sent. What remains stays in the
        journal, with a warning saying how to upload it; True when everything was sent."""
        if not self.enabled or self._closed:
            return True
        self._closed = True
        wait_s = self.final_wait_s if wait_s is None else wait_s
        self._deadline = time.monotonic() + wait_s
        self._closing.set()
        self._wake.set()
        self._thread.join(wait_s + 5.0)
        left = self.spool.pending_count()
        if self._lock_fh is not None and not self._thread.is_alive():
            self._lock_fh.close()
        if left == 0:
            self.spool.compact(remove=True)
            self.spool.close()
            if self._lock_fh is not None and self._lock_fh.closed:
                Path(self._lock_fh.name).unlink(missing_ok=True)
            return True
        self.spool.close()
        log.warning(
            "MLflow tracking store not reachable for %.0f s at the end of the run (%s): %d tracking records "
            "are kept in %s. Upload them when it is back with:\n    %s",
            wait_s,
            self.delivery.last_error,
            left,
            self.spool.path,
            SYNC_HINT.format(run_dir=self.run_dir),
        )
        return False

    def _atexit(self) -> None:
        if not self._closed:  # the process is ending without close (an exception): a short try, then the journal
            self.close(wait_s=min(self.final_wait_s, 10.0))


def _now_ms() -> int:
    return int(time.time() * 1000)


def pipeline_run(config, pipeline_dir: Path, *, img_size: Optional[int] = None) -> Tracker:
    """The parent MLflow run of a multi-stage pipeline (pretrain then fine-tune), kept in ``pipeline_dir``
    like any run (its id in ``pipeline_dir/mlflow_run_id``; resumed when started again). Its stages nest
    under it by setting ``tracking.parent_run_id`` to ``parent.wait_for_run_id(...)``; call
    ``parent.finish("FINISHED" | "FAILED")`` and ``parent.close()`` at the end."""
    name = readable_run_name("pipeline", config.model.name, img_size)
    return Tracker(config, pipeline_dir, enabled=True, run_name=name, tags={"stage": "pipeline"})


def end_parent_run(config, status: str = "FINISHED") -> None:
    """Mark the pipeline's parent run (``tracking.parent_run_id``) ended: the last stage does it, wherever it runs.
    Best effort: a store that does not answer leaves the parent RUNNING, with a warning."""
    if not (config.tracking.enabled and config.tracking.parent_run_id):
        return
    try:
        http_defaults()
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri(config)).set_terminated(config.tracking.parent_run_id, status)
    except Exception as exc:
        log.warning(
            "could not mark the pipeline run %s %s in MLflow (%s)",
            config.tracking.parent_run_id,
            status,
            first_line(exc),
        )
