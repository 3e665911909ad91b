"""The job's last word: run by the batch script after ``srun`` returns (submitit's teardown), on the first node.

It does not depend on any rank surviving: when a rank dies (an OOM kill, a segfault, a hang the watchdog
ended), srun ends the others, and this names the cause, records it, and requeues the job for an automatic
retry (``launch.max_failures``; not the same error at the same step twice). Light on purpose: no torch.

    python -m launch.slurm.after RUN_DIR SRUN_EXIT_CODE MAX_FAILURES   -> exit 99: requeued (wait to be ended)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

from launch.local import SIGKILL_HINT, tail
from launch.retry import record_failure, retry_decision
from launch.slurm.status import read_status, write_status
from launch.watchdog import read_beats
from pipeline.rundir import EXIT_RESUMABLE, RunDir

REQUEUED = 99
SRUN_TASK = re.compile(r"srun: error: (\S+): task (\d+): (.+)$")
SIGNALS = {
    "Killed": "SIGKILL",
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Terminated": "SIGTERM",
}


def srun_reports(log: Path) -> list[tuple[str, int, str]]:
    """(node, task, what) for each task srun reported as failed, in its order: the first is the cause."""
    out = []
    for line in tail(log, 200).splitlines():
        match = SRUN_TASK.search(line.strip())
        if match:
            out.append((match.group(1), int(match.group(2)), match.group(3).strip()))
    return out


def cause_of_failure(run: RunDir, log: Path, world_size: int, attempt: int) -> tuple[int, str, Optional[int], str]:
    """(rank, node, step, cause): a hang the watchdog named (srun then kills the hung rank itself), then a rank srun
    saw die of a signal before it raised anything (srun kills the ranks left after the first failure: those had
    said "failed" in their heartbeat already), then the rank that raised first (the others' errors follow from
    it), then whatever srun said first."""
    status = read_status(run.slurm)
    beats = read_beats(run.heartbeats, world_size, since=0)
    reports = srun_reports(log)
    raised = sorted(
        (float(b["failed_at"]), r)
        for r, b in beats.items()
        if b.get("phase") == "failed" and "failed_at" in b and int(b.get("attempt", attempt)) == attempt
    )
    killed = [
        (n, t, w) for n, t, w in reports if SIGNALS.get(w, "SIGTERM") != "SIGTERM" and t not in {r for _, r in raised}
    ]
    this_attempt = status.get("state") == "FAILED" and status.get("attempt") == attempt and "failed_rank" in status
    if this_attempt and str(status.get("error", "")).startswith("hang:"):
        rank = int(status["failed_rank"])
        return rank, status.get("failed_node", "?"), status.get("failed_step"), status["error"]
    if killed:
        node, task, what = killed[0]
        signame = SIGNALS[what]
        hint = f" ({SIGKILL_HINT})" if signame == "SIGKILL" else ""
        return task, node, beats.get(task, {}).get("step"), f"killed by {signame}{hint}"
    if raised:
        rank = raised[0][1]
        beat = beats[rank]
        return rank, beat.get("node", "?"), beat.get("step"), beat.get("error", "?")
    if this_attempt:
        rank = int(status["failed_rank"])
        beat = beats.get(rank, {})
        return rank, beat.get("node", "?"), beat.get("step"), status.get("error", "?")
    if reports:
        node, task, what = reports[0]
        return task, node, beats.get(task, {}).get("step"), what
    return 0, "?", None, "the job step failed without a rank reporting why"


def main(argv: list[str]) -> int:
    run, code, max_failures = RunDir(argv[0]), int(argv[1]), int(argv[2])
    if code in (0, EXIT_RESUMABLE):
        return 0
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    world = int(os.environ.get("SLURM_NTASKS", "1"))
    job_id = os.environ.get("SLURM_JOB_ID", "")
    log = run.slurm / f"{job_id}_0_log.err"
    rank, node, step, cause = cause_of_failure(run, log, world, attempt)
    record_failure(run, rank=rank, node=node, step=step, cause=cause, attempt=attempt)
    retry, why = retry_decision(run, max_failures)
    write_status(
        run.slurm,
        state="FAILED",
        attempt=attempt,
        failed_rank=rank,
        failed_node=node,
        failed_step=step,
        error=cause,
        retry=why,
    )
    print(f"vitpipe: rank {rank} on {node} failed at step {step}: {cause}", file=sys.stderr)
    if not retry:
        if max_failures:
            print(f"vitpipe: not retried: {why}", file=sys.stderr)
        return 0
    print(f"vitpipe: {why}: requeueing job {job_id} to resume from the latest checkpoint", file=sys.stderr)
    write_status(run.slurm, state="REQUEUED", attempt=attempt, message=f"after a failure ({cause}); {why}")
    subprocess.run(["scontrol", "requeue", job_id], check=False)
    return REQUEUED


def teardown_lines(run_dir: Path, max_failures: int) -> list[str]:
    """The batch script's lines after srun (submitit's ``slurm_teardown``)."""
    import shlex

    python = shlex.quote(sys.executable)
    return [
        "code=$?",
        f'{python} -m launch.slurm.after {shlex.quote(str(run_dir))} "$code" {int(max_failures)}',
        f"if [ $? -eq {REQUEUED} ]; then sleep 600; fi  # requeued: Slurm ends this attempt",
        'exit "$code"',
    ]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
