"""Smoke test of the local Slurm test cluster through submitit.

Usage (cluster started with tests/slurm/cluster.sh):

    eval "$(bash tests/slurm/cluster.sh env)"
    uv run python tests/slurm/smoke.py [--with-timeout] [--keep]

Checks, printing timings:
  1. a 2-node x 1-task job: JobEnvironment ranks/hostnames, node1/node2 resolve in the job;
  2. a Checkpointable job preempted with job._interrupt() (what submitit's own tests use:
     scancel --signal SIGTERM then USR2) is checkpointed, requeued and finishes with
     SLURM_RESTART_COUNT incremented;
  3. scancel of a sleeping job makes result() raise UncompletedJobError in bounded time;
  4. (--with-timeout) a real time limit (timeout_min=1, signal 40 s before) requeues the
     Checkpointable job, which then finishes (about 1-2 min).
Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import submitit
from submitit.core.utils import UncompletedJobError


def log(msg: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg: str) -> None:
    log(f"FAIL: {msg}")
    raise SystemExit(1)


def call_with_deadline(fn, seconds: float, what: str):
    """Run fn() in a thread; fail if it does not return within `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fail(f"{what}: no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for_file(path: Path, seconds: float, what: str, job=None) -> float:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > seconds:
            extra = ""
            if job is not None:
                extra = f" (job {job.job_id} state {job.state}; stderr tail: {tail(job.paths.stderr)})"
            fail(f"{what}: {path} did not appear within {seconds:.0f} s{extra}")
        time.sleep(0.2)
    return time.monotonic() - t0


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text().splitlines()[-n:])
    except OSError:
        return "<none>"


# ----------------------------------------------------------------------------- job code
def hello() -> dict:
    env = submitit.JobEnvironment()
    resolved = {}
    for name in ("node1", "node2"):
        try:
            resolved[name] = socket.gethostbyname(name)
        except OSError as e:
            resolved[name] = f"ERROR {e}"
    return {
        "job_id": env.job_id,
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "node": env.node,
        "num_nodes": env.num_nodes,
        "hostnames": env.hostnames,
        "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
        "hostname": socket.gethostname(),
        "resolved": resolved,
        "python": sys.executable,
    }


class Resumable(submitit.helpers.Checkpointable):
    """Sleeps on its first run (to be interrupted), returns at once after a requeue."""

    def __call__(self, marker_dir: str, first_run_sleep_s: float) -> dict:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        Path(marker_dir, f"start_{restart}").write_text(str(time.time()))
        if restart == 0:
            time.sleep(first_run_sleep_s)
        return {"restart_count": restart, "job_id": os.environ.get("SLURM_JOB_ID")}


def sleeper(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


# ----------------------------------------------------------------------------- checks
def check_two_nodes(folder: Path) -> None:
    ex = submitit.AutoExecutor(folder=folder / "hello")
    ex.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5, name="smoke-hello")
    t0 = time.monotonic()
    job = ex.submit(hello)
    log(f"[1] submitted 2-node job {job.job_id}")
    results = call_with_deadline(job.results, 120, "2-node job results()")
    dt = time.monotonic() - t0
    for r in results:
        log(
            f"[1]   rank {r['global_rank']} node {r['node']} slurmd={r['slurmd_nodename']} "
            f"hostnames={r['hostnames']} resolved={r['resolved']}"
        )
    if sorted(r["global_rank"] for r in results) != [0, 1]:
        fail(f"[1] unexpected ranks: {results}")
    if sorted(r["slurmd_nodename"] for r in results) != ["node1", "node2"]:
        fail(f"[1] tasks did not run on node1 and node2: {results}")
    for r in results:
        if r["hostnames"] != ["node1", "node2"] or r["num_tasks"] != 2 or r["num_nodes"] != 2:
            fail(f"[1] unexpected job environment: {r}")
        if any(v.startswith("ERROR") for v in r["resolved"].values()):
            fail(f"[1] node names do not resolve inside the job: {r['resolved']}")
    log(f"[1] OK 2-node job: submit -> results() {dt:.1f} s")


def check_preemption_requeue(folder: Path) -> None:
    markers = folder / "markers_preempt"
    markers.mkdir()
    ex = submitit.AutoExecutor(folder=folder / "preempt")
    ex.update_parameters(nodes=1, tasks_per_node=1, timeout_min=10, name="smoke-preempt")
    t0 = time.monotonic()
    job = ex.submit(Resumable(), str(markers), 600)
    log(f"[2] submitted Checkpointable job {job.job_id}")
    dt_start = wait_for_file(markers / "start_0", 60, "[2] first run start", job)
    log(f"[2] first run started after {dt_start:.1f} s; interrupting (preemption: SIGTERM + USR2)")
    t_int = time.monotonic()
    job._interrupt()  # scancel --signal SIGTERM; scancel --signal USR2
    dt_requeue = wait_for_file(markers / "start_1", 120, "[2] run after requeue", job)
    log(f"[2] restarted (SLURM_RESTART_COUNT=1) {dt_requeue:.1f} s after the interrupt")
    result = call_with_deadline(job.result, 120, "[2] requeued job result()")
    dt_done = time.monotonic() - t_int
    if result.get("restart_count") != 1:
        fail(f"[2] expected restart_count 1, got {result}")
    log(
        f"[2] OK requeue via preemption: interrupt -> restart {dt_requeue:.1f} s, "
        f"interrupt -> result() {dt_done:.1f} s, total {time.monotonic() - t0:.1f} s; result {result}"
    )


def check_scancel(folder: Path) -> None:
    ex = submitit.AutoExecutor(folder=folder / "cancel")
    ex.update_parameters(nodes=1, tasks_per_node=1, timeout_min=10, name="smoke-cancel")
    job = ex.submit(sleeper, 600)
    log(f"[3] submitted sleeping job {job.job_id}")
    t0 = time.monotonic()
    while (
        "RUNNING"
        not in subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T"], capture_output=True, text=True).stdout
    ):
        if time.monotonic() - t0 > 60:
            fail(f"[3] job {job.job_id} not running after 60 s")
        time.sleep(0.5)
    time.sleep(2)  # let the task actually start
    t_cancel = time.monotonic()
    job.cancel(check=True)  # scancel <id>
    try:
        out = call_with_deadline(job.result, 90, "[3] result() of a cancelled job")
    except UncompletedJobError as e:
        dt = time.monotonic() - t_cancel
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f"[3] OK scancel -> UncompletedJobError after {dt:.1f} s ({first[:120]})")
        return
    fail(f"[3] cancelled job returned a result: {out!r}")


def check_timeout_requeue(folder: Path) -> None:
    markers = folder / "markers_timeout"
    markers.mkdir()
    ex = submitit.AutoExecutor(folder=folder / "timeout")
    ex.update_parameters(nodes=1, tasks_per_node=1, timeout_min=1, slurm_signal_delay_s=40, name="smoke-timeout")
    t0 = time.monotonic()
    job = ex.submit(Resumable(), str(markers), 600)
    log(f"[4] submitted Checkpointable job {job.job_id} with a 1 min limit, USR2 40 s before")
    wait_for_file(markers / "start_0", 60, "[4] first run start", job)
    dt_restart = wait_for_file(markers / "start_1", 240, "[4] run after timeout requeue", job)
    result = call_with_deadline(job.result, 120, "[4] result() after timeout requeue")
    if result.get("restart_count") != 1:
        fail(f"[4] expected restart_count 1, got {result}")
    log(
        f"[4] OK timeout requeue: restarted {dt_restart:.1f} s after the first start, "
        f"result() after {time.monotonic() - t0:.1f} s; result {result}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-timeout", action="store_true", help="also check a real time-limit requeue (~2 min)")
    ap.add_argument("--keep", action="store_true", help="keep the submitit folder")
    args = ap.parse_args()

    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        fail('SLURM_CONF is not set to an existing file: eval "$(bash tests/slurm/cluster.sh env)"')
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    if sinfo.returncode != 0:
        fail(f"sinfo failed: {sinfo.stderr.strip()}")
    log(f"SLURM_CONF={conf}; nodes: {' | '.join(sinfo.stdout.split(chr(10))).strip(' |')}")

    folder = Path(tempfile.mkdtemp(prefix="vitpipe-slurm-smoke-"))
    log(f"submitit folder {folder}")
    t0 = time.monotonic()
    ok = False
    try:
        check_two_nodes(folder)
        check_preemption_requeue(folder)
        check_scancel(folder)
        if args.with_timeout:
            check_timeout_requeue(folder)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log(f"submitit folder kept: {folder}")
    log(f"ALL OK in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
