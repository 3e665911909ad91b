"""One rank of a run: ``python -m pipeline.worker RUN_DIR`` (local launcher) or ``pipeline.worker:run`` (the
Slurm task calls it). The composition root: it reads the run's config, joins the process group the launcher
described, and gives the Trainer the stage's hooks."""

from __future__ import annotations

import logging
import os
import sys


def stage_hooks(stage: str) -> list:
    """What a stage adds to the one training loop (pipeline/train/hooks.py)."""
    if stage == "finetune":
        from pipeline.finetune.hooks import FinetuneHooks

        return [FinetuneHooks()]
    return []


def run(run_dir: str) -> int:
    """0: the run is complete; 3 (EXIT_RESUMABLE): stopped with a checkpoint to resume from."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from pipeline.train.startup import StartupClock

    startup = StartupClock()
    startup.mark_spawn()
    startup.mark("rank_start")  # the rank's interpreter and its first imports
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from pipeline.rundir import RunDir
    from pipeline.train.engine import init_distributed
    from pipeline.train.trainer import Trainer

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-rank INFO lines drown the progress output
    startup.mark("imports")  # torch, DeepSpeed, timm
    folder = RunDir(run_dir)
    config = folder.load_config()
    env = init_distributed(config)
    startup.mark("process_group")
    logging.basicConfig(
        level=logging.INFO if env.rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{env.rank}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    try:
        return Trainer(config, folder, env, stage_hooks(config.run.stage), startup).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.worker RUN_DIR (started by the launchers, not by hand)", file=sys.stderr)
        return 2
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main())
