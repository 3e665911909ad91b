"""Training objectives: ``build_objective(config, num_classes)`` picks the one ``objective.name`` names."""

from __future__ import annotations

from pipeline.train.objectives.base import Evaluation, Objective, StepContext

OBJECTIVES = ("supervised", "mae", "simmim")


def build_objective(config, num_classes: int) -> Objective:
    name = config.objective.name
    if name == "supervised":
        from pipeline.train.objectives.supervised import Supervised

        return Supervised(config, num_classes)
    from pipeline.train.objectives.mim import MaskedImageModelling

    return MaskedImageModelling(config)


def backbone_state(config, state_dict: dict) -> dict:
    """A trained module's state dict (consolidated from a checkpoint) under the timm model's names, as the
    objective of the run that trained it (``config``; None: unknown, taken as supervised) maps them."""
    if config is None or config.objective.name == "supervised":
        return state_dict
    from pipeline.train.objectives.mim import MaskedImageModelling

    return MaskedImageModelling(config).backbone_state(state_dict)


__all__ = ["OBJECTIVES", "Evaluation", "Objective", "StepContext", "backbone_state", "build_objective"]
