"""``<run dir>/slurm/status.json``: what happened to a run's job last, and Slurm's own view of a job's state."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Optional

from pipeline.files import atomic_write

STATUS_FILE = "status.json"
ACTIVE_STATES = (
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
)
FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
)


def _states(cmd: list[str]) -> list[str]:
    """The state column of squeue/sacct output ('CANCELLED by 0' -> 'CANCELLED'); [] if the command failed."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (
        [line.split()[0].rstrip("+") for line in out.stdout.splitlines() if line.strip()] if not out.returncode else []
    )


def _squeue(job_id: str) -> list[str]:
    return _states(["squeue", "-h", "-j", str(job_id), "-o", "%T"])


def job_state(job_id: str) -> str:
    """Slurm's state of a job: squeue while it is active, sacct once it is ending or gone; '' if unknown."""
    state = ""
    for ask in (_squeue, lambda job: _states(["sacct", "-n", "-X", "-P", "-j", str(job), "-o", "State"])):
        states = ask(job_id)  # sacct only when squeue has no final answer
        if states:
            state = states[-1]
            if state != "COMPLETING":  # after scancel squeue says COMPLETING, sacct already CANCELLED
                return state
    return state


def still_on_nodes(job_id: str) -> bool:
    """True while squeue lists the job as COMPLETING: sacct may already say CANCELLED, but its processes still
    run (a SIGTERM's checkpoint, status.json's last word) until they exit or KillWait ends them."""
    return "COMPLETING" in _squeue(job_id)


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
    atomic_write(folder / STATUS_FILE, json.dumps(status, indent=2) + "\n")
    return status


# Pending reasons that no amount of waiting clears: the request exceeds what the partition, account or QOS allows.
NEVER_STARTS = (
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AccountNotAllowed",
    "QOSNotAllowed",
    "QOSMaxCpuPerJobLimit",
    "QOSMaxGRESPerJob",
    "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit",
    "AssocMaxCpuPerJobLimit",
    "AssocMaxGRESPerJob",
    "AssocMaxNodePerJobLimit",
    "AssocMaxWallDurationPerJobLimit",
)


# Reasons of a job that waits for nodes which are down, drained or reserved. Slurm 22.05 says "ReqNodeNotAvail,
# UnavailableNodes:..." of a job submitted while they are down, but of a job already pending when they go down the
# reason stays "Resources" with this description, the text squeue's %r shows. Down/drained and merely reserved
# (which clears) read alike: the partition's usable node count tells them apart.
NODES_UNAVAILABLE = ("ReqNodeNotAvail", "Nodes required for job are DOWN, DRAINED")


def classify_pending(state: str, reason: str, needed_nodes: Optional[int], usable_nodes: Optional[int]) -> str:
    """The verdict on one squeue line of a job (state, %r reason, nodes it asks for, usable nodes of its partition;
    None: unknown): "running" (started or gone), "queued" (pending for a reason that clears by itself: priority,
    resources, a dependency, a reservation), "never" (a limit it exceeds), "blocked" (fewer usable nodes than it
    needs: down or drained), or "unknown" (the scheduler has not looked at it yet)."""
    if state != "PENDING":
        return "running"
    if reason in NEVER_STARTS:
        return "never"
    if reason.startswith(NODES_UNAVAILABLE):
        if reason.startswith("ReqNodeNotAvail, UnavailableNodes:"):  # the nodes it asks for are down or drained
            return "blocked"
        if usable_nodes is not None and needed_nodes is not None and usable_nodes < needed_nodes:
            return "blocked"
        return "queued"  # reserved (for maintenance, for jobs of higher priority): that ends
    return "unknown" if reason in ("None", "") else "queued"


def pending_verdict(job_id: str) -> tuple[str, str]:
    """(verdict, Slurm's reason) for a job (see classify_pending); a "blocked" reason says how many nodes the
    partition has left."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T|%r|%D|%P"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", ""
    state, reason, nodes, partition = (out.split("|") + [""] * 4)[:4]
    needed = int(nodes) if nodes.isdigit() else None
    usable = None
    if state == "PENDING" and partition and reason.startswith(NODES_UNAVAILABLE):
        from launch.slurm.params import usable_node_count

        usable = usable_node_count(partition)
    verdict = classify_pending(state, reason, needed, usable)
    if verdict == "blocked" and usable is not None:
        reason += f"; partition {partition} has {usable} usable node(s), the job needs {needed}"
    return verdict, reason
