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
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
SPOOL_FILE = "tracking_spool.jsonl"
SENT_FILE = "tracking_spool.sent"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# log_batch limits (MLflow REST API): 1000 metrics, 100 params, 100 tags, 1000 entities in all
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
BATCHED = ("metrics", "params", "tags")  # records that go together into one log_batch call
COMPACT_BYTES = 4 * 2**20  # a fully sent journal larger than this is truncated
# MLflow error codes that no retry can fix (the record itself is refused): drop the record, warn
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
                    "RESOURCE_ALREADY_EXISTS"}
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless it is marked as model training
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
SYNC_HINT = "python -m pipeline tracking-sync {run_dir}  (or: make tracking-sync RUN_DIR={run_dir})"


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


def short_model_name(name: str) -> str:
    """vit_tiny_patch16_224.augreg_in21k -> vit_tiny; swin_base_patch4_window7_224 -> swin_base."""
    base = name.split(".")[0]
    kept = [p for p in base.split("_") if not re.fullmatch(r"(patch|window)\d+|\d+", p)]
    return "_".join(kept) or base


def readable_run_name(stage: str, model_name: str, img_size: Optional[int], when: Optional[float] = None) -> str:
    """What the MLflow runs table shows, e.g. 'pretrain vit_tiny 32px 2026-11-21 09:33'."""
    size = f" {img_size}px" if img_size else ""
    return f"{stage} {short_model_name(model_name)}{size} {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))}"


def run_tags(config, run_dir: Path) -> dict[str, str]:
    """Tags set when the MLflow run is created: where it came from and how to find it again."""
    commit = git_commit()
    tags = {"stage": config.run.stage, "run_dir": str(run_dir.resolve()), "model": config.model.name,
            "git_commit": commit, "mlflow.source.git.commit": commit, "launch_host": socket.gethostname()}
    tags.update(attempt_tags(config))
    return tags


def attempt_tags(config) -> dict[str, str]:
    """Tags set again by every attempt: a requeued or resubmitted job may have a new job id, and a run
    first started with its server down may be nested under its pipeline run only on a later attempt."""
    tags = {}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if config.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = config.tracking.parent_run_id  # nests this run under the pipeline run
    return tags


def host_tags(world_size: int, hosts: list[str]) -> dict[str, Any]:
    return {"world_size": world_size, "hosts": ",".join(sorted(set(hosts))), "launch_host": socket.gethostname()}


# ----------------------------------------------------------------------------------------------------
# The journal


