"""Run N copies of a command as one local distributed job; knows nothing about models.

Why not torchrun: we want rank 0 on the user's terminal (a real TTY, so progress bars work), the other ranks in
log files, a Ctrl-C that lets every rank finish its checkpoint however long that takes (torchrun kills workers
30 s after forwarding the signal), the "stopped, resumable" exit code passed through instead of being reported as
a crash, a hang watchdog, and a failure report that names the rank that caused it (a rank killed by a signal,
usually the out-of-memory killer, comes before the ranks that merely lost their peer).

The ranks run in process groups of their own, so a signal reaches them only through this launcher: Ctrl-C on the
terminal and ``kill -INT``/``-TERM`` of the launcher alone both stop every rank at its next step with a
checkpoint (a second Ctrl-C stops them at once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.env import node_name, rank_environment
from launch.watchdog import Watch, Watchdog
from pipeline.rundir import EXIT_RESUMABLE

STACK_SIGNAL = signal.SIGUSR1  # the ranks dump their Python stacks on it (pipeline/train/heartbeat.py)
SIGKILL_HINT = "most often the out-of-memory killer; see dmesg (and sacct MaxRSS on Slurm)"


def free_port() -> int:
    """A TCP port nothing listens on right now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


@dataclass(frozen=True)
class Failure:
    """Why a local job failed: the rank that caused it, where, at which step, in one line."""

    rank: int
    node: str
    step: Optional[int]
    cause: str  # e.g. "killed by SIGKILL", "hang: ...", "RuntimeError: ..."


@dataclass(frozen=True)
class Result:
    code: int  # 0, EXIT_RESUMABLE, or the failure's exit code
    failure: Optional[Failure] = None


def run_local(
    argv: Sequence[str],
    nproc: int,
    log_dir: Path,
    *,
    watch: Optional[Watch] = None,
    attempt: int = 0,
    grace_s: float = 600.0,
) -> Result:
    """Start ``argv`` nproc times with the ranks' environment; supervise them until all have exited."""
    log_dir.mkdir(parents=True, exist_ok=True)
    node, started = node_name(), time.time()
    relay = _Relay()
    old = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        procs, logs = _start(argv, nproc, log_dir, node, attempt)
        relay.procs = procs
        dog = watch.dog(nproc, started) if watch is not None else None
        return _supervise(procs, logs, dog, node, grace_s)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class _Relay:
    """The launcher's SIGINT/SIGTERM handler: relays each to every live rank, once. A Ctrl-C that reaches this
    process twice (the terminal's, and again through a wrapper such as `uv run`) must not count as the second
    Ctrl-C, which stops the ranks without saving."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.last: dict[int, float] = {}

    def __call__(self, signum, _frame) -> None:
        now = time.monotonic()
        if now - self.last.get(signum, -10.0) < 1.0:
            return
        self.last[signum] = now
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)


def threads_per_rank(nproc: int) -> dict[str, str]:
    """OMP_NUM_THREADS for each of nproc ranks on this machine: its share of the CPUs it may use, as torchrun
    sets one; unset, every rank starts one torch thread per core. Measured on 2 cores, the digits demo on 2
    ranks: 511 -> 542 images/s (docs/performance.md). A value the user set is kept."""
    if nproc <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nproc))}


def _start(argv, nproc: int, log_dir: Path, node: str, attempt: int) -> tuple[list, list]:
    """Rank 0 on this terminal, the others into logs; each in a process group of its own."""
    from pipeline.train.startup import T0_ENV, T_SPAWN_ENV

    port = free_port()
    threads = threads_per_rank(nproc)
    procs, logs = [], []
    spawned = repr(time.time())
    clock = {T_SPAWN_ENV: spawned, **({T0_ENV: spawned} if attempt else {})}  # a retry counts from its own start
    for rank in range(nproc):
        env = {
            **os.environ,
            **clock,
            **threads,
            **rank_environment(
                rank=rank,
                local_rank=rank,
                world_size=nproc,
                local_world_size=nproc,
                master_addr="127.0.0.1",
                master_port=port,
                node=node,
                attempt=attempt,
            ),
        }
        path = None if rank == 0 else log_dir / f"rank{rank}.log"
        if path is None:
            procs.append(subprocess.Popen(list(argv), env=env, process_group=0))
        else:
            with open(path, "ab") as out:
                procs.append(
                    subprocess.Popen(list(argv), env=env, process_group=0, stdout=out, stderr=subprocess.STDOUT)
                )
        logs.append(path)
    return procs, logs


def _supervise(
    procs: list[subprocess.Popen], logs: list[Path | None], dog: Optional[Watchdog], node: str, grace_s: float
) -> Result:
    last_check = 0.0
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, EXIT_RESUMABLE)]
        if failed:
            return _failed(procs, logs, failed, dog, node)
        if all(c is not None for c in codes):
            return Result(EXIT_RESUMABLE if EXIT_RESUMABLE in codes else 0)
        if dog is not None and time.monotonic() - last_check >= 2.0:
            last_check = time.monotonic()
            hang = dog.check()
            if hang is not None:
                return _hung(procs, logs, hang, dog)
        time.sleep(0.2)


def _failed(procs, logs, failed: list[tuple[int, int]], dog: Optional[Watchdog], node: str) -> Result:
    """Name the cause: a rank killed by a signal first (the others then fail because their peer is gone)."""
    time.sleep(0.5)  # let the ranks that lost their peer report too, so the order below is by cause, not by luck
    failed += [
        (r, p.poll())
        for r, p in enumerate(procs)
        if p.poll() not in (None, 0, EXIT_RESUMABLE) and r not in dict(failed)
    ]
    _terminate(procs, grace_s=30.0)
    # a signal death first; then the rank whose error came first (its heartbeat says when): the others lost a peer
    rank, code = min(failed, key=lambda rc: (rc[1] >= 0, _failed_at(rc[0], dog), failed.index(rc)))
    cause = _cause(rank, code, logs, dog)
    print(
        f"\nrank {rank} of {len(procs)} on {node} {_what(code)}: {cause}; the other ranks were stopped.",
        file=sys.stderr,
    )
    for other, other_code in failed:
        if other != rank:
            print(f"  rank {other} (after rank {rank}): {_cause(other, other_code, logs, dog)}", file=sys.stderr)
    where = logs[rank] or "the output above"
    print(f"  log of rank {rank}: {where}", file=sys.stderr)
    if logs[rank]:
        print(f"--- last lines of rank {rank} ---\n{tail(logs[rank])}---", file=sys.stderr)
    step = dog.last_step(rank) if dog else None
    return Result(code if code > 0 else 128 - code, Failure(rank, node, step, cause))


def _failed_at(rank: int, dog: Optional[Watchdog]) -> float:
    if dog is None:
        return 0.0
    try:
        return float(json.loads((dog.folder / f"rank{rank:05d}.json").read_text()).get("failed_at", float("inf")))
    except (OSError, ValueError):
        return float("inf")


def _what(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"was killed by {name}" + (f" ({SIGKILL_HINT})" if name == "SIGKILL" else "")
    return f"failed with exit code {code}"


def _cause(rank: int, code: int, logs, dog: Optional[Watchdog]) -> str:
    """One line: the signal, else the error the rank reported in its heartbeat, else its log's last line."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if dog is not None:
        try:
            error = json.loads((dog.folder / f"rank{rank:05d}.json").read_text()).get("error")
        except (OSError, ValueError):
            error = None
        if error:
            return error
    last = [line for line in tail(logs[rank], 5).splitlines() if line.strip()] if logs[rank] else []
    return last[-1].strip()[:300] if last else f"exit code {code}"


def _hung(procs, logs, hang, dog: Watchdog) -> Result:
    """End the whole job: stacks of the ranks that can still answer first, then SIGKILL (no checkpoint is
    attempted: a save would hang in the same collective; the latest complete checkpoint stays as it is)."""
    message = hang.describe(dog.hang_timeout_s if hang.phase not in ("starting", "saving") else dog.startup_grace_s)
    print(
        f"\nhang watchdog: {message}. Python stacks of the ranks that still answer follow in their logs "
        f"(rank 0: below); ending the job.",
        file=sys.stderr,
    )
    for p in procs:
        if p.poll() is None:
            p.send_signal(STACK_SIGNAL)
    time.sleep(3.0)
    _terminate(procs, grace_s=0.0)
    return Result(1, Failure(hang.rank, hang.node, hang.step, f"hang: {message}"))


def _terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (after grace_s: SIGKILL) to each rank's whole process group, its loader workers included."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
