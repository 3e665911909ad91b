"""``python -m pipeline.worker RUN_DIR``: one rank of a run, started by a launcher (local or Slurm)."""

import logging
import os
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m pipeline.worker RUN_DIR (started by the launchers, not by hand)", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-rank INFO lines drown the progress output
    from .train import run_worker

    return run_worker(sys.argv[1])


if __name__ == "__main__":
    sys.exit(main())
