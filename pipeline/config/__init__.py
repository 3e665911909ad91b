"""One typed schema for a run: data, model, optimisation, DeepSpeed, checkpointing, tracking and launch.

YAML files in ``configs/`` fill it in; a file may name a ``base:`` file (or a list of them) that it
inherits from. ``key=value`` overrides come last. Everything is checked here, before any process is
started or job submitted: unknown keys, wrong types and impossible combinations raise ``ConfigError``
naming the key, which the CLI turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and what is allowed."""


@dataclass
class RunConfig:
    name: Optional[str] = None  # folder under root; unset: "<config stem>-<timestamp>", or the latest unfinished one
    root: str = "runs"
    seed: int = 0
    stage: str = "pretrain"  # pretrain | finetune (set by the command)
    stop_at_step: Optional[int] = None  # checkpoint and stop (resumable) here: run a long job in chunks


@dataclass
class DataConfig:
    train_shards: str = "data/digits/train-{000000..000007}.tar"  # brace pattern; '::' joins several
    val_shards: Optional[str] = "data/digits/val-{000000..000001}.tar"
    manifest: Optional[str] = None  # manifest.json with sample counts/classes; default: next to the shards
    train_samples: Optional[int] = None  # samples in one pass over train shards; default: from the manifest
    resampled: bool = False  # draw shards with replacement (large corpora); needs samples_per_epoch
    samples_per_epoch: Optional[int] = None  # what counts as an epoch; default: train_samples
    batch_size: int = 128  # GLOBAL batch per optimizer step = micro batch x ranks x grad_accum_steps
    num_workers: int = 2  # loader processes per rank
    shuffle_buffer: int = 1000  # samples held for shuffling within each worker
    prefetch_factor: int = 4
    pin_memory: bool = True  # only used on CUDA
    # Loader speed-ups of the random resized crop (pipeline/transforms.py, figures in docs/performance.md):
    draft_decode: bool = True  # decode JPEGs at 1/2-1/8 size when the crop is >= 2x the output
    torch_resize: bool = True  # resample with torch's uint8 antialiased kernel (Pillow's filter, ~4x faster)


@dataclass
class AugmentConfig:
    """Arguments of timm.data.create_transform / Mixup (None: timm's default)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = 0.4
    auto_augment: Optional[str] = None  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    re_prob: float = 0.0  # random erasing probability
    interpolation: str = "bicubic"
    crop_pct: Optional[float] = None  # eval resize ratio; None: timm default (0.875)
    mean: Optional[tuple[float, float, float]] = None  # None: ImageNet mean
    std: Optional[tuple[float, float, float]] = None
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (0 disables)
    cutmix: float = 0.0  # cutmix alpha (0 disables)
    mixup_prob: float = 1.0


@dataclass
class ModelConfig:
    """A timm model by name; set fields override the architecture's defaults (None: keep)."""

    name: str = "vit_tiny_patch16_224"
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    window_size: Optional[int] = None  # Swin
    embed_dim: Optional[int] = None
    depth: Any = None  # int (ViT) or list per stage (Swin)
    num_heads: Any = None  # int (ViT) or list per stage (Swin)
    num_classes: Optional[int] = None  # None: from the data manifest
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other timm.create_model argument
    compile: bool = False  # torch.compile through DeepSpeed's engine.compile (first steps slower: compiling)
    # NHWC input batches (timm train.py's --channels-last); the conv then runs NHWC. Weights stay contiguous:
    # DeepSpeed's parameter broadcast views them as bytes, which fails for channels-last weights.
    channels_last: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate for the global batch
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: float = 100.0
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    layer_decay: Optional[float] = None  # layer-wise lr decay (fine-tuning), e.g. 0.65
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum_steps: int = 1
    fused: Optional[bool] = None  # torch AdamW's fused kernel; None: on CUDA only (docs/performance.md)
    ema_decay: Optional[float] = None  # EMA of the weights (timm ModelEmaV3), e.g. 0.999; evaluated as val_top1_ema
    ema_warmup: bool = True  # ramp the decay up from 0 (short fine-tunes); see timm's ModelEmaV3


