"""Sending a run's journal to the MLflow store, in order and in batches, surviving a store that comes and goes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from pipeline.files import atomic_write
from pipeline.rundir import RunDir
from pipeline.tracking.journal import Spool

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
# log_batch limits (MLflow REST API): 1000 metrics, 100 params, 100 tags, 1000 entities in all
MAX_METRICS, MAX_PARAMS, MAX_TAGS, MAX_ENTITIES = 1000, 100, 100, 1000
BATCHED = ("metrics", "params", "tags")  # records that go together into one log_batch call
# MLflow error codes that no retry can fix (the record itself is refused): drop the record, warn
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "BAD_REQUEST",
    "RESOURCE_ALREADY_EXISTS",
}
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless it is marked as model training
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class Transient(Exception):
    """The store did not answer (down, timeout, overloaded): keep the records and try again later."""


def _is_permanent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


def first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


class Delivery:
    """Sends a run directory's journal to the tracking store, in order, in batches; used by the
    background thread of a live run and by ``tracking-sync``. Never raises for store problems."""

    def __init__(self, run_dir: Path, spool: Spool, uri: str, experiment: str, artifact_location: Optional[str]):
        self.run_dir, self.spool, self.uri = run_dir, spool, uri
        self.experiment, self.artifact_location = experiment, artifact_location
        self.id_file = RunDir(run_dir).mlflow_run_id
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
        except Transient as exc:
            self.last_error = str(exc)
            return False

    def _call(self, fn, *args, **kwargs):
        """A store call; connection problems become Transient, refusals propagate."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_permanent(exc):
                raise
            raise Transient(first_line(exc)) from exc

    def _client_(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:"):
                Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            self._client = self._call(MlflowClient, tracking_uri=self.uri)
        return self._client

    def _require_run(self) -> str:
        if self.run_id is None:
            raise Transient(f"no MLflow run yet: {self.id_file} is missing and the journal has no creation record")
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
            elif kind == "datasets":
                self._call(client.log_inputs, self._require_run(), datasets=dataset_inputs(record["values"]))
            elif kind == "image":
                run_id = self._require_run()
                if not Path(record["path"]).exists():
                    self._drop(f"image {record['path']} no longer exists", None)
                    return
                import numpy as np
                from PIL import Image

                with Image.open(record["path"]) as picture:
                    self._call(
                        client.log_image, run_id, np.asarray(picture.convert("RGB")), artifact_file=record["file"]
                    )
            else:
                self._drop(f"unknown journal record {kind!r}", None)
        except Transient:
            raise
        except Exception as exc:  # refused by the store (permanent)
            self._drop(f"{kind} record", exc)

    def _create(self, client, record: dict) -> None:
        if self.run_id is not None:  # created earlier (the id file was written, the offset not yet)
            return
        experiment = self._call(client.get_experiment_by_name, self.experiment)
        if experiment is None:
            try:
                experiment_id = self._call(
                    client.create_experiment,
                    self.experiment,
                    artifact_location=self.artifact_location,
                    tags=EXPERIMENT_TAGS,
                )
            except Exception as exc:  # created at the same moment by another run
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self._call(client.get_experiment_by_name, self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():
                if key not in experiment.tags:
                    self._call(client.set_experiment_tag, experiment_id, key, value)
        run = self._call(
            client.create_run,
            experiment_id,
            start_time=record.get("ts"),
            run_name=record.get("name"),
            tags=record.get("tags") or {},
        )
        self.run_id = run.info.run_id
        atomic_write(self.id_file, self.run_id)
        self.created.set()
        log.info(
            "MLflow run %s '%s' in experiment '%s' (%s)", self.run_id, record.get("name"), self.experiment, self.uri
        )

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
                m = metrics[: min(MAX_METRICS, MAX_ENTITIES - len(p) - len(t))]
                self._call(client.log_batch, run_id, metrics=m, params=p, tags=t)
                metrics, params, tags = metrics[len(m) :], params[len(p) :], tags[len(t) :]
        except Transient:
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
            log.warning("MLflow refused a tracking record, dropped: %s%s", what, f" ({first_line(exc)})" if exc else "")


def dataset_inputs(records: list[dict]) -> list:
    """Lineage records -> MLflow ``DatasetInput``s, each tagged with its context (``mlflow.data.context``)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [
        DatasetInput(
            Dataset(
                name=r["name"][:500],
                digest=r["digest"][:36],  # MLflow's column limit
                source_type=r["source_type"],
                source=json.dumps({"uri": r["source"]}),
                profile=json.dumps(r.get("profile") or {}),
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, r["context"])],
        )
        for r in records
    ]


def _fits(group: list[dict], record: dict) -> bool:
    """Whether one more record keeps the group within a single log_batch call."""
    counts = {"metrics": 0, "params": 0, "tags": 0}
    for r in group + [record]:
        counts[r["t"]] += len(r["values"])
    return (
        counts["metrics"] <= MAX_METRICS
        and counts["params"] <= MAX_PARAMS
        and counts["tags"] <= MAX_TAGS
        and sum(counts.values()) <= MAX_ENTITIES
    )