class Spool:
    """Append-only JSON lines in the run directory plus a persisted byte offset of what has been sent.

    One writer (the training thread) appends; one sender reads from the offset. A record is on disk
    before any network call, so a dead server, a requeue or a crash loses nothing."""

    def __init__(self, run_dir: Path):
        self.path, self.sent_path = run_dir / SPOOL_FILE, run_dir / SENT_FILE
        self._lock = threading.Lock()
        self._fh = None
        self.offset = 0
        if self.sent_path.exists():
            try:
                self.offset = int(self.sent_path.read_text().strip() or 0)
            except ValueError:
                self.offset = 0
        size = self.path.stat().st_size if self.path.exists() else 0
        if self.offset > size:  # truncated after a full send, offset not yet rewritten
            self.offset = 0

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh is None:
                new = not self.path.exists()
                self._fh = open(self.path, "a", encoding="utf-8")
                if not new and self.path.stat().st_size and not self._ends_with_newline():
                    self._fh.write("\n")  # a previous attempt died mid-line: keep that fragment on its own line
            self._fh.write(line)
            self._fh.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def pending(self) -> Iterator[tuple[Optional[dict], int]]:
        """(record, offset just after it) for each complete unsent line, read lazily; None for an
        unreadable line (a fragment left by a crash)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            pos = self.offset
            for raw in f:
                if not raw.endswith(b"\n"):
                    return  # being written right now
                pos += len(raw)
                try:
                    yield json.loads(raw), pos
                except ValueError:
                    yield None, pos

    def has_pending_create(self) -> bool:
        """Whether an unsent run-creation record waits (a previous attempt never reached the store); a
        raw scan, as the backlog of a long outage can be large. Records are written with "t" first."""
        if not self.path.exists():
            return False
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return any(line.startswith(b'{"t":"create"') for line in f)

    def has_pending(self) -> bool:
        return next(self.pending(), None) is not None

    def pending_count(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return sum(1 for line in f if line.endswith(b"\n"))

    def mark_sent(self, offset: int) -> None:
        self.offset = offset
        tmp = self.sent_path.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.sent_path)
        if offset >= COMPACT_BYTES:
            self.compact()

    def compact(self, remove: bool = False) -> None:
        """Once everything is sent: truncate (or remove) the journal so it does not grow for a week."""
        with self._lock:
            if not self.path.exists() or self.path.stat().st_size != self.offset:
                return
            if remove:
                if self._fh is not None:
                    self._fh.close()
                    self._fh = None
                self.path.unlink()
                self.sent_path.unlink(missing_ok=True)
            else:
                os.truncate(self.path, 0)
                self.sent_path.write_text("0")
            self.offset = 0

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


# ----------------------------------------------------------------------------------------------------
# Delivery


class _Transient(Exception):
    """The store did not answer (down, timeout, overloaded): keep the records and try again later."""


def _is_permanent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


class Delivery:
    """Sends a run directory's journal to the tracking store, in order, in batches; used by the
    background thread of a live run and by ``tracking-sync``. Never raises for store problems."""

    def __init__(self, run_dir: Path, spool: Spool, uri: str, experiment: str, artifact_location: Optional[str]):
        self.run_dir, self.spool, self.uri = run_dir, spool, uri
        self.experiment, self.artifact_location = experiment, artifact_location
        self.id_file = run_dir / RUN_ID_FILE
        self.run_id: Optional[str] = self.id_file.read_text().strip() if self.id_file.exists() else None
        self.created = threading.Event()
        if self.run_id:
            self.created.set()
        self.last_error: Optional[str] = None
        self.sent_records = 0
        self._client = None
        self._warned_drop = 0

    # -- one pass ----------------------------------------------------------------------------------
    def deliver(self) -> bool:
        """Send everything pending; True when nothing is left. A store that does not answer stops the
        pass (records stay for the next one); a record the store refuses is dropped with a warning."""
        try:
            while True:
                group, end, single = [], 0, None
                for record, offset in self.spool.pending():
                    if record is not None and record.get("t") in BATCHED:
                        if group and not _fits(group, record):
                            break
                        group.append(record)
                        end = offset
                        continue
                    if not group:
                        single = (record, offset)
                    break
                if group:
                    self._send_batch(group)
                    self.spool.mark_sent(end)
                    self.sent_records += len(group)
                elif single:
                    record, offset = single
                    if record is None:
                        self._drop("an unreadable journal line", None)
                    else:
                        self._send_one(record)
                        self.sent_records += 1
                    self.spool.mark_sent(offset)
                else:
                    self.last_error = None
                    return True
        except _Transient as exc:
            self.last_error = str(exc)
            return False

    def _call(self, fn, *args, **kwargs):
        """A store call; connection problems become _Transient, refusals propagate."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_permanent(exc):
                raise
            raise _Transient(_first_line(exc)) from exc

    def _client_(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self._client = self._call(MlflowClient, tracking_uri=self.uri)
        return self._client

    def _require_run(self) -> str:
        if self.run_id is None:
            raise _Transient(f"no MLflow run yet: {self.id_file} is missing and the journal has no creation record")
        return self.run_id

    def _send_one(self, record: dict) -> None:
        kind = record.get("t")
        client = self._client_()
        try:
            if kind == "create":
                self._create(client, record)
            elif kind == "status":
                run_id = self._require_run()
                if record["status"] == "RUNNING":
                    self._call(client.update_run, run_id, status="RUNNING")
                else:
                    self._call(client.set_terminated, run_id, record["status"], end_time=record.get("ts"))
            elif kind == "artifact":
                run_id = self._require_run()
                if not Path(record["path"]).exists():
                    self._drop(f"artifact {record['path']} no longer exists", None)
                    return
                if Path(record["path"]).is_dir():  # a folder: its files, under artifact dir/<folder name>
                    where = "/".join(x for x in (record.get("dir"), Path(record["path"]).name) if x)
                    self._call(client.log_artifacts, run_id, record["path"], where)
                else:
                    self._call(client.log_artifact, run_id, record["path"], record.get("dir"))
            else:
                self._drop(f"unknown journal record {kind!r}", None)
        except _Transient:
            raise
        except Exception as exc:  # refused by the store (permanent)
            self._drop(f"{kind} record", exc)

    def _create(self, client, record: dict) -> None:
        if self.run_id is not None:  # created earlier (the id file was written, the offset not yet)
            return
        experiment = self._call(client.get_experiment_by_name, self.experiment)
        if experiment is None:
            try:
                experiment_id = self._call(client.create_experiment, self.experiment,
                                           artifact_location=self.artifact_location, tags=EXPERIMENT_TAGS)
            except Exception as exc:  # created at the same moment by another run
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self._call(client.get_experiment_by_name, self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():
                if key not in experiment.tags:
                    self._call(client.set_experiment_tag, experiment_id, key, value)
        run = self._call(client.create_run, experiment_id, start_time=record.get("ts"),
                         run_name=record.get("name"), tags=record.get("tags") or {})
        self.run_id = run.info.run_id
        tmp = self.id_file.with_suffix(".tmp")
        tmp.write_text(self.run_id)
        os.replace(tmp, self.id_file)
        self.created.set()
        log.info("MLflow run %s '%s' in experiment '%s' (%s)", self.run_id, record.get("name"), self.experiment,
                 self.uri)

    def _entities(self, group: list[dict]):
        from mlflow.entities import Metric, Param, RunTag

        metrics, params, tags = [], [], []
        for r in group:
            if r["t"] == "metrics":
                metrics += [Metric(k, float(v), r["ts"], r["step"]) for k, v in r["values"].items()]
            elif r["t"] == "params":
                params += [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in r["values"].items()]
            else:
                tags += [RunTag(k, str(v)) for k, v in r["values"].items()]
        return metrics, params, tags

    def _send_batch(self, group: list[dict]) -> None:
        client, run_id = self._client_(), self._require_run()
        metrics, params, tags = self._entities(group)
        try:
            # a single record may hold more than one batch (e.g. ~120 config params): chunk it
            while metrics or params or tags:
                p, t = params[:MAX_PARAMS], tags[:MAX_TAGS]
                m = metrics[:min(MAX_METRICS, MAX_ENTITIES - len(p) - len(t))]
                self._call(client.log_batch, run_id, metrics=m, params=p, tags=t)
                metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]
        except _Transient:
            raise
        except Exception as exc:  # refused: find and drop the offending record(s), keep the rest
            if len(group) == 1:
                self._drop(f"{group[0]['t']} record", exc)
                return
            for record in group:
                self._send_batch([record])

    def _drop(self, what: str, exc: Optional[Exception]) -> None:
        self._warned_drop += 1
        if self._warned_drop <= 5:
            log.warning("MLflow refused a tracking record, dropped: %s%s", what, f" ({_first_line(exc)})" if exc else "")


def _fits(group: list[dict], record: dict) -> bool:
    """Whether one more record keeps the group within a single log_batch call."""
    counts = {"metrics": 0, "params": 0, "tags": 0}
    for r in group + [record]:
        counts[r["t"]] += len(r["values"])
    return (counts["metrics"] <= MAX_METRICS and counts["params"] <= MAX_PARAMS and counts["tags"] <= MAX_TAGS
            and sum(counts.values()) <= MAX_ENTITIES)


def _http_defaults() -> None:
    """Our own thread retries with backoff, so a request should fail fast instead of MLflow's default
    (7 retries with exponential backoff, 120 s timeout), which would hold a backlog for minutes.
    Only where the user has not chosen; these are MLflow's own variables."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# ----------------------------------------------------------------------------------------------------
# The tracker the training loop uses


class Tracker:
    """The MLflow run of one pipeline run; a no-op on ranks other than 0 or when tracking is disabled.

    All logging methods only append to the journal; ``close`` waits (bounded) for the sender."""

    def __init__(self, config, run_dir: Path, *, enabled: bool, img_size: Optional[int] = None,
                 run_name: Optional[str] = None, tags: Optional[dict[str, Any]] = None):
        self.enabled = enabled and config.tracking.enabled
        self.run_dir = Path(run_dir)
        self._closed = False
        if not self.enabled:
            return
        try:
            self._start(config, img_size, run_name, tags)
        except Exception as exc:  # an unwritable run dir and the like: train without tracking, say so
            log.warning("MLflow tracking disabled for this run: %s", _first_line(exc))
            self.enabled = False

    def _start(self, config, img_size, run_name, tags) -> None:
        _http_defaults()
        import mlflow.tracking  # noqa: F401  here, at startup: importing in the sender would hold the GIL mid-training

        self.flush_every_s = config.tracking.flush_every_s
        self.final_wait_s = config.tracking.final_wait_s
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.run_dir)
        self.delivery = Delivery(self.run_dir, self.spool, tracking_uri(config),
                                 config.tracking.experiment or "default", artifact_location(config))
        # a run whose creation record is still unsent (server down during the previous attempt) is resumed
        self.resumed = self.delivery.run_id is not None or self.spool.has_pending_create()
        self._write_failed = False
        if self.resumed:
            self._record({"t": "status", "status": "RUNNING"})
            self._append("tags", attempt_tags(config))
        else:
            name = run_name or readable_run_name(config.run.stage, config.model.name, img_size)
            self._record({"t": "create", "ts": _now_ms(), "name": name,
                          "tags": {**run_tags(config, self.run_dir), **{k: str(v) for k, v in (tags or {}).items()}}})
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
                log.warning("cannot write the tracking journal %s (%s); tracking records are lost until it can",
                            self.spool.path, _first_line(exc))

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

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._record({"t": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def finish(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (an interrupted run that will resume is left RUNNING). Only records
        it, like every logging call: ``close`` then waits for the sender."""
        if self.enabled and not self._closed:
            self._record({"t": "status", "status": status, "ts": _now_ms()})

    # -- delivery (background thread) --------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while True:
            closing = self._closing.is_set()
            try:
                if self._lock_fh is None:  # one sender per journal (tracking-sync refuses while we hold it)
                    self._lock_fh = _exclusive(self.run_dir)
                if self._lock_fh is None:
                    self.delivery.last_error = "another process (tracking-sync?) is sending this run's journal"
                    done = False
                else:
                    done = self.delivery.deliver()
            except Exception as exc:  # a bug must not take training down
                self.delivery.last_error = _first_line(exc)
                done = False
            if done:
                if failures:
                    log.warning("MLflow tracking store reachable again; the buffered records were sent")
                failures = 0
            else:
                failures += 1
                if failures == 1:
                    log.warning("MLflow tracking store not reachable (%s); records are kept in %s and sent when it "
                                "is back; training continues", self.delivery.last_error, self.spool.path)
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
        log.warning("MLflow tracking store not reachable for %.0f s at the end of the run (%s): %d tracking records "
                    "are kept in %s. Upload them when it is back with:\n    %s", wait_s, self.delivery.last_error,
                    left, self.spool.path, SYNC_HINT.format(run_dir=self.run_dir))
        return False

    def _atexit(self) -> None:
        if not self._closed:  # the process is ending without close (an exception): a short try, then the journal
            self.close(wait_s=min(self.final_wait_s, 10.0))


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------------
# tracking-sync and the pipeline's parent run


def sync_run(run_dir: Path, uri: Optional[str] = None, timeout_s: float = 60.0) -> tuple[int, int, Optional[str]]:
    """Upload what a run's journal still holds: (sent, left, last error). Raises FileNotFoundError/ValueError
    for a folder that is not a run directory."""
    from pipeline.config import from_yaml_file

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = from_yaml_file(run_dir / "config.yaml")
    if uri:
        config.tracking.tracking_uri = uri
    _http_defaults()
    spool = Spool(run_dir)
    if not spool.path.exists():
        return 0, 0, None
    holder = _exclusive(run_dir)
    if holder is None:
        raise ValueError(f"{run_dir}: another process holds its tracking journal (a training job still running, "
                         "or another tracking-sync); it sends the records itself")
    try:
        delivery = Delivery(run_dir, spool, tracking_uri(config), config.tracking.experiment or "default",
                            artifact_location(config))
        end = time.monotonic() + timeout_s
        done = delivery.deliver()
        while not done and time.monotonic() < end:
            time.sleep(min(2.0, max(0.0, end - time.monotonic())))
            done = delivery.deliver()
        left = spool.pending_count()
        if left == 0:
            spool.compact(remove=True)
        return delivery.sent_records, left, delivery.last_error
    finally:
        holder.close()
        if not spool.path.exists():
            Path(holder.name).unlink(missing_ok=True)


def _exclusive(run_dir: Path):
    """A non-blocking exclusive lock on the run's journal lock file, or None if another process has it."""
    import fcntl

    fh = open(run_dir / (SPOOL_FILE + ".lock"), "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    except OSError:  # a filesystem without locks: go ahead
        pass
    return fh


def pipeline_run(config, pipeline_dir: Path, *, img_size: Optional[int] = None) -> Tracker:
    """The parent MLflow run of a multi-stage pipeline (pretrain then fine-tune), kept in ``pipeline_dir``
    like any run (its id in ``pipeline_dir/mlflow_run_id``; resumed when started again). Its stages nest
    under it by setting ``tracking.parent_run_id`` to ``parent.wait_for_run_id(...)``; call
    ``parent.finish("FINISHED" | "FAILED")`` and ``parent.close()`` at the end."""
    name = readable_run_name("pipeline", config.model.name, img_size)
    return Tracker(config, pipeline_dir, enabled=True, run_name=name, tags={"stage": "pipeline"})
