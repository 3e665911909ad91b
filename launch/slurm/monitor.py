"""The submitting side of a Slurm job: submit it (submitit), say how to follow it, follow it to its end and say how
it ended, with the traceback of the rank that failed first. Everything about a job lives in one folder
(``<run dir>/slurm``): submitit's pickles and per-task logs, and status.json."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from launch.local import tail
from launch.slurm.after import teardown_lines
from launch.slurm.params import SubmitError, make_executor
from launch.slurm.status import FINAL_STATES, job_state, pending_verdict, read_status, still_on_nodes, write_status
from launch.slurm.task import SlurmRank
from launch.watchdog import Watch
from pipeline.rundir import RunDir

WORKER_ENTRY = "pipeline.worker:run"  # the pipeline's rank entry point, named, never imported here


def submit(
    folder: Path,
    entry: str,
    args: Sequence[str],
    launch,
    *,
    name: str,
    dependency: Optional[str] = None,
    resume_hint: Optional[str] = None,
    watch: Optional[Watch] = None,
    teardown: Sequence[str] = (),
):
    """Submit the job; returns submitit's Job. Raises SubmitError when sbatch refuses it."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    echoed = io.StringIO()  # submitit prints sbatch's error itself; it goes into our one line instead
    try:
        with contextlib.redirect_stderr(echoed):
            executor = make_executor(folder, launch, name=name, dependency=dependency, teardown=teardown)
            job = executor.submit(SlurmRank(entry, [str(a) for a in args], os.getcwd(), watch))
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError, OSError) as exc:
        text = " ".join(str(exc).split()) or " ".join(echoed.getvalue().split()) or type(exc).__name__
        raise SubmitError(f"sbatch refused the job: {text}") from None
    sys.stderr.write(echoed.getvalue())
    write_status(
        folder,
        state="SUBMITTED",
        job_id=job.job_id,
        attempt=0,
        name=name,
        dependency=dependency,
        resume=resume_hint,
        submitted=time.strftime("%Y-%m-%d %H:%M:%S"),
        log=str(log_paths(folder, job.job_id)[1]),
    )
    return job


def submit_run(
    config,
    run_dir: Path,
    dependency: Optional[str] = None,
    *,
    entry: str = WORKER_ENTRY,
    extra_args: Sequence[str] = (),
    resume_hint: Optional[str] = None,
):
    """One pipeline run as one job: folder <run dir>/slurm, ``entry(run_dir, *extra_args)`` on every task.
    Only the launch section and the stage are read. dependency: e.g. ``f"afterok:{pretrain_job.job_id}"``."""
    run = RunDir(Path(run_dir).resolve())
    launch = config.launch
    return submit(
        run.slurm,
        entry,
        [str(run.path), *extra_args],
        launch,
        name=f"{config.run.stage}-{run.name}",
        dependency=dependency,
        resume_hint=resume_hint,
        watch=Watch(run.heartbeats, launch.hang_timeout_s, launch.startup_grace_s, launch.heartbeat_s),
        teardown=teardown_lines(run.path, launch.max_failures),
    )


def log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of one task; requeued attempts append to the same files."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(Path(folder), job_id=str(job_id), task_id=task)
    return paths.stdout, paths.stderr


def describe(job) -> str:
    """What the user needs to follow a job."""
    out, err = log_paths(job.paths.folder, job.job_id)
    return (
        f"submitted Slurm job {job.job_id} ({job.num_tasks} task(s))\n"
        f"  logs:   {job.paths.folder}  (rank 0: {err.name} / {out.name})\n"
        f"  follow: tail -f {err}\n"
        f"  state:  squeue -j {job.job_id}   |   sacct -j {job.job_id}\n"
        f"  stop:   scancel {job.job_id}"
    )


@dataclass
class Outcome:
    """How a job ended, as the submitter sees it."""

    job_id: str
    state: str  # Slurm's (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)
    status: str  # completed | stopped | failed | cancelled | timeout | unknown
    results: dict[int, Any] = field(default_factory=dict)  # task -> what the entry point returned
    errors: dict[int, str] = field(default_factory=dict)  # task -> traceback
    first_failed: Optional[int] = None  # the task whose error came first: the cause, the others follow
    log_tail: str = ""
    reason: str = ""  # Slurm's pending reason, for a job that cannot start


def _read_results(job) -> dict[int, tuple[str, Any, float]]:
    """task -> (outcome, value, mtime) for the result files present now."""
    from submitit.core.utils import JobPaths, pickle_load

    found = {}
    for task in range(job.num_tasks):
        path = JobPaths(job.paths.folder, job_id=job.job_id, task_id=task).result_pickle
        try:
            mtime = path.stat().st_mtime
            outcome, value = pickle_load(path)
        except (OSError, EOFError, ValueError):
            continue
        found[task] = (outcome, value, mtime)
    return found


