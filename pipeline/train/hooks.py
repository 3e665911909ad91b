"""A stage's additions to the one training loop, called at fixed points so the loop itself has no stage branches.

Pretraining adds nothing; fine-tuning (pipeline/finetune/hooks.py) brings the pretrained weights in when the
model is built, records the lineage once tracking is up, and exports and registers the model at the end.
"""

from __future__ import annotations

from torch import nn


class StageHooks:
    """Each method gets the Trainer (pipeline/train/trainer.py), built as far as the method says."""

    def before_start(self, trainer) -> None:
        """Before anything is built (the process group exists): e.g. weights that only now can be converted."""

    def on_model_built(self, model: nn.Module, trainer) -> None:
        """The fresh timm model, before the objective wraps it and DeepSpeed takes it (not called on resume:
        the checkpoint then holds the weights)."""

    def on_tracking_started(self, trainer) -> None:
        """Rank 0, first attempt of the run only: tracking is up (params and lineage go in now)."""

    def on_finished(self, trainer, final: dict) -> None:
        """Rank 0, after the final checkpoint is complete and before summary.json marks the run finished."""
