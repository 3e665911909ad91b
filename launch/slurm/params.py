"""What a job asks Slurm for: submitit's executor parameters from the launch section, and the checks that keep a
job sbatch would refuse, or one that could never checkpoint before its time limit, from being submitted."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from pipeline.config import ConfigError

# sbatch options the launcher itself sets; extra_sbatch may not override them
MANAGED_SBATCH = (
    "job-name",
    "nodes",
    "ntasks-per-node",
    "time",
    "signal",
    "output",
    "error",
    "open-mode",
    "array",
    "cpus-per-task",
    "gpus-per-node",
    "mem",
    "partition",
    "account",
    "qos",
    "constraint",
)


class SubmitError(RuntimeError):
    """sbatch refused the job (bad partition, account, limits...): one line for the user."""


def executor_parameters(launch, *, name: str, dependency: Optional[str] = None) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords for a launch section (nodes, tasks, the slurm profile)."""
    s = launch.slurm
    params: dict[str, Any] = {
        "name": name,
        "nodes": launch.nodes,
        "tasks_per_node": launch.ranks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.time_min,
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
        raise ValueError(
            f"launch.slurm.extra_sbatch: {', '.join(clash)} are set from launch.*/launch.slurm.* "
            f"(nodes, gpus_per_node, time_min, signal_delay_s, ...); set them there"
        )


def check_slurm(launch) -> None:
    """The Slurm section must make a job sbatch accepts and that can checkpoint before its time limit."""
    from pipeline.config.schema import positive

    s = launch.slurm
    for key in ("time_min", "cpus_per_task", "mem_gb"):
        if getattr(s, key) is not None:
            positive(f"launch.slurm.{key}", getattr(s, key))
    positive("launch.slurm.signal_delay_s", s.signal_delay_s, allow_zero=True)
    positive("launch.slurm.max_requeues", s.max_requeues, allow_zero=True)
    if s.signal_delay_s >= s.time_min * 60:
        raise ConfigError(
            f"launch.slurm.signal_delay_s={s.signal_delay_s} must be below the time limit "
            f"launch.slurm.time_min={s.time_min} ({s.time_min * 60} s): the warning comes that long "
            "before the limit, and a step plus a checkpoint must fit in it"
        )
    try:
        check_extra_sbatch(s.extra_sbatch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_executor(folder: Path, launch, *, name: str, dependency: Optional[str] = None, teardown=()):
    """submitit's AutoExecutor on Slurm; the job runs this interpreter (sys.executable: the project's .venv).
    ``teardown``: the batch script's lines after srun (launch/slurm/after.py: the cause of a failure, retries)."""
    import submitit

    executor = submitit.AutoExecutor(
        folder=folder,
        cluster="slurm",
        slurm_max_num_timeout=launch.slurm.max_requeues,
        slurm_python=shlex.quote(sys.executable),
    )
    params = executor_parameters(launch, name=name, dependency=dependency)
    if teardown:
        params["slurm_teardown"] = list(teardown)
    executor.update_parameters(**params)
    return executor


# ----------------------------------------------------------------------------------------------------
# What the partition offers, before anything is submitted


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def usable(state: str) -> bool:
    """A node in this sinfo state (%T) can take a job now or once its jobs end: not down, drained or draining."""
    return state.rstrip("*~#!%$@^-").lower() not in ("down", "drained", "draining", "fail", "failing", "future")


def usable_node_count(partition: str) -> Optional[int]:
    """How many nodes of the partition are usable (None: sinfo did not answer)."""
    out = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%T"])
    if out is None:
        return None
    return len({name for name, _, state in (line.partition("|") for line in out.splitlines()) if usable(state)})


def partition_nodes(partition: Optional[str]) -> tuple[Optional[str], list[dict]]:
    """(partition name, its usable nodes: cpus, memory MB, gpus), from sinfo; ([], None) without Slurm clients."""
    out = _run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G|%T"] + (["-p", partition] if partition else []))
    if out is None:
        return partition, []
    nodes, default = {}, partition
    for line in out.splitlines():
        part, name, cpus, mem, gres, state = (line.split("|") + [""] * 6)[:6]
        if partition is None and not part.endswith("*"):
            continue
        default = part.rstrip("*")
        if not usable(state):
            continue
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        nodes[name] = {"cpus": int(cpus or 0), "mem_mb": int(float(mem or 0)), "gpus": gpus}
    return default, list(nodes.values())


def slurm_minutes(text: str) -> Optional[int]:
    """Slurm's time format (minutes, m:s, h:m:s, d-h, d-h:m, d-h:m:s) in whole minutes; None: unlimited."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # d-h[:m[:s]]
        hours, minutes = parts[0], (parts[1] if len(parts) > 1 else 0)
    elif len(parts) == 3:  # h:m:s
        hours, minutes = parts[0], parts[1]
    else:  # m or m:s
        hours, minutes = 0, parts[0]
    return int(days or 0) * 1440 + hours * 60 + minutes


def partition_time_limit_min(partition: str) -> Optional[int]:
    """MaxTime of the partition in minutes (None: unlimited or unknown)."""
    match = re.search(r"MaxTime=(\S+)", _run(["scontrol", "show", "partition", partition, "-o"]) or "")
    return slurm_minutes(match.group(1)) if match else None


def fit_to_partition(launch) -> None:
    """Refuse a request the partition can never run (exit 2, the mismatch named) and fill in what is unset
    (``cpus_per_task``: the nodes' share per task). Without Slurm's clients there is nothing to compare with."""
    s, per_node = launch.slurm, launch.ranks_per_node
    name, nodes = partition_nodes(s.partition)
    if not nodes and s.partition and _run(["sinfo", "-h", "-o", "%P"]) is not None:
        known = sorted({p.rstrip("*") for p in (_run(["sinfo", "-h", "-o", "%P"]) or "").split()})
        raise ConfigError(
            f"launch.slurm.partition={s.partition}: this cluster has no such partition with usable "
            f"nodes; its partitions: {', '.join(known) or 'none'}"
        )
    if not nodes:
        if s.cpus_per_task is None:
            s.cpus_per_task = 1
        return
    where = f"partition {name}"
    need_cpus = (s.cpus_per_task or 1) * per_node
    fits = [
        n
        for n in nodes
        if n["cpus"] >= need_cpus
        and n["gpus"] >= launch.gpus_per_node
        and (not s.mem_gb or n["mem_mb"] >= s.mem_gb * 1024)
    ]
    if len(fits) < launch.nodes:
        best = max(nodes, key=lambda n: (n["cpus"], n["gpus"], n["mem_mb"]))
        asked = (
            f"{launch.nodes} node(s) with {need_cpus} CPUs ({per_node} task(s) x launch.slurm.cpus_per_task="
            f"{s.cpus_per_task or 1}), {launch.gpus_per_node} GPUs"
            + (f", {s.mem_gb} GB (launch.slurm.mem_gb)" if s.mem_gb else "")
        )
        raise ConfigError(
            f"the job can never start: it asks for {asked}, but {where} has {len(fits)} such node(s) "
            f"of {len(nodes)} usable; its largest node has {best['cpus']} CPUs, {best['gpus']} GPUs, "
            f"{best['mem_mb'] // 1024} GB. Change launch.nodes / launch.slurm.* (or the cluster profile)"
        )
    limit = partition_time_limit_min(name) if name else None
    if limit is not None and s.time_min > limit:
        raise ConfigError(
            f"launch.slurm.time_min={s.time_min} exceeds the time limit of {where} ({limit} min); "
            f"use at most {limit} (the job requeues itself at the limit)"
        )
    if s.cpus_per_task is None:
        s.cpus_per_task = max(1, min(n["cpus"] for n in fits) // per_node)
