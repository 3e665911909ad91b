"""Run N copies of an entry point as one Slurm job with submitit; knows nothing about models.

``submit`` starts ``nodes x tasks_per_node`` tasks (one per GPU; one per node on CPU) that form one
torch.distributed world, each calling an entry point given as ``"module:function"`` plus string
arguments. ``wait`` streams rank 0's log and reports the outcome, with the traceback of the rank that
failed first. Everything about a job lives in one folder (``<run dir>/slurm``): submitit's pickles and
per-task logs, and ``status.json`` saying what happened last and how to continue.

Preemption and time limits: the signal path, and why it is not submitit's default
---------------------------------------------------------------------------------
Slurm sends USR2 ``signal_delay_s`` before the time limit (``#SBATCH --signal=USR2@N``) to every task;
a preemption (as submitit models it, ``job._interrupt()``) is SIGTERM then USR2. submitit's own USR2
handler, on global rank 0 only, pickles the job, runs ``scontrol requeue`` and ``sys.exit(-1)`` right
away, from inside whatever rank 0 was doing (an all-reduce, the middle of a DeepSpeed save), while the
other ranks ignore the signal; the requeue then kills them all. Nobody has saved anything.

So ``SlurmRank.__call__`` takes USR2 and SIGTERM over before it calls the entry point, with a handler
that only records them, and the entry point's own handler (the trainer's StopFlag) chains to it. The
trainer stops at the next step boundary, all ranks agree (an all-reduce that also forwards which
signals any rank saw), EVERY rank writes its part of the checkpoint, and the entry point returns
``RESUMABLE_EXIT``. Only then does rank 0 call submitit's own ``checkpoint_and_try_requeue``: it
re-pickles this callable with the remaining time-out budget (``slurm.max_requeues``), runs
``scontrol requeue`` and exits; the other ranks return. The requeued job (same job id) calls the same
entry point with the same arguments, and the entry point resumes from its checkpoint. The one case
where submitit's handler runs directly is a USR2 before the entry point has installed its own
handler (imports, rendezvous): no step has run since the last checkpoint, so requeueing at once
loses nothing. A SIGTERM without USR2 is requeued too when the job is still RUNNING (a preemption
notice); after ``scancel`` the job is already COMPLETING and is left to end, with its checkpoint.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from .local import RESUMABLE_EXIT, tail  # RESUMABLE_EXIT: stopped on request, with a checkpoint

STATUS_FILE = "status.json"
WORKER_ENTRY = "pipeline.worker:run"  # the pipeline's rank entry point, named, never imported here
EXIT_GRACE_S = 60.0  # a failed rank that has not exited by then is ended (see _exit_soon)
PORT_BASE, PORT_SPAN = 21000, 9000  # below Linux's ephemeral range (32768+)
# sbatch options the launcher itself sets; extra_sbatch may not override them
MANAGED_SBATCH = ("job-name", "nodes", "ntasks-per-node", "time", "signal", "output", "error", "open-mode",
                  "array", "cpus-per-task", "gpus-per-node", "mem", "partition", "account", "qos", "constraint")
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT")


class SubmitError(RuntimeError):
    """sbatch refused the job (bad partition, account, limits...): one line for the user."""


# ----------------------------------------------------------------------------------------------------
# Job parameters


def tasks_per_node(launch) -> int:
    return launch.tasks_per_node or max(launch.gpus_per_node, 1)


def executor_parameters(launch, *, name: str, dependency: Optional[str] = None) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords for a launch section (nodes, tasks, the slurm profile)."""
    s = launch.slurm
    params: dict[str, Any] = {
        "name": name, "nodes": launch.nodes, "tasks_per_node": tasks_per_node(launch),
        "cpus_per_task": s.cpus_per_task, "timeout_min": s.time_min,
        "slurm_signal_delay_s": s.signal_delay_s,
        # one rank exiting with an error ends the whole step at once, instead of the others waiting
        # in a collective until deepspeed.comm_timeout_min
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.setup:
        params["slurm_setup"] = list(s.setup)
    extra: dict[str, Any] = {"requeue": True}  # Slurm may requeue it too (node failure, preemption)
    extra.update({k.replace("_", "-"): v for k, v in s.extra_sbatch.items() if v is not None and v is not False})
    if dependency:
        extra["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"  # a failed predecessor cancels this job instead of parking it
    params["slurm_additional_parameters"] = extra
    return params


def check_extra_sbatch(extra: dict) -> None:
    """extra_sbatch may add options, not replace the ones the launcher derives (ValueError names them)."""
    clash = sorted(k for k in extra if k.replace("_", "-") in MANAGED_SBATCH)
    if clash:
        raise ValueError(f"launch.slurm.extra_sbatch: {', '.join(clash)} are set from launch.*/launch.slurm.* "
                         f"(nodes, gpus_per_node, time_min, signal_delay_s, ...); set them there")


def make_executor(folder: Path, launch, *, name: str, dependency: Optional[str] = None):
    """submitit's AutoExecutor on Slurm; the job runs this interpreter (sys.executable: the project's .venv)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=launch.slurm.max_requeues,
                                     slurm_python=shlex.quote(sys.executable))
    executor.update_parameters(**executor_parameters(launch, name=name, dependency=dependency))
    return executor


# ----------------------------------------------------------------------------------------------------
# Inside the job


def master_port(job_id: str, attempt: int) -> int:
    """The same on every task of one attempt; a requeued attempt gets another (no TIME_WAIT clash)."""
    digits = int("".join(c for c in str(job_id) if c.isdigit()) or 0)
    return PORT_BASE + (digits * 7 + attempt) % PORT_SPAN


def rank_environment(job_env) -> dict[str, str]:
    """torch.distributed's variables from submitit's JobEnvironment (SLURM_* underneath)."""
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return {"RANK": str(job_env.global_rank), "LOCAL_RANK": str(job_env.local_rank),
            "WORLD_SIZE": str(job_env.num_tasks), "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
            "GROUP_RANK": str(job_env.node), "MASTER_ADDR": job_env.hostnames[0],
            "MASTER_PORT": str(master_port(job_env.job_id, attempt))}


def resolve_entry(entry: str):
    module, _, name = entry.partition(":")
    if not module or not name:
        raise ValueError(f"entry point {entry!r} must be 'module:function'")
    return getattr(importlib.import_module(module), name)


class _StopSignals:
    """The task's USR2/SIGTERM handler while the entry point runs: records what arrived.

    The entry point's own handler chains to this one (and forwards signals other ranks saw). Until it
    has taken over, a USR2 goes straight to submitit's requeue: no step has run, nothing to save."""

    def __init__(self, submitit_handler, folder: Path, rank: int, attempt: int):
        self.submitit_handler = submitit_handler
        self.folder, self.rank, self.attempt = folder, rank, attempt
        self.seen: set[int] = set()

    def __call__(self, signum, frame) -> None:
        self.seen.add(signum)
        if signum == signal.SIGUSR2 and signal.getsignal(signum) is self and self.submitit_handler is not None:
            if self.rank == 0:
                write_status(self.folder, state="REQUEUED", attempt=self.attempt, signals=["SIGUSR2"],
                             message="USR2 before training started: requeued at once")
            self.submitit_handler.checkpoint_and_try_requeue(signum, frame)


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is a dependency; this only keeps `import launch.slurm` cheap to fail
    _Checkpointable = object  # type: ignore[assignment,misc]


class SlurmRank(_Checkpointable):
    """One task of the job. Checkpointable: submitit re-pickles it (same entry, same args) on requeue."""

    def __init__(self, entry: str, args: Sequence[str], cwd: str):
        self.entry, self.args, self.cwd = entry, list(args), cwd

    def __call__(self) -> dict:
        import submitit

        os.chdir(self.cwd)
        job_env = submitit.JobEnvironment()
        rank, attempt = job_env.global_rank, int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        folder = Path(os.environ["SUBMITIT_FOLDER"])
        job_env.paths.result_pickle.unlink(missing_ok=True)  # a stale result of an earlier attempt
        os.environ.update(rank_environment(job_env))
        submitit_handler = getattr(signal.getsignal(signal.SIGUSR2), "__self__", None)
        stops = _StopSignals(submitit_handler, folder, rank, attempt)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, stops)
        logging.getLogger("submitit").propagate = False  # its own handler prints it; the entry may add another
        if rank == 0:
            write_status(folder, state="RUNNING", job_id=job_env.job_id, attempt=attempt, signals=None, message=None,
                         nodes=list(job_env.hostnames), python=sys.executable)
        try:
            code = resolve_entry(self.entry)(*self.args)
        except BaseException as exc:
            _record_failure(folder, rank, attempt, exc)
            _exit_soon(EXIT_GRACE_S)
            raise
        names = sorted(signal.Signals(s).name for s in stops.seen)
        # Done here: a warning that comes now must not kill the process on its way out (Python puts back the
        # default handlers, "terminate", while it shuts down; Slurm would call the finished job FAILED).
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if not code:
            if rank == 0:
                write_status(folder, state="COMPLETED", attempt=attempt)
            return {"rank": rank, "status": "completed", "attempt": attempt}
        if code != RESUMABLE_EXIT:
            raise RuntimeError(f"{self.entry} returned exit code {code} on rank {rank}")
        # USR2: a time limit or preemption. SIGTERM alone: a preemption notice if Slurm still has the job
        # RUNNING; after scancel it is already COMPLETING (and a rank failure never returns RESUMABLE_EXIT).
        requeue = signal.SIGUSR2 in stops.seen or (
            rank == 0 and signal.SIGTERM in stops.seen and job_state(job_env.job_id) == "RUNNING")
        if rank == 0 and requeue and submitit_handler is not None:
            write_status(folder, state="REQUEUED", attempt=attempt, signals=names)
            try:  # submitit's own: checkpoint() -> pickle, scontrol requeue, sys.exit(-1)
                submitit_handler.checkpoint_and_try_requeue(signal.SIGUSR2, None)
            except submitit.core.utils.UncompletedJobError as exc:  # no requeue budget left
                write_status(folder, state="STOPPED", attempt=attempt, signals=names,
                             message=f"{exc} The run stopped with a checkpoint.")
                raise RuntimeError(f"{exc} The run stopped with a checkpoint; submit the same command again "
                                   "to continue it.") from None
        if rank == 0 and not requeue:
            why = f"signal {', '.join(names)}" if names else "stopped on request"
            write_status(folder, state="STOPPED", attempt=attempt, signals=names,
                         message=f"stopped with a checkpoint ({why})")
        return {"rank": rank, "status": "requeue" if requeue else "stopped", "signals": names, "attempt": attempt}


def _exit_soon(seconds: float) -> None:
    """A failed rank must exit for srun's --kill-on-bad-exit to end the job; if the interpreter's shutdown
    hangs (a child process, a thread), this ends it after submitit has written the error."""
    import threading

    def stop():
        time.sleep(seconds)
        os._exit(1)

    threading.Thread(target=stop, daemon=True, name="exit-watchdog").start()


def _record_failure(folder: Path, rank: int, attempt: int, exc: BaseException) -> None:
    """The first rank to fail in an attempt names itself in status.json (the others fail because of it)."""
    if isinstance(exc, SystemExit):
        return
    try:
        status = read_status(folder)
        if status.get("state") == "FAILED" and status.get("attempt") == attempt:
            return
        line = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        write_status(folder, state="FAILED", attempt=attempt, failed_rank=rank, error=line)
    except Exception:  # never mask the real error
        pass


# ----------------------------------------------------------------------------------------------------
# Submitting side


def submit(folder: Path, entry: str, args: Sequence[str], launch, *, name: str, dependency: Optional[str] = None,
           resume_hint: Optional[str] = None):
    """Submit the job; returns submitit's Job. Raises SubmitError when sbatch refuses it."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    import contextlib
    import io

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    echoed = io.StringIO()  # submitit prints sbatch's error itself; it goes into our one line instead
    try:
        with contextlib.redirect_stderr(echoed):
            executor = make_executor(folder, launch, name=name, dependency=dependency)
            job = executor.submit(SlurmRank(entry, [str(a) for a in args], os.getcwd()))
    except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError, OSError) as exc:
        text = " ".join(str(exc).split()) or " ".join(echoed.getvalue().split()) or type(exc).__name__
        raise SubmitError(f"sbatch refused the job: {text}") from None
    sys.stderr.write(echoed.getvalue())
    write_status(folder, state="SUBMITTED", job_id=job.job_id, attempt=0, name=name,
                 dependency=dependency, resume=resume_hint, submitted=time.strftime("%Y-%m-%d %H:%M:%S"),
                 log=str(log_paths(folder, job.job_id)[1]))
    return job


def submit_run(config, run_dir: Path, dependency: Optional[str] = None, *, entry: str = WORKER_ENTRY,
               extra_args: Sequence[str] = (), resume_hint: Optional[str] = None):
    """One pipeline run as one job: folder <run dir>/slurm, ``entry(run_dir, *extra_args)`` on every task.
    Only the launch section and the stage are read. dependency: e.g. ``f"afterok:{pretrain_job.job_id}"``."""
    run_dir = Path(run_dir).resolve()
    return submit(run_dir / "slurm", entry, [str(run_dir), *extra_args], config.launch,
                  name=f"{config.run.stage}-{run_dir.name}", dependency=dependency, resume_hint=resume_hint)


def log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) of one task; requeued attempts append to the same files."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(Path(folder), job_id=str(job_id), task_id=task)
    return paths.stdout, paths.stderr


def describe(job) -> str:
    """What the user needs to follow a job."""
    out, err = log_paths(job.paths.folder, job.job_id)
    return (f"submitted Slurm job {job.job_id} ({job.num_tasks} task(s))\n"
            f"  logs:   {job.paths.folder}  (rank 0: {err.name} / {out.name})\n"
            f"  follow: tail -f {err}\n"
            f"  state:  squeue -j {job.job_id}   |   sacct -j {job.job_id}\n"
            f"  stop:   scancel {job.job_id}")


def job_state(job_id: str) -> str:
    """Slurm's state of a job: squeue while it is active, sacct once it is ending or gone; '' if unknown."""
    state = ""
    for cmd in (["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = [line.split()[0].rstrip("+") for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and lines:
            state = lines[-1]
            if state != "COMPLETING":  # after scancel squeue says COMPLETING, sacct already CANCELLED
                return state
    return state


def active_job(folder: Path) -> Optional[tuple[str, str]]:
    """(job id, state) of this folder's last job if Slurm still has it queued or running."""
    job_id = read_status(folder).get("job_id")
    if not job_id:
        return None
    state = job_state(job_id)
    return (job_id, state) if state in ACTIVE_STATES else None


def read_status(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(folder: Path, **fields) -> dict:
    """Merge fields into status.json (atomic replace), with the time."""
    folder = Path(folder)
    status = {**read_status(folder), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    status = {k: v for k, v in status.items() if v is not None}  # None: drop a field
    if status.get("state") != "FAILED":
        status.pop("failed_rank", None), status.pop("error", None)
    tmp = folder / f".{STATUS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(tmp, folder / STATUS_FILE)
    return status


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
        self.offsets = {p: 0 for p in paths}
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
    """The failing rank's traceback first, then one line per other failed rank."""
    if outcome.first_failed is None:
        _, err = log_paths(folder, outcome.job_id)
        return (f"job {outcome.job_id} ended {outcome.state or 'without a result'}; no rank reported an error. "
                f"Last lines of rank 0 ({err}):\n{outcome.log_tail}")
    first = outcome.first_failed
    lines = [f"job {outcome.job_id} failed ({outcome.state or 'FAILED'}): rank {first} failed first, "
             f"the job was stopped. Its traceback:", outcome.errors[first].rstrip()]
    for task, trace in sorted(outcome.errors.items()):
        if task != first:
            last = [line for line in trace.strip().splitlines() if line.strip()][-1:] or ["?"]
            lines.append(f"rank {task} (after rank {first}): {last[0]}")
    _, err = log_paths(folder, outcome.job_id, first)
    lines.append(f"full log of rank {first}: {err}")
    return "\n".join(lines)
