"""A DeepSpeed checkpoint of any ZeRO stage -> one full fp32 state dict on CPU, whatever world size wrote it.

Why not DeepSpeed's ``zero_to_fp32`` as it is: it ``torch.load``s every file with ``weights_only=False``
(a pickle may run arbitrary code) and refuses stage 0 ("is not a zero checkpoint"). Here every file is
loaded with ``weights_only=True``, allowing only the few plain DeepSpeed types its pickles contain
(``SAFE_GLOBALS``), and the tensors are handed to ``zero_to_fp32``'s own merge functions, which do the
ZeRO-1/2/3 reassembly (partition order, alignment padding, shared and frozen parameters). Those are
private functions of the locked DeepSpeed version; ``tests/e2e/test_finetune.py`` checks the result on real
checkpoints of every stage.

Where the fp32 weights are, by stage:

* 0, fp32: the module's own state dict (the model-states file).
* 0, bf16/fp16: the fp32 master copies, one flat tensor per optimizer param group (``fp32_groups_flat``);
  their layout is the param groups of the run that wrote them, rebuilt from its ``config.yaml``, and
  checked against the module's low-precision values so a wrong layout cannot pass silently.
* 1-2: the flat fp32 partitions of every rank's optimizer file (``single_partition_of_fp32_groups``).
* 3: the same (``fp32_flat_groups``), partitioned per parameter.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from pipeline.files import replacing

MODEL_STATES = "*model_states.pt"
OPTIM_STATES = "*_optim_states.pt"


class CheckpointError(ValueError):
    """The folder is not a readable DeepSpeed checkpoint; the message says what is missing."""


@dataclass
class Consolidated:
    state_dict: dict[str, Tensor]  # full fp32 (float tensors) state dict, CPU, contiguous
    zero_stage: int
    world_size: int  # data-parallel ranks that wrote the checkpoint
    ds_version: str
    precision: str  # fp32 | bf16 | fp16 of the training run


def safe_globals() -> list:
    """The DeepSpeed classes its checkpoint pickles hold besides tensors and containers: plain data."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def _allowed():
    with torch.serialization.safe_globals(safe_globals()):
        yield


def load_file(path: Path, mmap: bool = False) -> dict:
    """One checkpoint file, weights_only=True; a failure names the file and the type it refused."""
    try:
        with _allowed():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if "Unsupported global" in line]
        raise CheckpointError(
            f"{path}: cannot be loaded with weights_only=True "
            f"({lines[0].strip() if lines else type(exc).__name__ + ': ' + str(exc)[:300]})"
        ) from None


def _stage_and_precision(ds_config: dict) -> tuple[int, str]:
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    precision = (
        "bf16"
        if (ds_config.get("bf16") or {}).get("enabled")
        else "fp16"
        if (ds_config.get("fp16") or {}).get("enabled")
        else "fp32"
    )
    return stage, precision


def consolidate(tag_dir: str | Path) -> Consolidated:
    """Full fp32 weights from one checkpoint folder (``.../checkpoints/stepNNNNNNNN``), on CPU."""
    tag_dir = Path(tag_dir)
    model_files = sorted(tag_dir.glob(MODEL_STATES), key=_rank_order)
    if not model_files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file ({MODEL_STATES}) in it")
    first = load_file(model_files[0])
    if "module" not in first or "ds_config" not in first:
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model states file (no 'module'/'ds_config')")
    stage, precision = _stage_and_precision(first["ds_config"])
    world = int(first.get("dp_world_size", 1))
    version = str(first.get("ds_version", "?"))
    if stage == 0:
        sd = _stage0(first, precision, tag_dir)
    else:
        sd = _zero(tag_dir, model_files, first, stage, world)
    expected = list(first["module"])
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{tag_dir}: consolidation lost {len(missing)} tensor(s), e.g. {missing[:3]}")
    # the model's own key order; own memory (no views into mmap'd files or shared flat buffers)
    sd = OrderedDict((k, sd[k].detach().clone(memory_format=torch.contiguous_format)) for k in expected)
    return Consolidated(sd, stage, world, version, precision)


def _rank_order(path: Path) -> tuple:
    from deepspeed.utils.zero_to_fp32 import natural_keys

    return tuple(natural_keys(path.name))


