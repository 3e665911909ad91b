"""``make bench-tracking`` (``python -m benchmarks.bench_tracking``): what MLflow tracking costs the training loop,
against a real ``mlflow server`` on loopback (the one ``make ui`` runs), a dead address, and, for
comparison, MLflow's own synchronous and asynchronous ``log_batch``.

Why: the training thread must never wait for the tracking store, so the figure that matters is the time a
log step spends in ``Tracker.log_metrics`` (a journal append); the sending happens in a background thread,
whose CPU time per record is reported too. Results go to stdout as a table and, with --out, as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.local import free_port


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """The same ``mlflow server`` as ``make ui`` on a free loopback port; returns once /health answers."""
    from pipeline.tracking.store import default_store
    from pipeline.tracking.store import start_server as start

    port = free_port()
    proc = start(
        default_store(root),
        root / "mlartifacts",
        port,
        root / "server.log",
        timeout_s=300,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    return proc, f"http://127.0.0.1:{port}"


def log_step_metrics(n: int, step: int) -> dict[str, float]:
    """A log step's worth of metrics: the training scalars plus per-node system metrics."""
    base = {
        "train_loss": 2.0 / step,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "images_per_s": 5000.0,
        "epoch": step / 100,
        "data_wait_fraction": 0.01,
        "skipped_samples": 0.0,
        "images_per_s_per_gpu": 625.0,
        "images_per_s_per_gpu_min": 600.0,
        "data_wait_fraction_max": 0.02,
        "mfu_percent": 40.0,
    }
    i = 0
    while len(base) < n:
        base[f"system/node{i:03d}/cpu_percent"] = 50.0
        i += 1
    return base


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "mean_us": statistics.fmean(us),
        "p50_us": us[len(us) // 2],
        "p99_us": us[int(len(us) * 0.99) - 1],
        "max_us": us[-1],
    }


def bench_tracker(uri: str, root: Path, name: str, steps: int, metrics: int, drain: bool) -> dict:
    """Our tracker: time per log_metrics call on the calling thread, then (server up) the time and the
    process CPU time the background thread needs to send the backlog."""
    from pipeline.config import Config
    from pipeline.tracking.tracker import Tracker

    config = Config()
    config.run.root = str(root)
    config.tracking.tracking_uri, config.tracking.experiment = uri, "bench-tracking"
    config.tracking.flush_every_s, config.tracking.final_wait_s = 5.0, 1.0
    tracker = Tracker(config, root / name.split(",")[-1].strip().replace(" ", "-"), enabled=True, img_size=224)
    if drain:
        tracker.flush(120)  # the run exists before timing starts
    calls = []
    for step in range(1, steps + 1):
        values = log_step_metrics(metrics, step)
        t0 = time.perf_counter()
        tracker.log_metrics(values, step)
        calls.append(time.perf_counter() - t0)
    out = {"case": name, "calls": steps, "metrics_per_call": metrics, **_percentiles(calls)}
    if drain:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        ok = tracker.flush(600)
        out.update(
            drained=ok,
            drain_s=time.perf_counter() - wall0,
            sender_cpu_us_per_call=(time.process_time() - cpu0) / steps * 1e6,
        )
    tracker.finish()
    tracker.close(wait_s=0 if not drain else None)
    return out


def bench_mlflow_log_batch(uri: str, steps: int, metrics: int, synchronous: bool) -> dict:
    """MlflowClient.log_batch per log step, as the previous tracker did (synchronous), or with MLflow's
    async queue (synchronous=False), which returns at once but drops a batch the server refuses."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench-tracking")
    run_id = client.create_run(experiment.experiment_id, run_name=f"log_batch synchronous={synchronous}").info.run_id
    calls = []
    futures = []
    for step in range(1, steps + 1):
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in log_step_metrics(metrics, step).items()]
        t0 = time.perf_counter()
        result = client.log_batch(run_id, metrics=batch, synchronous=synchronous)
        calls.append(time.perf_counter() - t0)
        if result is not None:
            futures.append(result)
    for f in futures:
        f.wait()
    client.set_terminated(run_id)
    return {
        "case": f"MlflowClient.log_batch(synchronous={synchronous})",
        "calls": steps,
        "metrics_per_call": metrics,
        **_percentiles(calls),
    }


def bench_telemetry(steps: int) -> dict:
    """The per-log-step collective of StepTelemetry (system sample on the node's local rank 0, one
    gather_object of a small tuple) in a one-process gloo group: its local part, without the network."""
    import torch
    import torch.distributed as dist

    from pipeline.config import Config
    from pipeline.tracking.telemetry import StepTelemetry
    from pipeline.train.engine import DistEnv

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        telemetry = StepTelemetry(Config(), DistEnv(0, 0, 1), None, torch.device("cpu"))
        calls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            telemetry.at_log_step(1000.0, 1000.0, 0.01)
            calls.append(time.perf_counter() - t0)
    finally:
        dist.destroy_process_group()
    return {
        "case": "StepTelemetry.at_log_step (1 rank, gloo)",
        "calls": steps,
        "metrics_per_call": 0,
        **_percentiles(calls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tracking", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="log steps per case (default: %(default)s)")
    parser.add_argument(
        "--metrics",
        type=int,
        default=40,
        help="metrics per log step, training scalars + per-node system metrics (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.metrics < 1:
        print("error: --steps must be >= 10 and --metrics >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("pipeline.tracking").setLevel(logging.ERROR)  # the server-down case warns, as it should
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        proc, uri = start_server(root)
        try:
            results.append(bench_tracker(uri, root, "Tracker.log_metrics, server up", args.steps, args.metrics, True))
            dead = f"http://127.0.0.1:{free_port()}"
            results.append(
                bench_tracker(dead, root, "Tracker.log_metrics, server down", args.steps, args.metrics, False)
            )
            results.append(bench_mlflow_log_batch(uri, args.steps, args.metrics, synchronous=True))
            results.append(bench_mlflow_log_batch(uri, args.steps, args.metrics, synchronous=False))
            results.append(bench_telemetry(args.steps))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    machine = {
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(
        f"tracking overhead on the training thread, per log step ({args.metrics} metrics), "
        f"mlflow server on loopback; {machine}"
    )
    print(f"{'case':48s} {'mean us':>9s} {'p50 us':>9s} {'p99 us':>9s} {'max us':>9s}  background")
    for r in results:
        extra = (
            f"sent in {r['drain_s']:.1f} s, {r['sender_cpu_us_per_call']:.0f} us CPU per log step"
            if "drain_s" in r
            else ""
        )
        print(f"{r['case']:48s} {r['mean_us']:9.1f} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {r['max_us']:9.0f}  {extra}")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
