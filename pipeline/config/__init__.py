"""The run configuration: a typed schema with per-section checks (schema.py) and its loading (load.py)."""

from pipeline.config.load import check_overrides, flatten, from_yaml_file, load_config, to_dict, to_yaml
from pipeline.config.schema import (
    AugmentConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    FinetuneConfig,
    LaunchConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SlurmConfig,
    TrackingConfig,
    check_batch,
)

__all__ = [
    "AugmentConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LaunchConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SlurmConfig",
    "TrackingConfig",
    "check_batch",
    "check_overrides",
    "flatten",
    "from_yaml_file",
    "load_config",
    "to_dict",
    "to_yaml",
]