@dataclass
class FinetuneConfig:
    """Stage finetune: where the weights come from and how they are adapted (pipeline/finetune.py)."""

    pretrained: Optional[str] = None  # run dir | checkpoint dir | MLflow run id; --pretrained sets it
    pos_embed_method: str = "bicubic"  # resampling of ViT pos_embed / Swin tables (pipeline/adapt.py)
    antialias: bool = False  # False: the MAE/DeiT fine-tune convention (see adapt.resample_pos_embed)
    rel_pos_method: Optional[str] = None  # Swin bias tables; None: pos_embed_method; "geometric": timm's resize
    reinit_head: str = "auto"  # auto: new head when num_classes differs | always | never
    register_as: Optional[str] = None  # MLflow registered model; None: "<config family>-finetuned"; "" disables
    weights: Optional[str] = None  # set when resolved: the converted fp32 pretrained.safetensors


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: str = "bf16"  # fp32 | bf16 | fp16
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stage >= 1)
    comm_timeout_min: float = 10.0  # collective timeout: a dead rank ends the job instead of hanging it


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end (and on preemption)
    keep_last: int = 2  # complete checkpoints kept; older ones are removed


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<run.root>/mlflow.db
    artifact_location: Optional[str] = None  # None: <run.root>/mlartifacts for a local store
    experiment: Optional[str] = None  # None: "<stage>-<config family>"
    log_every_steps: int = 10
    flush_every_s: float = 5.0  # the background sender sends the journal this often (training never waits)
    final_wait_s: float = 60.0  # at the end, wait at most this long for an unreachable server, then keep a spool
    parent_run_id: Optional[str] = None  # MLflow run to nest under (the pipeline's parent run)
    system_metrics: bool = True  # per-node CPU/memory/GPU metrics, from each node's local rank 0
    peak_tflops: Optional[float] = None  # dense peak per device for MFU; None: known GPUs' table (none on CPU)


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 120  # USR2 this long before the time limit -> checkpoint and requeue
    max_requeues: int = 3
    extra_sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)


@dataclass
class LaunchConfig:
    cluster: str = "local"  # local | slurm | auto (slurm where sbatch exists)
    nproc: int = 1  # local processes
    nodes: int = 1  # slurm
    gpus_per_node: int = 0  # slurm; one task per GPU
    tasks_per_node: Optional[int] = None  # slurm; default: gpus_per_node, or 1 without GPUs
    wait: bool = False  # slurm: stream progress and wait for the job
    slurm_profile: Optional[str] = None  # YAML with a 'slurm:' section, e.g. configs/cluster/example.yaml
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def world_size(self) -> int:
        """Number of training processes the launch section asks for."""
        if self.launch.cluster == "slurm":
            return self.launch.nodes * self.tasks_per_node
        return self.launch.nproc

    @property
    def tasks_per_node(self) -> int:
        return self.launch.tasks_per_node or max(self.launch.gpus_per_node, 1)

    def micro_batch_size(self, world_size: Optional[int] = None) -> int:
        world = world_size or self.world_size
        return self.data.batch_size // (world * self.optim.grad_accum_steps)


# ----------------------------------------------------------------------------------------------------
# Loading


def _load_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged over the files its ``base:`` key names (relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' inheritance loops through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: must be a mapping of sections (run, data, model, ...)")
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _load_yaml_with_bases(path.parent / base, seen + (path,)))
    return OmegaConf.merge(merged, raw)


def _describe(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    first = str(exc).splitlines()[0]
    return f"{where}: key '{key}': {first}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML (with bases) <- ``key=value`` overrides, then validated."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _load_yaml_with_bases(Path(path)))
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, str(path))) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. optim.lr=1e-3)")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "override")) from None
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if config.launch.slurm_profile:
        config = _apply_slurm_profile(config)
    validate(config)
    return config


