"""DeepSpeed engine from the typed config: the DeepSpeed JSON is derived here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from pipeline.config import Config, check_batch


@dataclass
class DistEnv:
    """Where this process sits in the job, as the launcher (local or Slurm, launch/) describes it in the
    environment: torch's variables plus the node's name and the job's id. Nothing here knows the scheduler."""

    rank: int
    local_rank: int
    world_size: int
    node: str = "localhost"  # the launcher's name for this node (tags and system metrics use it)
    job_id: str = ""  # the scheduler's job id, "" for a local run
    attempt: int = 0  # 0 for the first attempt of a job, then 1, 2, ... after requeues

    @classmethod
    def from_environ(cls) -> DistEnv:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"not started by a launcher: {', '.join(missing)} unset (use 'make pretrain' or "
                "'python -m pipeline pretrain', which set them)"
            )
        return cls(
            int(os.environ["RANK"]),
            int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ["WORLD_SIZE"]),
            os.environ.get("VITPIPE_NODE", "localhost"),
            os.environ.get("VITPIPE_JOB_ID", ""),
            int(os.environ.get("VITPIPE_ATTEMPT", "0")),
        )


def init_distributed(config: Config) -> DistEnv:
    """Process group over NCCL on GPUs, gloo on CPU (DeepSpeed's accelerator picks), with a timeout so
    that a dead rank ends the job instead of hanging it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = DistEnv.from_environ()
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(env.local_rank)
    # DeepSpeed makes its ZeRO groups with new_group() and no timeout, i.e. torch's default (30 min), not the one
    # given here; measured: a stopped peer then hung the data-parallel all-reduce past comm_timeout_min. Setting
    # the default first gives every group the configured timeout (the hang watchdog still covers what it misses).
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(minutes=config.deepspeed.comm_timeout_min)
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(),
        timeout=timedelta(minutes=config.deepspeed.comm_timeout_min),
    )
    return env


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return torch.device(
        accelerator.device_name(accelerator.current_device()) if accelerator.device_name() != "cpu" else "cpu"
    )


def deepspeed_config(config: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run; batch arithmetic checked against the actual world size.
    ``load_universal``: the run resumes from a universal checkpoint (another world size)."""
    check_batch(config, world_size)
    ds = config.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=ds.zero_stage >= 2 and torch.cuda.is_available(), contiguous_gradients=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": config.data.batch_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size(world_size),
        "gradient_accumulation_steps": config.optim.grad_accum_steps,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no FusedAdam build, same code on CPU and GPU
        "steps_per_print": 10**9,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def compute_dtype(config: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.deepspeed.precision]


def create_engine(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    world_size: int,
    load_universal: bool = False,
):
    """The DeepSpeed engine around the module and its (torch) optimizer. ``model.compile``: compiled in place after
    the EMA copy was taken, so the EMA stays an eager module and state-dict keys (checkpoints) are unchanged."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(config, world_size, load_universal)
    )
    if config.model.compile:
        engine.compile()
    return engine
