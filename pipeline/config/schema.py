"""The typed schema of a run, section by section, each section with its own checks right below its fields.

YAML files in ``configs/`` fill it in (pipeline/config/load.py); every check here is cheap and imports nothing
heavy, so a wrong key, type or range is reported in about a second, before torch, timm or DeepSpeed load.
Checks raise ``ConfigError`` naming the key and what is allowed; the CLI prints it as one line, exit code 2.
The launch section is plain data here: only ``launch/`` interprets it (Slurm's own checks live there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and what is allowed."""


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _all_positive(section: str, obj, names: str, allow_zero: bool = False) -> None:
    for name in names.split():
        positive(f"{section}.{name}", getattr(obj, name), allow_zero)


STAGES = ("pretrain", "finetune")
CLUSTERS = ("local", "slurm", "auto")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
# resampling modes of pipeline/model/adapt.py (F.interpolate modes that make sense on a 2-D grid)
POS_EMBED_METHODS = ("bicubic", "bilinear", "nearest", "nearest-exact")
REL_POS_METHODS = POS_EMBED_METHODS + ("geometric",)
OBJECTIVES = ("supervised", "mae", "simmim")
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


@dataclass
class RunConfig:
    name: Optional[str] = None  # folder under root; unset: "<config stem>-<timestamp>", or the latest unfinished one
    root: str = "runs"
    seed: int = 0
    stage: str = "pretrain"  # pretrain | finetune (set by the command)
    stop_at_step: Optional[int] = None  # checkpoint and stop (resumable) here: run a long job in chunks

    def check(self) -> None:
        one_of("run.stage", self.stage, STAGES)
        if self.stop_at_step is not None:
            positive("run.stop_at_step", self.stop_at_step)


@dataclass
class DataConfig:
    # brace pattern of local paths, http(s):// URLs or pipe:<command>s; '::' joins several
    train_shards: str = "data/digits/train-{000000..000007}.tar"
    val_shards: Optional[str] = "data/digits/val-{000000..000001}.tar"
    # manifest.json (or a wids shard index) with sample counts/classes; default: next to the shards
    manifest: Optional[str] = None
    # samples in one pass over train shards; default: from the manifest, else from the shard index (built once)
    train_samples: Optional[int] = None
    shard_retries: int = 2  # a remote shard whose stream fails is opened again this often, then skipped and counted
    read_timeout_s: float = 60.0  # a remote shard that sends nothing for this long counts as failed (retried)
    resampled: bool = False  # draw shards with replacement (large corpora); needs samples_per_epoch
    samples_per_epoch: Optional[int] = None  # what counts as an epoch; default: train_samples
    batch_size: int = 128  # GLOBAL batch per optimizer step = micro batch x ranks x grad_accum_steps
    num_workers: int = 2  # loader processes per rank
    # Canonical sample streams (None: the shard count, at most 64, dividing batch_size). Fixed for a run: every
    # global batch takes batch_size / streams samples from each stream, so it is the same set of samples on any
    # number of ranks and loader workers (a run may resume on another world size that divides it).
    streams: Optional[int] = None
    # Train on this many labelled samples only, class-balanced and deterministic (few-label fine-tuning, e.g. 150)
    train_subset: Optional[int] = None
    # Which subset: its own seed, not run.seed, so that runs with other run.seeds train on the same labels and
    # compare training, not data (as the fixed 1%/10% ImageNet label splits SimCLR published, reused by later papers)
    train_subset_seed: int = 0
    record_keys: bool = False  # write each step's sample keys to <run>/keys/ (audits, the elastic-resume test)
    shuffle_buffer: int = 1000  # samples held for shuffling within each worker
    prefetch_factor: int = 4
    pin_memory: bool = True  # only used on CUDA
    # Loader speed-ups of the random resized crop (pipeline/transforms.py, figures in docs/performance.md):
    draft_decode: bool = True  # decode JPEGs at 1/2-1/8 size when the crop is >= 2x the output
    torch_resize: bool = True  # crops of >= 64x64 px: torch's uint8 antialiased kernel (Pillow's filter, 2-4x faster)

    def check(self) -> None:
        _all_positive("data", self, "batch_size prefetch_factor shuffle_buffer read_timeout_s")
        _all_positive("data", self, "num_workers shard_retries", allow_zero=True)
        if self.streams is not None:
            positive("data.streams", self.streams)
        if self.train_subset is not None:
            positive("data.train_subset", self.train_subset)
        if self.resampled and not self.samples_per_epoch:
            raise ConfigError("data.resampled=true needs data.samples_per_epoch (how many samples make an epoch)")


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

    def check(self) -> None:
        one_of("augment.interpolation", self.interpolation, INTERPOLATIONS)
        _all_positive("augment", self, "label_smoothing mixup cutmix", allow_zero=True)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"augment.label_smoothing={self.label_smoothing} must be in [0, 1)")


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

    def check(self) -> None:
        """The shape of the fields; whether timm knows the name is checked where timm is imported
        (pipeline/model/factory.py check_model), after these cheap checks."""
        for key in ("depth", "num_heads"):
            value = getattr(self, key)
            ok = (
                value is None
                or isinstance(value, int)
                or (isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value))
            )
            if not ok:
                raise ConfigError(f"model.{key}={value!r} must be an int (ViT) or a list of ints per stage (Swin)")


