"""Where tracking goes: the MLflow store URI and artifact location a run uses, MLflow's HTTP settings for a
sender that retries by itself, and an MLflow server process (``make ui``, the benchmarks and the tests start
the same one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from pipeline.rundir import RunsRoot


def tracking_uri(config) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a sqlite store in the runs folder."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_store(config.run.root)


def default_store(root: str | Path) -> str:
    return f"sqlite:///{RunsRoot(root).mlflow_db.resolve()}"


def artifact_location(config) -> Optional[str]:
    """Where a new experiment keeps artifacts; a remote server decides for itself unless configured."""
    if config.tracking.artifact_location:
        return config.tracking.artifact_location
    if tracking_uri(config).startswith("sqlite:"):
        return RunsRoot(config.run.root).mlartifacts.resolve().as_uri()
    return None


def http_defaults() -> None:
    """Our own thread retries with backoff, so a request should fail fast instead of MLflow's default
    (7 retries with exponential backoff, 120 s timeout), which would hold a backlog for minutes.
    Only where the user has not chosen; these are MLflow's own variables."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def server_command(
    store_uri: str, artifacts: Path, host: str, port: int, workers: int = 1, allowed_hosts: Optional[str] = None
) -> list[str]:
    """``mlflow server`` on a store, proxying artifacts (--artifacts-destination): experiments the server
    creates get mlflow-artifacts:/ locations, so runs on other machines can upload through it."""
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI scorers: nothing we use
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--artifacts-destination",
        artifacts.resolve().as_uri(),
    ]
    return cmd + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])


def start_server(
    store_uri: str, artifacts: Path, port: int, log_path: Path, timeout_s: float = 120.0, **popen
) -> subprocess.Popen:
    """A server on 127.0.0.1:port in its own process group, returned once it answers /health."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            server_command(store_uri, artifacts, "127.0.0.1", port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"mlflow server did not answer on port {port} within {timeout_s:.0f} s; see {log_path}")


def serve_ui(host: str, port: int, root: Path, workers: int = 2, allowed_hosts: Optional[str] = None) -> int:
    """``make ui``: the MLflow UI on the store the runs log to ($MLFLOW_TRACKING_URI, else runs/mlflow.db). Runs that
    logged straight to the sqlite store keep their file:// artifact locations, which the server reads directly.
    The server replaces this process (exec), so Ctrl-C and SIGTERM reach it directly."""
    if not 0 < port < 65536:
        print(f"error: --port={port} must be a TCP port, 1-65535", file=sys.stderr)
        return 2
    if workers < 1:
        print(f"error: --workers={workers} must be >= 1", file=sys.stderr)
        return 2
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_store(root)
    if uri.startswith("http"):
        print(f"error: MLFLOW_TRACKING_URI={uri} is a server already; open it in a browser", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", file=sys.stderr)
    cmd = server_command(uri, RunsRoot(root).mlartifacts, host, port, workers, allowed_hosts)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached
