"""Run N copies of a command as one local distributed job; knows nothing about models.

Why not torchrun: we want rank 0 on the user's terminal (a real TTY, so progress bars work), the other
ranks in log files, a Ctrl-C that lets every rank finish its checkpoint however long that takes
(torchrun kills workers 30 s after forwarding the signal), and the "stopped, resumable" exit code passed
through instead of being reported as a crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from launch.env import node_name, rank_environment
from pipeline.rundir import EXIT_RESUMABLE


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


def run_local(argv: Sequence[str], nproc: int, log_dir: Path, *, grace_s: float = 600.0) -> int:
    """Start ``argv`` nproc times with RANK/WORLD_SIZE/MASTER_*; return 0, EXIT_RESUMABLE or the failure's code.

    If one rank fails, the others are terminated and the failing rank's log tail is printed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port, node = free_port(), node_name()
    procs: list[subprocess.Popen] = []
    logs: list[Path | None] = []
    interrupted = {"count": 0}

    def forward(signum, _frame):  # the terminal already sent SIGINT to the ranks; relay SIGTERM ourselves
        interrupted["count"] += 1
        if signum != signal.SIGINT:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(nproc):
            env = {
                **os.environ,
                **rank_environment(
                    rank=rank,
                    local_rank=rank,
                    world_size=nproc,
                    local_world_size=nproc,
                    master_addr="127.0.0.1",
                    master_port=port,
                    node=node,
                ),
            }
            if rank == 0:
                procs.append(subprocess.Popen(list(argv), env=env))
                logs.append(None)
            else:
                path = log_dir / f"rank{rank}.log"
                with open(path, "ab") as out:
                    procs.append(subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT))
                logs.append(path)
        return _supervise(procs, logs, grace_s)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _supervise(procs: list[subprocess.Popen], logs: list[Path | None], grace_s: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, EXIT_RESUMABLE)]
        if failed:
            rank, code = failed[0]
            _terminate(procs, grace_s=30.0)
            where = f"its log {logs[rank]}" if logs[rank] else "the output above"
            print(
                f"\nrank {rank} of {len(procs)} failed with exit code {code} (see {where}); "
                f"the other ranks were stopped.",
                file=sys.stderr,
            )
            if logs[rank]:
                print(f"--- last lines of rank {rank} ---\n{tail(logs[rank])}---", file=sys.stderr)
            return code if code > 0 else 1
        if all(c is not None for c in codes):
            return EXIT_RESUMABLE if EXIT_RESUMABLE in codes else 0
        time.sleep(0.2)


def _terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
