"""The one description a launcher hands every rank: torch.distributed's variables plus the node's name, the
job's id and the attempt. The trainer reads only these (pipeline/train/engine.py DistEnv) and never asks the
scheduler; each launcher fills them from what it knows (local processes, or Slurm's task environment)."""

from __future__ import annotations

import re
import socket


def node_name(scheduler_name: str | None = None) -> str:
    """How a node is named everywhere (the hosts tag, system metrics): the scheduler's name for it when there
    is one (on Slurm, two "nodes" may share one machine), else the short host name."""
    name = scheduler_name or socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "node"


def rank_environment(
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int,
    master_addr: str,
    master_port: int,
    node: str,
    job_id: str = "",
    attempt: int = 0,
) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "VITPIPE_NODE": node,
        "VITPIPE_JOB_ID": job_id,
        "VITPIPE_ATTEMPT": str(attempt),
    }