def _apply_slurm_profile(config: Config) -> Config:
    """Cluster settings (partition, account, ...) from a profile file, under explicit overrides."""
    profile = _load_yaml_with_bases(Path(config.launch.slurm_profile))
    unknown = set(profile.keys()) - {"slurm"}
    if unknown:
        raise ConfigError(f"{config.launch.slurm_profile}: only a 'slurm:' section is allowed, found {sorted(unknown)}")
    try:
        cfg = OmegaConf.structured(config)
        base_slurm = OmegaConf.merge(OmegaConf.structured(SlurmConfig), profile.get("slurm", {}))
        # fields the user set explicitly (differ from schema defaults) win over the profile
        explicit = {k: v for k, v in OmegaConf.to_container(cfg.launch.slurm).items()
                    if v != getattr(SlurmConfig(), k)}
        cfg.launch.slurm = OmegaConf.merge(base_slurm, explicit)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, config.launch.slurm_profile)) from None
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def from_yaml_file(path: str | Path) -> Config:
    """A resolved config saved with a run (already validated when it was written)."""
    return load_config(path)


# ----------------------------------------------------------------------------------------------------
# Validation of combinations the types cannot express


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


def validate(config: Config) -> None:
    """Checks that need more than one field, or a range."""
    _one_of("run.stage", config.run.stage, ("pretrain", "finetune"))
    _one_of("launch.cluster", config.launch.cluster, ("local", "slurm", "auto"))
    _one_of("deepspeed.zero_stage", config.deepspeed.zero_stage, (0, 1, 2, 3))
    _one_of("deepspeed.precision", config.deepspeed.precision, ("fp32", "bf16", "fp16"))
    _one_of("augment.interpolation", config.augment.interpolation, ("bilinear", "bicubic", "nearest", "random"))
    if config.deepspeed.offload_optimizer and config.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
    for key, value in [("launch.nproc", config.launch.nproc), ("launch.nodes", config.launch.nodes),
                       ("data.batch_size", config.data.batch_size),
                       ("optim.grad_accum_steps", config.optim.grad_accum_steps),
                       ("optim.lr", config.optim.lr), ("optim.epochs", config.optim.epochs),
                       ("data.prefetch_factor", config.data.prefetch_factor),
                       ("data.shuffle_buffer", config.data.shuffle_buffer),
                       ("tracking.log_every_steps", config.tracking.log_every_steps),
                       ("tracking.flush_every_s", config.tracking.flush_every_s),
                       ("checkpoint.keep_last", config.checkpoint.keep_last)]:
        _positive(key, value)
    for key, value in [("data.num_workers", config.data.num_workers),
                       ("optim.warmup_epochs", config.optim.warmup_epochs),
                       ("optim.weight_decay", config.optim.weight_decay),
                       ("optim.grad_clip", config.optim.grad_clip),
                       ("optim.min_lr", config.optim.min_lr),
                       ("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("tracking.final_wait_s", config.tracking.final_wait_s),
                       ("eval.every_steps", config.eval.every_steps),
                       ("augment.label_smoothing", config.augment.label_smoothing),
                       ("augment.mixup", config.augment.mixup), ("augment.cutmix", config.augment.cutmix),
                       ("launch.gpus_per_node", config.launch.gpus_per_node)]:
        _positive(key, value, allow_zero=True)
    if config.optim.warmup_epochs >= config.optim.epochs:
        raise ConfigError(f"optim.warmup_epochs={config.optim.warmup_epochs} must be below "
                          f"optim.epochs={config.optim.epochs}")
    if config.tracking.peak_tflops is not None:
        _positive("tracking.peak_tflops", config.tracking.peak_tflops)
    uri = config.tracking.tracking_uri
    if uri and ":" in uri and uri.split(":", 1)[0].split("+", 1)[0] not in TRACKING_SCHEMES:  # a plain path is a file store
        raise ConfigError(f"tracking.tracking_uri={uri!r} is not an MLflow store URI; use one of "
                          f"{', '.join(s + ':' for s in TRACKING_SCHEMES)} (e.g. http://mlflow-host:5000)")
    if config.optim.layer_decay is not None and not 0 < config.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay={config.optim.layer_decay} must be in (0, 1]")
    if not 0 <= config.augment.label_smoothing < 1:
        raise ConfigError(f"augment.label_smoothing={config.augment.label_smoothing} must be in [0, 1)")
    if config.data.resampled and not config.data.samples_per_epoch:
        raise ConfigError("data.resampled=true needs data.samples_per_epoch (how many samples make an epoch)")
    if config.launch.cluster == "slurm" and config.launch.tasks_per_node is not None and \
            config.launch.gpus_per_node and config.launch.tasks_per_node != config.launch.gpus_per_node:
        raise ConfigError(f"launch.tasks_per_node={config.launch.tasks_per_node} must equal "
                          f"launch.gpus_per_node={config.launch.gpus_per_node} (one process per GPU)")
    _check_slurm(config.launch)
    check_batch(config, config.world_size)
    _check_model(config.model)
    _check_finetune(config)


def _check_slurm(launch: LaunchConfig) -> None:
    """The Slurm section must make a job sbatch accepts and that can checkpoint before its time limit."""
    s = launch.slurm
    for key, value in [("launch.slurm.time_min", s.time_min), ("launch.slurm.cpus_per_task", s.cpus_per_task)] + \
            ([("launch.tasks_per_node", launch.tasks_per_node)] if launch.tasks_per_node is not None else []) + \
            ([("launch.slurm.mem_gb", s.mem_gb)] if s.mem_gb is not None else []):
        _positive(key, value)
    _positive("launch.slurm.signal_delay_s", s.signal_delay_s, allow_zero=True)
    _positive("launch.slurm.max_requeues", s.max_requeues, allow_zero=True)
    if s.signal_delay_s >= s.time_min * 60:
        raise ConfigError(f"launch.slurm.signal_delay_s={s.signal_delay_s} must be below the time limit "
                          f"launch.slurm.time_min={s.time_min} ({s.time_min * 60} s): the warning comes that long "
                          "before the limit, and a step plus a checkpoint must fit in it")
    from launch.slurm import check_extra_sbatch

    try:
        check_extra_sbatch(s.extra_sbatch)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_finetune(config: Config) -> None:
    from pipeline.model.adapt import INTERP_METHODS, REL_POS_METHODS

    f = config.finetune
    _one_of("finetune.pos_embed_method", f.pos_embed_method, INTERP_METHODS)
    if f.rel_pos_method is not None:
        _one_of("finetune.rel_pos_method", f.rel_pos_method, REL_POS_METHODS)
    _one_of("finetune.reinit_head", f.reinit_head, ("auto", "always", "never"))
    if f.antialias and f.pos_embed_method not in ("bicubic", "bilinear"):
        raise ConfigError(f"finetune.antialias=true needs finetune.pos_embed_method bicubic or bilinear, "
                          f"not {f.pos_embed_method!r}")
    decay = config.optim.ema_decay
    if decay is not None:
        if not 0 < decay < 1:
            raise ConfigError(f"optim.ema_decay={decay} must be in (0, 1), e.g. 0.999; unset disables EMA")
        if config.deepspeed.zero_stage == 3:
            raise ConfigError("optim.ema_decay needs every rank to hold the whole model; ZeRO-3 partitions it. "
                              "Use deepspeed.zero_stage 0, 1 or 2 with EMA, or unset optim.ema_decay")


def check_batch(config: Config, world_size: int) -> None:
    """The global batch must split evenly into ranks x accumulation steps."""
    per_step = world_size * config.optim.grad_accum_steps
    if config.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} (global) is not divisible by world size {world_size} x "
            f"optim.grad_accum_steps={config.optim.grad_accum_steps} = {per_step}; use a multiple of {per_step}")


def _check_model(model: ModelConfig) -> None:
    import timm  # deferred: importing timm takes seconds and is not needed for --help

    if not timm.is_model(model.name):
        stem = model.name.split("_")[0]
        close = timm.list_models(f"{stem}*")[:8]
        raise ConfigError(f"model.name={model.name!r} is not a timm model; e.g. {', '.join(close) or 'vit_base_patch16_224'}")
    for key in ("depth", "num_heads"):
        value = getattr(model, key)
        ok = value is None or isinstance(value, int) or (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value))
        if not ok:
            raise ConfigError(f"model.{key}={value!r} must be an int (ViT) or a list of ints per stage (Swin)")
