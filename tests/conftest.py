"""Shared fixtures: small real data made by the tests themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_collection_modifyitems(config, items):
    """Every end-to-end test is slow (real processes); ``make test-fast`` runs tests/unit alone."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The digits demo written as shards (train 4 x 400, val 1 x 300), once per test session."""
    from pipeline.data.sources import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, samples_per_shard=400)
    return out


@pytest.fixture(scope="session")
def unlabeled_shards(tmp_path_factory) -> Path:
    """The digits train images without .cls (4 x 400), as `make shards --source digits --unlabeled` writes them."""
    from pipeline.data.sources import write_digits

    out = tmp_path_factory.mktemp("digits_unlabeled")
    write_digits(out, samples_per_shard=400, unlabeled=True)
    return out


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI exactly as the Makefile runs it, in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or "MLFLOW_TRACKING_URI" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fault_report(name: str, **figures) -> None:
    """Measured detection/recovery figures for docs/reliability.md, added to the JSON file ``FAULT_REPORT`` names
    (nothing without it). Tests only record them: a figure depends on the machine's load, never asserted."""
    where = os.environ.get("FAULT_REPORT")
    if where:
        path = Path(where)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = figures
        path.write_text(json.dumps(data, indent=2))