@dataclass
class ObjectiveConfig:
    """What pretraining optimises (pipeline/train/objectives/): supervised classification, or masked-image
    modelling on unlabelled shards: MAE (ViT) or SimMIM (ViT, Swin)."""

    name: str = "supervised"  # supervised | mae | simmim
    mask_ratio: Optional[float] = None  # None: 0.75 (MAE) / 0.6 (SimMIM)
    norm_pix_loss: bool = True  # MAE: each patch's target normalised by its own mean and variance
    decoder_dim: int = 512  # MAE decoder (the ViT-B recipe: 8 blocks x 512 wide, 16 heads)
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_patch_size: Optional[int] = None  # SimMIM: None: input / 6 (its 32 px at 192), a multiple of the stride
    knn_k: int = 20  # evaluation: DINO-style weighted k-NN top-1 on val features (val labels needed)
    knn_temperature: float = 0.07
    pictures: int = 8  # val images in the original / masked / reconstructed picture of each eval (0: none)

    def check(self) -> None:
        one_of("objective.name", self.name, OBJECTIVES)
        if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
            raise ConfigError(f"objective.mask_ratio={self.mask_ratio} must be in (0, 1), e.g. 0.75 (MAE)")
        _all_positive("objective", self, "decoder_dim decoder_depth decoder_heads knn_k knn_temperature")
        positive("objective.pictures", self.pictures, allow_zero=True)
        if self.mask_patch_size is not None:
            positive("objective.mask_patch_size", self.mask_patch_size)
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(
                f"objective.decoder_dim={self.decoder_dim} must be divisible by "
                f"objective.decoder_heads={self.decoder_heads}"
            )


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

    def check(self) -> None:
        _all_positive("optim", self, "lr epochs grad_accum_steps")
        _all_positive("optim", self, "warmup_epochs weight_decay grad_clip min_lr", allow_zero=True)
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"optim.warmup_epochs={self.warmup_epochs} must be below optim.epochs={self.epochs}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay={self.layer_decay} must be in (0, 1]")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999; unset disables EMA")


FROM_SCRATCH = "none"  # finetune.pretrained / PRETRAINED: the recipe from random init


