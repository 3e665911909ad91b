"""``make bench``: loader and training-step throughput against baselines, measured in one run.

Loader (images/s, from the config's train shards, with its train transforms):
  * ``bare``     decode + transform in a plain loop over the tar files: no webdataset, no DataLoader (1 core)
  * ``pipeline`` this project's loader (pipeline/data.py), with ``data.num_workers`` workers
  * ``timm_wds`` timm's own WebDataset reader (``timm.data.create_dataset('wds/...')``), same workers/transforms
Training step (synthetic batches in memory, so only the step is timed, plus one run with the real loader):
  * ``deepspeed`` the engine as training uses it; step split into data-wait / forward+backward / optimizer
  * ``plain``     a plain PyTorch loop: same model, batch, precision, AdamW groups, clipping; no DeepSpeed
MFU = achieved model FLOP/s / device peak (FLOPs from torch.utils.flop_counter; peak from a measured matmul).
Results are printed as a table and written as JSON + Markdown (and logged to MLflow when tracking is on).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

from pipeline.config import ConfigError, load_config
from pipeline.train.engine import compute_dtype, create_engine, device
from pipeline.train.optim import make_optimizer

# ----------------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict:
    import deepspeed
    import timm

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "timm": timm.__version__,
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def measured_peak_tflops(dtype: torch.dtype, dev: torch.device, trials: int = 10) -> float:
    """Dense matmul throughput actually reachable on this device (the MFU denominator): the best of several
    short trials, so that a slow spell of a shared machine does not lower the peak (and inflate MFU)."""
    n = 4096 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    reps = 50 if dev.type == "cuda" else 5
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        _sync(dev)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(dev)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return best


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------
# Bench data: JPEG shards of real photos at ImageNet-like sizes


# Bench data sets, written on first use into data/<name>/: (images, per shard, (min side, max side) in px).
# "bench_jpeg": ImageNet-like sizes. "bench_jpeg_large": web-photo sizes, where reduced-size decoding matters;
# they are the same photos scaled up (smoother than real large photos, so decoding them is a bit cheaper).
BENCH_SETS = {"bench_jpeg": (1536, 192, (256, 500)), "bench_jpeg_large": (256, 128, (1200, 2000))}


def write_jpeg_bench_shards(
    out: Path, count: int = 1536, per_shard: int = 192, sides: tuple[int, int] = (256, 500), seed: int = 0
) -> Path:
    """Random crops of the real photos scikit-learn ships, as JPEG shards with a manifest."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from pipeline.data.manifest import MANIFEST_NAME, write_manifest
    from pipeline.data.writer import write_split

    if (out / MANIFEST_NAME).exists():
        return out / MANIFEST_NAME
    photos = [Image.fromarray(img) for img in load_sample_images().images]  # 427x640 each
    rng = random.Random(seed)

    def samples():
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = rng.randint(*sides), rng.randint(*sides)
            scale = max(w / photo.width, h / photo.height, 1.0)
            src = photo.resize((round(photo.width * scale), round(photo.height * scale))) if scale > 1 else photo
            x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
            crop = src.crop((x, y, x + w, y + h))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            yield f"bench_{i:06d}", buf.getvalue(), i % 10, None

    out.mkdir(parents=True, exist_ok=True)
    spec = write_split(samples(), out, "train", samples_per_shard=per_shard, image_format="jpg")
    return write_manifest(
        out,
        classes=[str(i) for i in range(10)],
        image_format="jpg",
        splits={"train": spec.to_manifest()},
        source="sklearn sample photos",
        settings={"count": count, "per_shard": per_shard, "sides": list(sides), "seed": seed},
    )


# ----------------------------------------------------------------------------------------------------
# Loader


