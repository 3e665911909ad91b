"""Automatic retries after a failure (``launch.max_failures``), locally and on Slurm: the run restarts from its
latest complete checkpoint in the same run folder and MLflow run. A deterministic bug is not retried forever:
the same error at the same step twice ends the retries. Every failure is recorded in ``failures.jsonl`` (the
trainer logs them to MLflow when the next attempt starts)."""

from __future__ import annotations

import re
import time
from typing import Optional

from pipeline.rundir import RunDir


def signature(cause: str) -> str:
    """The cause without the numbers that differ between attempts (seconds, pids, ports)."""
    return re.sub(r"\d+(\.\d+)?", "#", cause)


def record_failure(run: RunDir, *, rank: int, node: str, step: Optional[int], cause: str, attempt: int) -> dict:
    record = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "attempt": attempt,
        "rank": rank,
        "node": node,
        "step": step,
        "cause": cause[:500],
    }
    run.record_failure(record)
    return record


def retry_decision(run: RunDir, max_failures: int) -> tuple[bool, str]:
    """(retry?, why) after the failure just recorded."""
    failures = run.read_failures()
    if not failures or max_failures <= 0:
        return False, "automatic retries are off (launch.max_failures=0)"
    if len(failures) >= 2:
        a, b = failures[-2], failures[-1]
        if a.get("step") == b.get("step") and signature(a.get("cause", "")) == signature(b.get("cause", "")):
            return False, (
                f"the same error at the same step ({b.get('step')}) twice: not retried again, it looks "
                f"deterministic ({b.get('cause')})"
            )
    if len(failures) > max_failures:
        return False, f"{len(failures)} failures, more than launch.max_failures={max_failures}"
    return True, f"failure {len(failures)} of at most {max_failures} retried"