class _Follow:
    """Prints what is appended to some files (rank 0's logs, across requeues)."""

    def __init__(self, paths: Sequence[Path], out: TextIO):
        self.offsets = dict.fromkeys(paths, 0)
        self.out = out

    def pump(self) -> None:
        for path, offset in self.offsets.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only
            if end:
                self.out.write(data[:end].decode(errors="replace"))
                self.out.flush()
                self.offsets[path] = offset + end


COMPLETING_WAIT_S = 300.0


def wait(job, *, out: Optional[TextIO] = sys.stderr, poll_s: float = 1.0, state_every_s: float = 5.0) -> Outcome:
    """Stream rank 0's log until Slurm says the job has ended (through requeues), then say how it ended."""
    follow = _Follow(list(log_paths(job.paths.folder, job.job_id)[::-1]), out) if out is not None else None
    last_check, state = float("-inf"), ""
    while True:
        if follow:
            follow.pump()
        # once every task has a result (or one has failed) the end is near: ask Slurm every poll
        every = poll_s if len(_read_results(job)) == job.num_tasks or _any_error(job) else state_every_s
        if time.monotonic() - last_check >= every:
            state, last_check = job_state(job.job_id), time.monotonic()
            if state in FINAL_STATES:
                break
            if state == "PENDING":  # e.g. requeued, and now the nodes it needs are down
                verdict, reason = pending_verdict(job.job_id)
                if verdict in ("never", "blocked"):
                    return Outcome(job.job_id, "PENDING", "blocked", reason=reason)
        time.sleep(poll_s)
    # Ended in Slurm's books, but a cancelled job's ranks may still be saving their checkpoint and writing
    # status.json: report only once they are gone (Slurm's KillWait bounds it; the cap is for a lost node).
    give_up = time.monotonic() + COMPLETING_WAIT_S
    while still_on_nodes(job.job_id) and time.monotonic() < give_up:
        if follow:
            follow.pump()
        time.sleep(poll_s)
    if follow:
        follow.pump()
    return _outcome(job, state)


def _any_error(job) -> bool:
    return any(v[0] == "error" for v in _read_results(job).values())


def _outcome(job, state: str) -> Outcome:
    results = _read_results(job)
    errors = {t: v[1] for t, v in results.items() if v[0] == "error"}
    values = {t: v[1] for t, v in results.items() if v[0] == "success"}
    outcome = Outcome(job.job_id, state, "unknown", values, errors)
    first = values.get(0) if isinstance(values.get(0), dict) else {}
    if errors:
        outcome.status = "failed"
        outcome.first_failed = min(errors, key=lambda t: results[t][2])
    elif state == "COMPLETED" and first.get("status") == "completed":
        outcome.status = "completed"
    elif state.startswith("CANCELLED"):
        outcome.status = "cancelled"
    elif first.get("status") == "stopped":
        outcome.status = "stopped"
    elif state in ("TIMEOUT", "DEADLINE"):
        outcome.status = "timeout"
    elif state in FINAL_STATES:
        outcome.status = "failed"
    if not errors:
        _, err = log_paths(job.paths.folder, job.job_id)
        outcome.log_tail = tail(err)
    return outcome


def explain_failure(outcome: Outcome, folder: Path) -> str:
    """The cause first (the rank named by the job's teardown or watchdog: a signal, a hang, the first error), its
    traceback when it has one, then one line per rank that failed because of it."""
    status = read_status(folder)
    cause = status.get("failed_rank")
    lines = []
    if cause is not None and status.get("error"):
        where = f"rank {cause} on {status.get('failed_node', '?')}"
        step = f" at step {status['failed_step']}" if status.get("failed_step") is not None else ""
        lines.append(f"job {outcome.job_id} failed ({outcome.state or 'FAILED'}): {where}{step}: {status['error']}")
    first = int(cause) if cause is not None else outcome.first_failed
    if first is None:
        _, err = log_paths(folder, outcome.job_id)
        return "\n".join(
            lines
            + [
                f"job {outcome.job_id} ended {outcome.state or 'without a result'}; no rank reported "
                f"an error. Last lines of rank 0 ({err}):\n{outcome.log_tail}"
            ]
        )
    if first in outcome.errors:
        if not lines:
            lines.append(
                f"job {outcome.job_id} failed ({outcome.state or 'FAILED'}): rank {first} failed first, "
                f"the job was stopped."
            )
        lines += [f"Traceback of rank {first}:", outcome.errors[first].rstrip()]
    for task, trace in sorted(outcome.errors.items()):
        if task != first:
            last = [line for line in trace.strip().splitlines() if line.strip()][-1:] or ["?"]
            lines.append(f"rank {task} (after rank {first}): {last[0]}")
    if status.get("retry"):
        lines.append(f"retries: {status['retry']}")
    _, err = log_paths(folder, outcome.job_id, first)
    lines.append(f"full log of rank {first}: {err}")
    return "\n".join(lines)
