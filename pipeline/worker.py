"""``python -m pipeline.worker RUN_DIR``: one rank of a run, started by a launcher (local or Slurm)."""

import logging
import os
import sys
import time


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m pipeline.worker RUN_DIR (started by the launchers, not by hand)", file=sys.stderr)
        return 2
    return run(sys.argv[1])


def run(run_dir: str) -> int:
    """One rank in this process: the entry point the Slurm launcher calls ("pipeline.worker:run")."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-rank INFO lines drown the progress output
    from pipeline.train.trainer import run_worker

    return run_worker(run_dir)


READY_FILE = "pretrained.ready"


def run_after_pretrain(run_dir: str, family: str, poll_s: float = 1.0) -> int:
    """Entry of a fine-tune job chained after its pretraining job (Slurm afterok): the pretrained weights
    exist only once that job has finished, so rank 0 converts them here, once (a requeued job finds them),
    while the other ranks wait for it; then every rank trains as usual."""
    from pathlib import Path

    path = Path(run_dir)
    ready = path / READY_FILE
    if int(os.environ.get("RANK", "0")) == 0 and not ready.exists():
        from pipeline.config import ConfigError
        from pipeline.finetune.pretrained import resolve_pretrained
        from pipeline.rundir import is_complete, load_saved, write_config

        config = load_saved(path)
        source = Path(config.finetune.pretrained or "")
        if not is_complete(source):
            raise ConfigError(f"the pretraining run {source} did not finish (no summary.json): resume it, then "
                              f"start the fine-tune (make finetune PRETRAINED={source})")
        resolve_pretrained(config, str(source), family)
        write_config(path, config)
        ready.write_text(str(config.finetune.weights))
    while not ready.exists():  # rank 0 failing ends the job (srun --kill-on-bad-exit)
        time.sleep(poll_s)
    return run(run_dir)


if __name__ == "__main__":
    sys.exit(main())