def _raw_samples(shards: list[str]):
    """(image bytes, label) straight from the tar files: the bare baseline's input."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            pending: dict[str, dict] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = member.name.split(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                sample = pending[key]
                if "cls" in sample and any(k in sample for k in ("jpg", "png", "jpeg", "webp")):
                    del pending[key]
                    yield sample


def bench_bare(shards: list[str], transform, images: int, batch_size: int = 32) -> float:
    """Decode + transform + batch in a plain loop over the tar files, on one thread like one loader worker
    (DataLoader workers run torch single-threaded too): what the loader would cost with no streaming."""
    from pipeline.data.batch import BatchBuilder
    from pipeline.data.samples import decode_sample

    lazy = getattr(transform, "lazy_decode", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = BatchBuilder(batch_size, shared=False)
        count, start = -8, 0.0  # the first 8 images warm up (file cache, lazy imports)
        while count < images:
            for sample in _raw_samples(shards):
                image, label = decode_sample(sample, lazy=lazy)
                batch.add(transform(image), label)
                if len(batch) == batch_size:
                    batch.take()
                count += 1
                if count == 0:
                    start = time.perf_counter()
                if count >= images:
                    break
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _time_loader(loader, images: int) -> float:
    """Images/s over ``images`` images after the first batch (worker start-up is not throughput); a loader
    that ends first (timm's reader: one pass) is started again, its start-up then counted."""
    it = iter(loader)
    next(it)
    count, start = 0, time.perf_counter()
    while count < images:
        try:
            out = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        count += len(out.labels) if hasattr(out, "labels") else len(out[1])  # ours: a Batch; timm's: a tuple
    rate = count / (time.perf_counter() - start)
    del it
    return rate


class _Restartable:
    """The trainer's endless batch iterator, in the shape _time_loader expects (iter() starts it)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make(start_step=0))


def bench_pipeline_loader(config, plan, images: int) -> float:
    from pipeline.data.loader import RankData

    data = RankData(config, plan, 0, 1, config.model.img_size or 224, pin_memory=False)
    return _time_loader(_Restartable(data.train_batches), images)


def bench_timm_wds(config, plan, transform, images: int) -> float:
    from timm.data import create_dataset

    root = str(Path(plan.train_shards[0]).parent)
    names = "::".join(os.path.basename(s) for s in plan.train_shards)
    dataset = create_dataset(
        f"wds/{Path(root).name}",
        root=root,
        split=f"{names}|{plan.train_samples}",
        is_training=True,
        batch_size=config.data.batch_size,
        transform=transform,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.data.batch_size, num_workers=max(1, config.data.num_workers)
    )
    return _time_loader(loader, images)


# ----------------------------------------------------------------------------------------------------
# Training step


def _synthetic(config, dev: torch.device, dtype: torch.dtype):
    """One micro batch in device memory: the step alone is timed (the loader has its own rows)."""
    g = torch.Generator().manual_seed(0)
    size = config.model.img_size or 224
    images = torch.randn(config.micro_batch_size(1), 3, size, size, generator=g).to(dev, dtype)
    if config.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, config.model.num_classes, (config.micro_batch_size(1),), generator=g).to(dev)
    return images, labels


class StepTimer:
    """Per-step seconds of forward+backward and of the optimizer, for one way of training."""

    def __init__(self, name: str, step):
        self.name, self.step = name, step  # step() -> (fwd_bwd_s, optimizer_s), synchronised
        self.fwd_bwd: list[float] = []
        self.optimizer: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            fwd_bwd, opt = self.step()
            if record:
                self.fwd_bwd.append(fwd_bwd)
                self.optimizer.append(opt)

    def row(self, batch_size: int) -> dict:
        """Medians over the recorded steps: robust to the odd step that shared the CPU with something else."""
        fwd_bwd, opt = statistics.median(self.fwd_bwd), statistics.median(self.optimizer)
        return {
            "images_per_s": batch_size / (fwd_bwd + opt),
            "step_ms": 1e3 * (fwd_bwd + opt),
            "fwd_bwd_ms": 1e3 * fwd_bwd,
            "optimizer_ms": 1e3 * opt,
            "steps_measured": len(self.fwd_bwd),
        }


def interleaved(timers: list[StepTimer], steps: int, warmup: int, rounds: int) -> None:
    """Warm every timer up, then alternate between them in rounds, so a slow spell of the machine hits all."""
    for timer in timers:
        timer.run(warmup, record=False)
    per_round = max(1, -(-steps // rounds))
    for _ in range(rounds):
        for timer in timers:
            timer.run(per_round)


def deepspeed_step(config, model):
    """One optimizer step of the engine as training uses it (the boundary ``engine.step`` is "optimizer")."""
    dev, dtype = device(), compute_dtype(config)
    engine = create_engine(model, make_optimizer(model, config, dev), config, 1)
    images, labels = _synthetic(config, dev, dtype)
    criterion = torch.nn.CrossEntropyLoss()
    accum = config.optim.grad_accum_steps

    def step() -> tuple[float, float]:
        _sync(dev)
        t0 = time.perf_counter()
        for micro in range(accum):
            engine.backward(criterion(engine(images).float(), labels))
            if micro < accum - 1:
                engine.step()
        _sync(dev)
        t1 = time.perf_counter()
        engine.step()
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1

    return step


def plain_step(config, model):
    """The same step without DeepSpeed: torch AdamW (same groups and fused setting), autocast for bf16/fp16,
    clipping; a timm ``train.py``-style loop."""
    dev, dtype = device(), compute_dtype(config)
    model = model.to(dev)
    if config.model.compile:
        model.compile()
    optimizer = make_optimizer(model, config, dev)
    images, labels = _synthetic(config, dev, torch.float32)
    criterion = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    accum = config.optim.grad_accum_steps

    def step() -> tuple[float, float]:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(accum):
            with autocast:
                loss = criterion(model(images).float(), labels) / accum
            loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1

    return step


def bench_data_wait(config, plan, model, steps: int) -> dict:
    """The engine fed by the real loader: how much of the step waits for data."""
    from pipeline.data.loader import RankData
    from pipeline.data.transforms import DeviceNormalize

    dev, dtype = device(), compute_dtype(config)
    engine = create_engine(model, make_optimizer(model, config, dev), config, 1)
    data = RankData(config, plan, 0, 1, config.model.img_size or 224, pin_memory=dev.type == "cuda")
    normalize = DeviceNormalize(config, dev)
    batches = iter(data.train_batches(start_step=0))
    criterion = torch.nn.CrossEntropyLoss()
    next(batches)
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps * config.optim.grad_accum_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        images, labels = batch.images, batch.labels
        wait += time.perf_counter() - t0
        loss = criterion(engine(normalize(images.to(dev), True).to(dtype)).float(), labels.to(dev))
        engine.backward(loss)
        engine.step()
    _sync(dev)
    total = time.perf_counter() - start
    return {"images_per_s": steps * config.data.batch_size / total, "data_wait_fraction": wait / total}


# ----------------------------------------------------------------------------------------------------


def mae_step(config):
    """One DeepSpeed step of MAE as the objective trains it: the encoder on the visible quarter of the tokens,
    the decoder (``objective.decoder_*``) on all of them; returns (step, FLOPs per image fwd+bwd)."""
    import copy

    from pipeline.model.factory import create_model
    from pipeline.train.objectives import StepContext
    from pipeline.train.objectives.mim import MaskedImageModelling

    mae = copy.deepcopy(config)
    mae.objective.name = "mae"
    dev, dtype = device(), compute_dtype(mae)
    torch.manual_seed(0)
    objective = MaskedImageModelling(mae)
    module = objective.wrap(create_model(mae.model, 0))
    flops = 3.0 * (objective.forward_flops(module, mae.model.img_size or 224, mae.model.in_chans) or 0)
    engine = create_engine(module, make_optimizer(module, mae, dev), mae, 1)
    images, _ = _synthetic(mae, dev, dtype)
    accum, count = mae.optim.grad_accum_steps, [0]

    def step() -> tuple[float, float]:
        _sync(dev)
        t0 = time.perf_counter()
        for micro in range(accum):
            ctx = StepContext(count[0], micro, 0, mae.run.seed, dtype, dev)
            engine.backward(objective.loss(engine, images, None, ctx))
            if micro < accum - 1:
                engine.step()
        _sync(dev)
        t1 = time.perf_counter()
        engine.step()
        count[0] += 1
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1

    return step, flops


def bench_mae_step(config, steps: int, warmup: int, rounds: int, peak: float) -> dict:
    step, flops = mae_step(config)
    timer = StepTimer("mae", step)
    interleaved([timer], steps, warmup, rounds)
    row = timer.row(config.data.batch_size)
    row["gflops_per_image_fwd_bwd"] = flops / 1e9
    row["tflops"] = row["images_per_s"] * flops / 1e12
    row["mfu"] = row["tflops"] / peak if peak else 0.0
    o = config.objective
    row["decoder"] = f"{o.decoder_depth} x {o.decoder_dim}, {o.decoder_heads} heads"
    row["mask_ratio"] = o.mask_ratio or 0.75
    return row


def run(config, args) -> dict:
    from pipeline.data.plan import plan_data
    from pipeline.model.factory import create_model

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from launch.local import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    plan = plan_data(config, 1)
    config.model.num_classes = config.model.num_classes or len(plan.classes or []) or 10
    img_size = config.model.img_size or 224
    results: dict = {
        "machine": machine_info(),
        "config": args.config,
        "overrides": args.overrides,
        "model": config.model.name,
        "img_size": img_size,
        "batch_size": config.data.batch_size,
        "workers": config.data.num_workers,
        "precision": config.deepspeed.precision,
        "zero_stage": config.deepspeed.zero_stage,
    }
    print(
        f"machine: {results['machine']['cpu']} x{results['machine']['cores']}, gpu {results['machine']['gpu']}",
        file=sys.stderr,
    )

    if not args.skip_loader:
        results["loader"] = bench_loader(config, plan, img_size, args.loader_images, args.rounds)
    if not args.skip_step:
        results["step"] = bench_step(config, img_size, args.steps, args.warmup, args.rounds)
        if config.model.name.startswith(("vit_", "deit_")):
            peak = results["step"]["peak_tflops_measured"]
            results["step"]["mae"] = bench_mae_step(config, args.steps, args.warmup, args.rounds, peak)
        if not args.skip_loader:
            torch.manual_seed(0)
            results["step"]["with_loader"] = bench_data_wait(
                config, plan, create_model(config.model, config.model.num_classes), args.steps
            )
    return results


def bench_loader(config, plan, img_size: int, images: int, rounds: int) -> dict:
    """The loader rows, each the median of ``rounds`` interleaved measurements."""
    from timm.data import create_transform

    from pipeline.data.transforms import build_transforms

    # The bare float baseline and timm's reader get timm's usual (normalising) transforms; ours ends in
    # uint8 and normalises on the device, which is part of what is being measured.
    a = config.augment
    float_transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(a.scale),
        ratio=tuple(a.ratio),
        hflip=a.hflip,
        color_jitter=a.color_jitter,
        auto_augment=a.auto_augment,
        interpolation=a.interpolation,
    )
    ours = build_transforms(config, img_size, True)
    measure = {
        "bare_float_1core": lambda: bench_bare(plan.train_shards, float_transform, images // 2),
        "bare_uint8_1core": lambda: bench_bare(plan.train_shards, ours, images // 2, config.data.batch_size),
        "pipeline": lambda: bench_pipeline_loader(config, plan, images),
        "timm_wds": lambda: bench_timm_wds(config, plan, float_transform, images),
    }
    measured: dict[str, list[float]] = {name: [] for name in measure}
    for _ in range(rounds):
        for name, fn in measure.items():
            measured[name].append(fn())
    loader = {name: statistics.median(values) for name, values in measured.items()}
    workers = max(1, config.data.num_workers)
    loader["pipeline_per_worker"] = loader["pipeline"] / workers
    loader["timm_wds_per_worker"] = loader["timm_wds"] / workers
    # Ratios per round (its rows ran back to back), then their median: a shared machine's speed drifts
    # between rounds by more than the effects measured here.
    loader["pipeline_vs_timm"] = statistics.median(p / t for p, t in zip(measured["pipeline"], measured["timm_wds"]))
    loader["streaming_overhead"] = 1 - statistics.median(
        p / workers / b for p, b in zip(measured["pipeline"], measured["bare_uint8_1core"])
    )
    loader["rounds"] = measured
    return loader


def bench_step(config, img_size: int, steps: int, warmup: int, rounds: int) -> dict:
    """DeepSpeed vs the same plain loop (engine overhead) and, when speed options are on, vs a timm
    ``train.py``-style loop (eager, unfused AdamW, contiguous memory); all from the same initial weights."""
    import copy

    from pipeline.model.factory import create_model
    from pipeline.tracking.telemetry import forward_flops_per_image

    dev, dtype = device(), compute_dtype(config)
    torch.manual_seed(0)
    model = create_model(config.model, config.model.num_classes)
    flops = 3.0 * (forward_flops_per_image(model, img_size, config.model.in_chans) or 0)  # forward + backward
    peak = measured_peak_tflops(dtype if dev.type == "cuda" else torch.float32, dev)
    timm_style = copy.deepcopy(config)
    timm_style.model.compile, timm_style.model.channels_last, timm_style.optim.fused = False, False, False
    timers = [
        StepTimer("plain", plain_step(config, copy.deepcopy(model))),
        StepTimer("deepspeed", deepspeed_step(config, copy.deepcopy(model))),
    ]
    speed_options = _speed_options(config, dev)
    if speed_options != _speed_options(timm_style, dev):
        timers.append(StepTimer("timm_style", plain_step(timm_style, copy.deepcopy(model))))
    interleaved(timers, steps, warmup, rounds)
    peak = max(peak, measured_peak_tflops(dtype if dev.type == "cuda" else torch.float32, dev))  # before and after
    step: dict = {"gflops_per_image_fwd_bwd": flops / 1e9, "peak_tflops_measured": peak, "options": speed_options}
    for timer in timers:
        row = timer.row(config.data.batch_size)
        row["tflops"] = row["images_per_s"] * flops / 1e12
        row["mfu"] = row["tflops"] / peak
        step[timer.name] = row
    step["engine_overhead"] = step["plain"]["images_per_s"] / step["deepspeed"]["images_per_s"] - 1
    if "timm_style" in step:
        step["speedup_vs_timm_style"] = step["deepspeed"]["images_per_s"] / step["timm_style"]["images_per_s"]
    return step


def _speed_options(config, dev: torch.device) -> dict:
    from pipeline.train.optim import use_fused_adamw

    return {
        "compile": config.model.compile,
        "channels_last": config.model.channels_last,
        "fused_adamw": use_fused_adamw(config, dev),
        "precision": config.deepspeed.precision,
    }


def _mae_line(m: dict) -> str:
    return (
        f"MAE step (mask {m['mask_ratio']}, decoder {m['decoder']}; FLOPs as done, the encoder on the "
        f"visible tokens): {m['images_per_s']:.1f} images/s, {m['step_ms']:.1f} ms/step, "
        f"{m['gflops_per_image_fwd_bwd']:.2f} GFLOP/image (fwd+bwd), {m['tflops']:.3f} TFLOP/s, "
        f"MFU {100 * m['mfu']:.1f}%"
    )


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"### {r['model']} @ {r['img_size']}px, batch {r['batch_size']}, {r['precision']}, "
        f"ZeRO-{r['zero_stage']}, {r['workers']} loader worker(s)",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · torch {m['torch']}, "
        f"deepspeed {m['deepspeed']}, timm {m['timm']}",
        "",
    ]
    if "loader" in r:
        lo = r["loader"]
        lines += [
            "| loader (median of rounds) | images/s |",
            "|---|---|",
            f"| bare decode+transform, float output (1 core) | {lo['bare_float_1core']:.1f} |",
            f"| bare decode+transform, uint8 output (1 core) | {lo['bare_uint8_1core']:.1f} |",
            f"| timm WebDataset reader (total / per worker) | {lo['timm_wds']:.1f} / {lo['timm_wds_per_worker']:.1f} |",
            f"| this pipeline (total / per worker) | {lo['pipeline']:.1f} / {lo['pipeline_per_worker']:.1f} |",
            f"| pipeline / timm (median of per-round ratios) | {lo['pipeline_vs_timm']:.2f}x |",
            f"| streaming overhead vs bare uint8 loop (median of per-round ratios) | "
            f"{100 * lo['streaming_overhead']:.1f}% |",
            "",
        ]
    if "step" in r:
        s = r["step"]
        labels = {
            "deepspeed": "deepspeed (this pipeline)",
            "plain": "plain PyTorch loop, same options",
            "timm_style": "timm train.py-style loop (eager, unfused AdamW)",
        }
        lines += [
            "| training step (median step) | images/s | step ms | fwd+bwd ms | optimizer ms | TFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("deepspeed", "plain", "timm_style"):
            if name in s:
                row = s[name]
                lines.append(
                    f"| {labels[name]} | {row['images_per_s']:.1f} | {row['step_ms']:.1f} | "
                    f"{row['fwd_bwd_ms']:.1f} | {row['optimizer_ms']:.1f} | {row['tflops']:.3f} | "
                    f"{100 * row['mfu']:.1f}% |"
                )
        options = ", ".join(f"{k}={v}" for k, v in s["options"].items())
        lines += [
            "",
            f"Options: {options} · engine overhead vs plain loop: {100 * s['engine_overhead']:.1f}%"
            + (f" · vs timm-style loop: {s['speedup_vs_timm_style']:.2f}x" if "timm_style" in s else "")
            + f" · {s['gflops_per_image_fwd_bwd']:.2f} GFLOP/image (fwd+bwd) · "
            f"measured matmul peak {s['peak_tflops_measured']:.3f} TFLOP/s",
        ]
        if "mae" in s:
            lines.append(_mae_line(s["mae"]))
        if "with_loader" in s:
            w = s["with_loader"]
            lines.append(
                f"With the real loader: {w['images_per_s']:.1f} images/s, "
                f"data wait {100 * w['data_wait_fraction']:.1f}% of the step"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench/cpu_vit_tiny.yaml")
    parser.add_argument("--out", default="runs/bench", help="folder for bench-<date>.json/.md (default: %(default)s)")
    parser.add_argument("--loader-images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="each figure is the median of this many interleaved measurements (default: %(default)s)",
    )
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args, extra = parser.parse_known_args(argv)  # key=value overrides may also follow options
    if any(item.startswith("-") or "=" not in item for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = Path(config.data.train_shards).parent
    if folder.name in BENCH_SETS:
        count, per_shard, sides = BENCH_SETS[folder.name]
        write_jpeg_bench_shards(folder, count, per_shard, sides)
    from pipeline.data.plan import DataError

    try:
        results = run(config, args)
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    markdown = to_markdown(results)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"written: {out / stem}.json, .md", file=sys.stderr)
    _log_to_mlflow(config, results, out / f"{stem}.json")
    return 0


def _log_to_mlflow(config, results: dict, path: Path) -> None:
    """Benchmarks are runs too: one MLflow run per bench in the 'bench' experiment."""
    if not config.tracking.enabled:
        return
    from pipeline.tracking.store import artifact_location, tracking_uri

    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(config))
        experiment = client.get_experiment_by_name("bench")
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment("bench", artifact_location=artifact_location(config))
        )
        run = client.create_run(experiment_id, run_name=f"bench {results['model']} {results['img_size']}px")
        flat = {f"loader_{k}": v for k, v in results.get("loader", {}).items()}
        for name, value in results.get("step", {}).items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            flat.update({f"step_{name}_{k}".rstrip("_"): v for k, v in items})
        numbers = {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in numbers.items()],
            params=[
                Param(k, str(v))
                for k, v in {**results["machine"], **results.get("step", {}).get("options", {})}.items()
            ],
        )
        client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
    except Exception as exc:  # a benchmark's numbers are already on disk
        print(f"warning: MLflow logging of the benchmark failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
