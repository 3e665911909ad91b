"""``tracking-sync``: upload what a run's journal still holds, after the store was unreachable to the end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from pipeline.config import from_yaml_file
from pipeline.rundir import RunDir
from pipeline.tracking.delivery import Delivery
from pipeline.tracking.journal import Spool, exclusive
from pipeline.tracking.store import artifact_location, http_defaults, tracking_uri


def sync_run(run_dir: Path, uri: Optional[str] = None, timeout_s: float = 60.0) -> tuple[int, int, Optional[str]]:
    """Upload what a run's journal still holds: (sent, left, last error). Raises FileNotFoundError/ValueError
    for a folder that is not a run directory."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = from_yaml_file(run.config)
    if uri:
        config.tracking.tracking_uri = uri
    http_defaults()
    spool = Spool(run_dir)
    if not spool.path.exists():
        return 0, 0, None
    holder = exclusive(run_dir)
    if holder is None:
        raise ValueError(
            f"{run_dir}: another process holds its tracking journal (a training job still running, "
            "or another tracking-sync); it sends the records itself"
        )
    try:
        delivery = Delivery(
            run_dir, spool, tracking_uri(config), config.tracking.experiment or "default", artifact_location(config)
        )
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


def sync_command(run_dir: Path, uri: Optional[str], timeout_s: float) -> int:
    """``make tracking-sync``: 0 everything sent (or nothing to send); 1 the store is still unreachable; 2 not a
    run folder."""
    import sys

    from pipeline.config import ConfigError

    if timeout_s < 0:
        print(f"error: --timeout={timeout_s} must be >= 0 (seconds)", file=sys.stderr)
        return 2
    try:
        sent, left, error = sync_run(run_dir, uri, timeout_s)
    except (FileNotFoundError, ConfigError) as exc:
        print(
            f"error: tracking-sync: {exc}; give a run folder such as runs/<stage>-<config>-<timestamp>", file=sys.stderr
        )
        return 2
    except ValueError as exc:
        print(f"tracking-sync: {exc}", file=sys.stderr)
        return 1
    if left:
        print(
            f"tracking-sync: sent {sent} records, {left} still in {RunDir(run_dir).spool}: the store did not "
            f"answer ({error}); run the same command again later",
            file=sys.stderr,
        )
        return 1
    print(f"tracking-sync: {run_dir}: sent {sent} records; nothing left to send", file=sys.stderr)
    return 0
