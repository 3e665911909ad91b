"""What a person watching a long run needs beyond the loss: model FLOPs utilisation, per-GPU throughput and
per-node system load (CPU, memory, GPU utilisation and memory), gathered from every node at log steps.

Why gathered at log steps: they are already a collective point (the loss is all-reduced there), so one
small gather on a CPU (gloo) group adds no new synchronisation and no GPU sync to the hot loop. Why our
own gather rather than MLflow's built-in system-metrics logging: that samples only the process that owns
the run (global rank 0, one node), while a slow or swapping node anywhere stalls the whole job.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOPS per device, by precision, from the vendors' data sheets. fp32 is the
# plain (non-TF32) figure: torch does not use TF32 for matmuls unless asked. The first pattern that
# matches torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bA100\b|\bA800\b", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 units
]


def peak_tflops(device_name: Optional[str], precision: str) -> Optional[float]:
    """The table's dense peak for a device in a precision; None when unknown (no MFU is then logged)."""
    if not device_name:
        return None
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(precision)
    return None


def forward_flops_per_image(
    model: torch.nn.Module, img_size: int, in_chans: int = 3, **forward_kwargs
) -> Optional[int]:
    """FLOPs of one forward pass for one image, counted by torch's FlopCounterMode (matmuls, convs,
    attention); eval mode and no_grad so no RNG is drawn and training state is untouched. ``forward_kwargs``
    go to the model's forward (a masked-image model's mask generator)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        param = next(model.parameters())
        x = torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype)
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, **forward_kwargs)
        return int(counter.get_total_flops()) or None
    except Exception as exc:  # a model the counter cannot trace: no MFU, training goes on
        log.warning("could not count model FLOPs (%s: %s); no MFU metric", type(exc).__name__, exc)
        return None
    finally:
        model.train(was_training)


def mfu_percent(images_per_s: float, train_flops_per_image: float, world_size: int, peak: float) -> float:
    """Achieved model FLOPs (3 x forward: forward + backward) over the devices' combined dense peak."""
    return 100.0 * images_per_s * train_flops_per_image / (world_size * peak * 1e12)


def metric_key_part(name: str) -> str:
    """A node name (the launcher's, see launch/env.py) made safe for an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name) or "node"


class SystemSampler:
    """CPU, memory and (through NVML, when there are GPUs) GPU utilisation and memory of this node."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement window
        self._gpus: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver or no GPU: CPU and memory only
            self._nvml = None

    def sample(self) -> dict[str, float]:
        memory = self._psutil.virtual_memory()
        out = {
            "cpu_percent": self._psutil.cpu_percent(interval=None),
            "memory_percent": memory.percent,
            "memory_used_gib": (memory.total - memory.available) / 2**30,
        }
        if self._gpus:
            try:
                util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._gpus]
                mem = [self._nvml.nvmlDeviceGetMemoryInfo(h) for h in self._gpus]
                out.update(
                    gpu_count=len(self._gpus),
                    gpu_utilization_percent=sum(util) / len(util),
                    gpu_utilization_min_percent=min(util),
                    gpu_memory_used_gib=sum(m.used for m in mem) / 2**30,
                    gpu_memory_max_percent=max(100.0 * m.used / m.total for m in mem),
                )
            except Exception:
                pass
        return out


class StepTelemetry:
    """Built on every rank before training; ``at_log_step`` is a collective every rank must call."""

    def __init__(self, config, env, forward_flops: Optional[int], dev: torch.device):
        """``env``: the rank's DistEnv (its node name is the one the launcher gave, as in the hosts tag);
        ``forward_flops``: FLOPs of one forward pass for one image as trained (rank 0; None elsewhere)."""
        self.rank, self.world_size = env.rank, env.world_size
        self.node = metric_key_part(env.node)
        self.sampler = SystemSampler() if env.local_rank == 0 and config.tracking.system_metrics else None
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
        self.forward_flops = forward_flops
        self.peak = config.tracking.peak_tflops or peak_tflops(self.device_name, config.deepspeed.precision)

    def tags(self) -> dict[str, Any]:
        """Run tags (rank 0): what the MFU figure is computed from."""
        tags: dict[str, Any] = {"device_name": self.device_name or "cpu"}
        if self.forward_flops:
            tags["model_gflops_per_image"] = float(f"{self.forward_flops / 1e9:.4g}")
        if self.peak:
            tags["peak_tflops_per_device"] = self.peak
        return tags

    def at_log_step(self, images_per_s_total: float, rank_images_per_s: float, rank_data_wait: float) -> dict:
        """Gathers every rank's throughput and data wait, and each node's system sample (taken by its local
        rank 0), to global rank 0, which gets the metrics; the other ranks get {}."""
        payload = (self.node, self.sampler.sample() if self.sampler else None, rank_images_per_s, rank_data_wait)
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(payload, gathered, dst=0, group=self.group)
        if self.rank != 0:
            return {}
        rates = [g[2] for g in gathered]
        metrics = {
            "images_per_s_per_gpu": sum(rates) / len(rates),
            "images_per_s_per_gpu_min": min(rates),
            "data_wait_fraction_max": max(g[3] for g in gathered),
        }
        if self.forward_flops and self.peak:
            metrics["mfu_percent"] = mfu_percent(images_per_s_total, 3 * self.forward_flops, self.world_size, self.peak)
        seen = set()
        for node, sample, _, _ in gathered:
            if sample is not None and node not in seen:  # one sample per node even if LOCAL_RANK is unset
                seen.add(node)
                metrics.update({f"system/{node}/{key}": value for key, value in sample.items()})
        return metrics
