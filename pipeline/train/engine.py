"""DeepSpeed engine from the typed config: the DeepSpeed JSON is derived here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from pipeline.config import Config, check_batch


@dataclass
class DistEnv:
    """Where this process sits in the job (from the launcher's environment variables)."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environ(cls) -> "DistEnv":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"not started by a launcher: {', '.join(missing)} unset (use 'make pretrain' or "
                               "'python -m pipeline pretrain', which set them)")
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def init_distributed(config: Config) -> DistEnv:
    """Process group over NCCL on GPUs, gloo on CPU (DeepSpeed's accelerator picks), with a timeout so
    that a dead rank ends the job instead of hanging it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = DistEnv.from_environ()
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                               timeout=timedelta(minutes=config.deepspeed.comm_timeout_min))
    return env


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return torch.device(accelerator.device_name(accelerator.current_device()) if accelerator.device_name() != "cpu"
                        else "cpu")


def deepspeed_config(config: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run; batch arithmetic checked against the actual world size."""
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
    }


def param_groups(model: torch.nn.Module, config: Config) -> list[dict]:
    """timm's grouping: no weight decay on norms/biases/pos-embeds; per-layer lr scale when layer_decay is set."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if config.optim.layer_decay is not None:
        return param_groups_layer_decay(model, config.optim.weight_decay, no_weight_decay_list=skip,
                                        layer_decay=config.optim.layer_decay)
    return param_groups_weight_decay(model, config.optim.weight_decay, no_weight_decay_list=skip)


def use_fused_adamw(config: Config, dev: torch.device) -> bool:
    """torch AdamW's fused kernel: on CUDA by default (one launch instead of one per tensor group); on CPU it
    measured no faster inside DeepSpeed here (docs/performance.md), so it is opt-in there (optim.fused)."""
    return config.optim.fused if config.optim.fused is not None else dev.type == "cuda"


def make_optimizer(model: torch.nn.Module, config: Config, dev: torch.device) -> torch.optim.AdamW:
    """torch AdamW over timm's groups (fused per ``use_fused_adamw``)."""
    return torch.optim.AdamW(param_groups(model, config), lr=config.optim.lr, betas=tuple(config.optim.betas),
                             eps=config.optim.eps, fused=use_fused_adamw(config, dev) or None)


def compute_dtype(config: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.deepspeed.precision]


def create_engine(model: torch.nn.Module, config: Config, world_size: int, total_steps: int, warmup_steps: int):
    """(engine, base optimizer, lr schedule). The schedule is timm's warmup + cosine, stepped per update;
    it stays outside DeepSpeed because its value is a pure function of the step (exact on resume).
    ``model.compile``: after the EMA copy was taken (train.py), so the EMA stays an eager module."""
    import deepspeed
    from timm.scheduler import CosineLRScheduler

    optimizer = make_optimizer(model, config, device())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(config, world_size))
    if config.model.compile:
        engine.compile()  # the module is compiled in place: state-dict keys (checkpoints) unchanged
    schedule = CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=config.optim.min_lr,
                                 warmup_t=warmup_steps, warmup_lr_init=config.optim.warmup_lr, warmup_prefix=True,
                                 t_in_epochs=False)
    return engine, optimizer, schedule