@dataclass
class FinetuneConfig:
    """Stage finetune: where the weights come from and how they are adapted (pipeline/finetune.py)."""

    # run dir | checkpoint dir | MLflow run id; --pretrained sets it; "none": random init (the from-scratch baseline)
    pretrained: Optional[str] = None
    pos_embed_method: str = "bicubic"  # resampling of ViT pos_embed / Swin tables (pipeline/adapt.py)
    antialias: bool = False  # False: the MAE/DeiT fine-tune convention (see adapt.resample_pos_embed)
    rel_pos_method: Optional[str] = None  # Swin bias tables; None: pos_embed_method; "geometric": timm's resize
    reinit_head: str = "auto"  # auto: new head when num_classes differs | always | never
    register_as: Optional[str] = None  # MLflow registered model; None: "<config family>-finetuned"; "" disables
    weights: Optional[str] = None  # set when resolved: the converted fp32 pretrained.safetensors

    def check(self) -> None:
        one_of("finetune.pos_embed_method", self.pos_embed_method, POS_EMBED_METHODS)
        if self.rel_pos_method is not None:
            one_of("finetune.rel_pos_method", self.rel_pos_method, REL_POS_METHODS)
        one_of("finetune.reinit_head", self.reinit_head, ("auto", "always", "never"))
        if self.antialias and self.pos_embed_method not in ("bicubic", "bilinear"):
            raise ConfigError(
                f"finetune.antialias=true needs finetune.pos_embed_method bicubic or bilinear, "
                f"not {self.pos_embed_method!r}"
            )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: str = "bf16"  # fp32 | bf16 | fp16
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stage >= 1)
    comm_timeout_min: float = 10.0  # collective timeout: a dead rank ends the job instead of hanging it

    def check(self) -> None:
        one_of("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        one_of("deepspeed.precision", self.precision, ("fp32", "bf16", "fp16"))
        positive("deepspeed.comm_timeout_min", self.comm_timeout_min)
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end (and on preemption)
    keep_last: int = 2  # complete checkpoints kept; older ones are removed
    # Copy the state to host memory, write the files in a background thread (the marker once every rank's are
    # durable). None: on with CUDA, off on CPU-only machines, where the writer shares the cores and the host copy
    # (one checkpoint per rank, kept for the run) the RAM with training (docs/performance.md).
    background_write: Optional[bool] = None

    def check(self) -> None:
        positive("checkpoint.keep_last", self.keep_last)
        positive("checkpoint.every_steps", self.every_steps, allow_zero=True)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end

    def check(self) -> None:
        positive("eval.every_steps", self.every_steps, allow_zero=True)


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

    def check(self) -> None:
        _all_positive("tracking", self, "log_every_steps flush_every_s")
        positive("tracking.final_wait_s", self.final_wait_s, allow_zero=True)
        if self.peak_tflops is not None:
            positive("tracking.peak_tflops", self.peak_tflops)
        uri = self.tracking_uri
        if uri and ":" in uri and uri.split(":", 1)[0].split("+", 1)[0] not in TRACKING_SCHEMES:  # a path: file store
            raise ConfigError(
                f"tracking.tracking_uri={uri!r} is not an MLflow store URI; use one of "
                f"{', '.join(s + ':' for s in TRACKING_SCHEMES)} (e.g. http://mlflow-host:5000)"
            )


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60
    cpus_per_task: Optional[int] = None  # per task (rank); None: the nodes' CPUs / tasks per node (from sinfo)
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
    # A rank without progress this long ends the job (0: no watchdog); collectives' own timeouts do not fire on
    # CPU and not for every hang on GPUs (docs/reliability.md). Before the first step and during checkpoint
    # saves the longer startup_grace_s applies (imports, rendezvous, compilation, large saves).
    hang_timeout_s: float = 600.0
    startup_grace_s: float = 1800.0
    heartbeat_s: float = 5.0  # each rank writes its progress this often (a small file in <run>/heartbeat/)
    max_failures: int = 0  # restart a failed run this many times from its latest checkpoint (not the same error twice)
    slurm_profile: Optional[str] = None  # YAML with a 'slurm:' section, e.g. configs/cluster/example.yaml
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def ranks_per_node(self) -> int:
        """Slurm tasks per node: one per GPU, one per node on CPU, unless tasks_per_node says otherwise."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node if self.cluster == "slurm" else self.nproc

    def check(self) -> None:
        """The process counts; the Slurm settings are checked by launch/ before anything is submitted."""
        one_of("launch.cluster", self.cluster, CLUSTERS)
        _all_positive("launch", self, "nproc nodes heartbeat_s")
        _all_positive("launch", self, "hang_timeout_s startup_grace_s max_failures", allow_zero=True)
        positive("launch.gpus_per_node", self.gpus_per_node, allow_zero=True)
        if self.tasks_per_node is not None:
            positive("launch.tasks_per_node", self.tasks_per_node)
            if self.cluster == "slurm" and self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
                raise ConfigError(
                    f"launch.tasks_per_node={self.tasks_per_node} must equal "
                    f"launch.gpus_per_node={self.gpus_per_node} (one process per GPU)"
                )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
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
        return self.launch.world_size

    def micro_batch_size(self, world_size: Optional[int] = None) -> int:
        world = world_size or self.world_size
        return self.data.batch_size // (world * self.optim.grad_accum_steps)

    def check(self) -> None:
        """Every section's own checks, then the combinations that span sections."""
        for section in (
            self.run,
            self.data,
            self.augment,
            self.model,
            self.objective,
            self.optim,
            self.finetune,
            self.deepspeed,
            self.checkpoint,
            self.eval,
            self.tracking,
            self.launch,
        ):
            section.check()
        if self.optim.ema_decay is not None and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "optim.ema_decay needs every rank to hold the whole model; ZeRO-3 partitions it. "
                "Use deepspeed.zero_stage 0, 1 or 2 with EMA, or unset optim.ema_decay"
            )
        check_objective_combinations(self)
        check_batch(self, self.world_size)


def check_objective_combinations(config: Config) -> None:
    """What a masked-image-modelling objective cannot be combined with, each named."""
    name, model = config.objective.name, config.model.name
    if name == "supervised":
        return
    if name == "mae" and not model.startswith(("vit_", "deit_")):
        raise ConfigError(
            f"objective.name=mae needs a ViT (model.name=vit_*); {model} is not one. For Swin use objective.name=simmim"
        )
    if name == "simmim" and not model.startswith(("vit_", "deit_", "swin")):
        raise ConfigError(f"objective.name=simmim needs a ViT or a Swin (model.name=vit_* or swin*), not {model}")
    a = config.augment
    for key, value in (
        ("augment.mixup", a.mixup),
        ("augment.cutmix", a.cutmix),
        ("augment.label_smoothing", a.label_smoothing),
    ):
        if value:
            raise ConfigError(
                f"{key}={value} mixes or smooths labels, which objective.name={name} has none of; set {key}=0"
            )
    if config.run.stage == "finetune":
        raise ConfigError(
            f"objective.name={name} is a pretraining objective; a fine-tune is supervised "
            f"(leave objective.name out of the fine-tune config)"
        )


def check_batch(config: Config, world_size: int) -> None:
    """The global batch must split evenly into ranks x accumulation steps."""
    per_step = world_size * config.optim.grad_accum_steps
    if config.data.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} (global) is not divisible by world size {world_size} x "
            f"optim.grad_accum_steps={config.optim.grad_accum_steps} = {per_step}; use a multiple of {per_step}"
        )
