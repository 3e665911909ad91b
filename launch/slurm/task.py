"""Inside a Slurm job: one task (rank) of it, with the signal handling that lets every rank checkpoint.

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
``EXIT_RESUMABLE``. Only then does rank 0 call submitit's own ``checkpoint_and_try_requeue``: it
re-pickles this callable with the remaining time-out budget (``slurm.max_requeues``), runs
``scontrol requeue`` and exits; the other ranks return. The requeued job (same job id) calls the same
entry point with the same arguments, and the entry point resumes from its checkpoint. The one case
where submitit's handler runs directly is a USR2 before the entry point has installed its own
handler (imports, rendezvous): no step has run since the last checkpoint, so requeueing at once
loses nothing. A SIGTERM without USR2 is requeued too when the job is still RUNNING (a preemption
notice); after ``scancel`` the job is already COMPLETING and is left to end, with its checkpoint.
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from launch.env import node_name, rank_environment
from launch.slurm.status import job_state, read_status, write_status
from launch.watchdog import SLOW_PHASES, Watch
from pipeline.rundir import EXIT_RESUMABLE

EXIT_GRACE_S = 60.0  # a failed rank that has not exited by then is ended (see _exit_soon)
PORT_BASE, PORT_SPAN = 21000, 9000  # below Linux's ephemeral range (32768+)


def master_port(job_id: str, attempt: int) -> int:
    """The same on every task of one attempt; a requeued attempt gets another (no TIME_WAIT clash)."""
    digits = int("".join(c for c in str(job_id) if c.isdigit()) or 0)
    return PORT_BASE + (digits * 7 + attempt) % PORT_SPAN


def task_environment(job_env, attempt: int) -> dict[str, str]:
    """The neutral rank description (launch/env.py) from submitit's view of the job. torch's variables come from
    submitit's TorchDistributedEnvironment, with a per-attempt port set first (a requeued attempt must not meet
    the previous one's sockets in TIME_WAIT); the node's name is Slurm's (SLURMD_NODENAME)."""
    from submitit.helpers import TorchDistributedEnvironment

    os.environ["MASTER_PORT"] = str(master_port(job_env.job_id, attempt))
    torch_env = TorchDistributedEnvironment()
    return rank_environment(
        rank=torch_env.rank,
        local_rank=torch_env.local_rank,
        world_size=torch_env.world_size,
        local_world_size=torch_env.local_world_size,
        master_addr=torch_env.master_addr,
        master_port=torch_env.master_port,
        node=node_name(os.environ.get("SLURMD_NODENAME") or job_env.hostnames[job_env.node]),
        job_id=str(job_env.job_id),
        attempt=attempt,
    )


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
                write_status(
                    self.folder,
                    state="REQUEUED",
                    attempt=self.attempt,
                    signals=["SIGUSR2"],
                    message="USR2 before training started: requeued at once",
                )
            self.submitit_handler.checkpoint_and_try_requeue(signum, frame)


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is a dependency; this only keeps `import launch.slurm` cheap to fail
    _Checkpointable = object  # type: ignore[assignment,misc]


class SlurmRank(_Checkpointable):
    """One task of the job. Checkpointable: submitit re-pickles it (same entry, same args) on requeue."""

    def __init__(self, entry: str, args: Sequence[str], cwd: str, watch: Optional[Watch] = None):
        self.entry, self.args, self.cwd, self.watch = entry, list(args), cwd, watch

    def __call__(self) -> dict:
        import submitit

        from pipeline.train.startup import T0_ENV

        os.environ[T0_ENV] = repr(time.time())  # start-up counts from the task's start, not from the submission
        os.chdir(self.cwd)
        job_env = submitit.JobEnvironment()
        rank, attempt = job_env.global_rank, int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        folder = Path(os.environ["SUBMITIT_FOLDER"])
        job_env.paths.result_pickle.unlink(missing_ok=True)  # a stale result of an earlier attempt
        os.environ.update(task_environment(job_env, attempt))
        submitit_handler = getattr(signal.getsignal(signal.SIGUSR2), "__self__", None)
        stops = _StopSignals(submitit_handler, folder, rank, attempt)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, stops)
        logging.getLogger("submitit").propagate = False  # its own handler prints it; the entry may add another
        if rank == 0:
            write_status(
                folder,
                state="RUNNING",
                job_id=job_env.job_id,
                attempt=attempt,
                signals=None,
                message=None,
                nodes=list(job_env.hostnames),
                python=sys.executable,
            )
        if self.watch is not None and self.watch.hang_timeout_s > 0:
            _start_watchdog(self.watch, job_env.num_tasks, folder, attempt)
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
        if code != EXIT_RESUMABLE:
            raise RuntimeError(f"{self.entry} returned exit code {code} on rank {rank}")
        return _stopped(job_env, folder, stops, names)


