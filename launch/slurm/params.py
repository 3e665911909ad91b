"""What a job asks Slurm for: submitit's executor parameters from the launch section, and the checks that keep a
job sbatch would refuse, or one that could never checkpoint before its time limit, from being submitted."""

from __future__ import annotations

import shlex
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
    for key, value in [("launch.slurm.time_min", s.time_min), ("launch.slurm.cpus_per_task", s.cpus_per_task)] + (
        [("launch.slurm.mem_gb", s.mem_gb)] if s.mem_gb is not None else []
    ):
        positive(key, value)
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


def make_executor(folder: Path, launch, *, name: str, dependency: Optional[str] = None):
    """submitit's AutoExecutor on Slurm; the job runs this interpreter (sys.executable: the project's .venv)."""
    import submitit

    executor = submitit.AutoExecutor(
        folder=folder,
        cluster="slurm",
        slurm_max_num_timeout=launch.slurm.max_requeues,
        slurm_python=shlex.quote(sys.executable),
    )
    executor.update_parameters(**executor_parameters(launch, name=name, dependency=dependency))
    return executor
