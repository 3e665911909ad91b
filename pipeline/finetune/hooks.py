"""Fine-tuning's plug-in of the Trainer: pretrained weights in, lineage recorded, the model exported at the end."""

from __future__ import annotations

import time

from torch import nn

from pipeline.config import FROM_SCRATCH
from pipeline.train.hooks import StageHooks


class FinetuneHooks(StageHooks):
    def before_start(self, trainer) -> None:
        """A fine-tune chained after its pretraining job (``make pipeline`` on Slurm) is submitted before those
        weights exist: rank 0 converts them here, once (a requeued job finds them), while the others wait."""
        config, run = trainer.config, trainer.run
        if config.finetune.weights or config.finetune.pretrained == FROM_SCRATCH:
            return
        if trainer.is_main and not run.pretrained_ready.exists():
            from pipeline.config import ConfigError
            from pipeline.finetune.resolve import resolve_pretrained
            from pipeline.rundir import RunDir

            source = RunDir(config.finetune.pretrained or "")
            if not source.is_complete():
                raise ConfigError(
                    f"the pretraining run {source} did not finish (no summary.json): resume it, "
                    f"then start the fine-tune (make finetune PRETRAINED={source})"
                )
            resolve_pretrained(config, str(source.path), family=None)
            run.write_config(config)
            run.pretrained_ready.write_text(str(config.finetune.weights))
        while not run.pretrained_ready.exists():  # rank 0 failing ends the job
            time.sleep(1.0)
        trainer.config = config = run.load_config()

    def on_model_built(self, model: nn.Module, trainer) -> None:
        from pipeline.finetune.lineage import load_pretrained

        if trainer.config.finetune.pretrained == FROM_SCRATCH:
            return  # the baseline: random init
        load_pretrained(model, trainer.config, trainer.run, is_main=trainer.is_main)

    def on_tracking_started(self, trainer) -> None:
        from pipeline.finetune.lineage import log_lineage

        log_lineage(trainer.tracker, trainer.run)

    def on_finished(self, trainer, final: dict) -> None:
        from pipeline.finetune.export import export_model
        from pipeline.tracking.tracker import end_parent_run
        from pipeline.train import checkpoint as ckpt
        from pipeline.train.ema import ema_state

        export_model(
            trainer.config, trainer.run, ckpt.tag_for(trainer.step), ema_state(trainer.ema), trainer.tracker, final
        )
        end_parent_run(trainer.config)  # a fine-tune nested under a pipeline run is that pipeline's last stage