def _stopped(job_env, folder: Path, stops: _StopSignals, names: list[str]) -> dict:
    """The entry stopped with a checkpoint: requeue the job (time limit, preemption) or leave it stopped.
    USR2: a time limit or preemption. SIGTERM alone: a preemption notice if Slurm still has the job RUNNING;
    after scancel it is already COMPLETING (and a rank failure never returns EXIT_RESUMABLE)."""
    from submitit.core.utils import UncompletedJobError

    rank, attempt = stops.rank, stops.attempt
    requeue = signal.SIGUSR2 in stops.seen or (
        rank == 0 and signal.SIGTERM in stops.seen and job_state(job_env.job_id) == "RUNNING"
    )
    if rank == 0 and requeue and stops.submitit_handler is not None:
        write_status(folder, state="REQUEUED", attempt=attempt, signals=names)
        try:  # submitit's own: checkpoint() -> pickle, scontrol requeue, sys.exit(-1)
            stops.submitit_handler.checkpoint_and_try_requeue(signal.SIGUSR2, None)
        except UncompletedJobError as exc:  # no requeue budget left
            write_status(
                folder,
                state="STOPPED",
                attempt=attempt,
                signals=names,
                message=f"{exc} The run stopped with a checkpoint.",
            )
            raise RuntimeError(
                f"{exc} The run stopped with a checkpoint; submit the same command again to continue it."
            ) from None
    if rank == 0 and not requeue:
        why = f"signal {', '.join(names)}" if names else "stopped on request"
        write_status(
            folder, state="STOPPED", attempt=attempt, signals=names, message=f"stopped with a checkpoint ({why})"
        )
    return {"rank": rank, "status": "requeue" if requeue else "stopped", "signals": names, "attempt": attempt}


def _start_watchdog(watch: Watch, world_size: int, folder: Path, attempt: int) -> None:
    """Every task watches every rank's heartbeat (the run folder is on a shared file system). The first to see a
    hang names the rank in status.json, dumps its own stacks into its log and exits: srun then ends the job and
    the batch script's teardown (launch/slurm/after.py) records the cause and retries or fails the job."""
    dog = watch.dog(world_size)

    def loop():
        while True:
            time.sleep(2.0)
            hang = dog.check()
            if hang is None:
                continue
            limit = dog.startup_grace_s if hang.phase in SLOW_PHASES else dog.hang_timeout_s
            message = hang.describe(limit)
            print(f"hang watchdog: {message}; ending the job. This rank's Python stacks:", file=sys.stderr)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            status = read_status(folder)
            if not (status.get("state") == "FAILED" and status.get("attempt") == attempt):
                write_status(
                    folder,
                    state="FAILED",
                    attempt=attempt,
                    failed_rank=hang.rank,
                    failed_node=hang.node,
                    failed_step=hang.step,
                    error=f"hang: {message}",
                )
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=loop, name="hang-watchdog", daemon=True).start()


def _exit_soon(seconds: float) -> None:
    """A failed rank must exit for srun's --kill-on-bad-exit to end the job; if the interpreter's shutdown
    hangs (a child process, a thread), this ends it after submitit has written the error."""

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