def _stage0(states: dict, precision: str, tag_dir: Path) -> dict[str, Tensor]:
    module = states["module"]
    if precision == "fp32":
        return dict(module)
    # DeepSpeed's FP16_Optimizer (fused, GPU) keeps one flat fp32 tensor per param group, its unfused
    # variant (CPU) a list of per-parameter tensors; both follow the order of the run's param groups
    optimizer = states.get("optimizer") or {}
    masters = optimizer.get("fp32_groups_flat") or optimizer.get("fp32_groups")
    if not masters:
        raise CheckpointError(f"{tag_dir}: ZeRO-0 {precision} checkpoint without fp32 master weights")
    names = _param_group_names(tag_dir)
    sd = dict(module)
    for group, master in zip(names, masters, strict=True):
        if isinstance(master, Tensor):  # flat: split at the parameters' sizes
            sizes = [module[n].numel() for n in group]
            if sum(sizes) != master.numel():
                raise CheckpointError(
                    f"{tag_dir}: fp32 master group of {master.numel()} values does not match "
                    f"the run's param group of {sum(sizes)}"
                )
            master = master.split(sizes)
        if len(master) != len(group):
            raise CheckpointError(
                f"{tag_dir}: fp32 master group of {len(master)} tensors does not match the "
                f"run's param group of {len(group)}"
            )
        for name, value in zip(group, master):
            low = module[name]
            value = value.reshape(low.shape)
            if not torch.equal(value.to(low.dtype), low):  # the saved low-precision weights are the masters, rounded
                raise CheckpointError(f"{tag_dir}: fp32 master of {name} does not round to the saved weights")
            sd[name] = value
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _param_group_names(tag_dir: Path) -> list[list[str]]:
    """Names per optimizer param group, as the run that wrote the checkpoint grouped them (pipeline/engine.py),
    on a model built on the meta device (no memory, no init cost)."""
    from pipeline.config import ConfigError, from_yaml_file
    from pipeline.model.factory import create_model
    from pipeline.rundir import RunDir
    from pipeline.train.optim import param_groups

    run_config = RunDir(tag_dir.parent.parent).config
    if not run_config.exists():
        raise CheckpointError(
            f"{tag_dir}: a ZeRO-0 low-precision checkpoint needs its run's config.yaml "
            f"(looked for {run_config}) to lay out the fp32 master weights"
        )
    try:
        config = from_yaml_file(run_config)
    except ConfigError as exc:
        raise CheckpointError(f"{run_config}: {exc}") from None
    with torch.device("meta"):
        model = create_model(config.model, config.model.num_classes)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"] if p.requires_grad] for g in param_groups(model, config)]
    return [g for g in groups if g]  # DeepSpeed drops empty groups


def _zero(tag_dir: Path, model_files: list[Path], first: dict, stage: int, world: int) -> dict[str, Tensor]:
    """ZeRO 1-3: zero_to_fp32's merge on tensors loaded here with weights_only=True."""
    from deepspeed.utils import zero_to_fp32 as z

    optim_files = sorted(tag_dir.glob(OPTIM_STATES), key=_rank_order)
    if len(optim_files) != world:
        raise CheckpointError(
            f"{tag_dir}: {len(optim_files)} optimizer partition file(s) for the {world} "
            f"ranks that wrote it; the checkpoint is incomplete"
        )
    model_states = [_model_state(first if i == 0 else load_file(f), z) for i, f in enumerate(model_files)]
    flats, paddings = [], None
    key = z.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else z.FP32_FLAT_GROUPS
    for f in optim_files:
        optim = load_file(f, mmap=True)["optimizer_state_dict"]
        optim.pop("optimizer_state_dict", None)  # Adam moments: not needed
        flats.append(optim[key])
        paddings = optim.get(z.PARAM_ALIGNMENT_PADDINGS) if paddings is None else paddings
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # its progress prints and bars
        if stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flats, model_states, False, paddings)
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, False)
        return z.to_torch_tensor(merged)


def _model_state(states: dict, z):
    """zero_to_fp32.parse_model_states for one already-loaded file."""
    buffers = {
        k: v.float() if v.is_floating_point() else v for k, v in states["module"].items() if k in states[z.BUFFER_NAMES]
    }
    return z.zero_model_state(
        buffers=buffers,
        param_shapes=states[z.PARAM_SHAPES],
        shared_params=[[k, v] for k, v in (states.get("shared_params") or {}).items()],
        ds_version=states.get(z.DS_VERSION),
        frozen_param_shapes=states.get(z.FROZEN_PARAM_SHAPES),
        frozen_param_fragments=states.get(z.FROZEN_PARAM_FRAGMENTS),
    )


def save_safetensors(state_dict: dict[str, Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """Atomically (a reader never sees half a file). Tensors must not share memory (``consolidate``'s don't)."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()},
            str(tmp),
            metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()},
        )
