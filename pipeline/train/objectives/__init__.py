"""Training objectives: ``build_objective(config, num_classes)`` picks the one the config names."""

from __future__ import annotations

from pipeline.train.objectives.base import Evaluation, Objective, StepContext

OBJECTIVES = ("supervised",)


def build_objective(config, num_classes: int) -> Objective:
    from pipeline.train.objectives.supervised import Supervised

    return Supervised(config, num_classes)


def backbone_state(config, state_dict: dict) -> dict:
    """A trained module's state dict (consolidated from a checkpoint) under the timm model's names, as the
    objective of the run that trained it (``config``, None: unknown, taken as supervised) maps them."""
    return state_dict


__all__ = ["OBJECTIVES", "Evaluation", "Objective", "StepContext", "backbone_state", "build_objective"]
