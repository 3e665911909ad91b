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
import sys
import tarfile
import time
from pathlib import Path

import torch

from .config import ConfigError, load_config

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
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "timm": timm.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def measured_peak_tflops(dtype: torch.dtype, dev: torch.device) -> float:
    """Dense matmul throughput actually reachable on this device (the MFU denominator)."""
    n = 4096 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    reps = 50 if dev.type == "cuda" else 5
    for _ in range(2):
        a @ b
    _sync(dev)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------
# Bench data: JPEG shards of real photos at ImageNet-like sizes


def write_jpeg_bench_shards(out: Path, count: int = 1536, per_shard: int = 192, seed: int = 0) -> Path:
    """Random crops (256-500 px sides) of the real photos scikit-learn ships, as JPEG shards with a manifest."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from .shards import write_split

    if (out / "manifest.json").exists():
        return out / "manifest.json"
    photos = [Image.fromarray(img) for img in load_sample_images().images]  # 427x640 each
    rng = random.Random(seed)

    def samples():
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = rng.randint(256, 500), rng.randint(256, 500)
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
    manifest = {"format": "webdataset", "version": 1, "classes": [str(i) for i in range(10)], "num_classes": 10,
                "image_format": "jpg", "splits": {"train": spec.to_manifest()}, "source": "sklearn sample photos"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out / "manifest.json"


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


def bench_bare(shards: list[str], transform, images: int) -> float:
    """One thread, like one loader worker (DataLoader workers run torch single-threaded too)."""
    from .data import decode_sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        count, start = -8, 0.0  # the first 8 images warm up (file cache, lazy imports)
        while count < images:
            for sample in _raw_samples(shards):
                image, _ = decode_sample(sample)
                transform(image)
                count += 1
                if count == 0:
                    start = time.perf_counter()
                if count >= images:
                    break
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _time_loader(loader, images: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    count, start = 0, time.perf_counter()
    while count < images:
        out = next(it)
        count += len(out[1])
    rate = count / (time.perf_counter() - start)
    del it
    return rate


def bench_pipeline_loader(config, plan, images: int) -> float:
    from .data import RankData

    data = RankData(config, plan, 0, 1, config.model.img_size or 224, pin_memory=False)
    return _time_loader(data.train_batches(epoch=0), images, data.micro_batch)


def bench_timm_wds(config, plan, transform, images: int) -> float:
    from timm.data import create_dataset

    root = str(Path(plan.train_shards[0]).parent)
    names = "::".join(os.path.basename(s) for s in plan.train_shards)
    dataset = create_dataset(f"wds/{Path(root).name}", root=root, split=f"{names}|{plan.train_samples}",
                             is_training=True, batch_size=config.data.batch_size, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.data.batch_size,
                                         num_workers=max(1, config.data.num_workers))
    return _time_loader(loader, images, config.data.batch_size)


# ----------------------------------------------------------------------------------------------------
# Training step


def flops_per_image(model: torch.nn.Module, img_size: int) -> float:
    """Forward+backward FLOPs for one image (3x the counted forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    return 3.0 * counter.get_total_flops()


def _synthetic(batch: int, img_size: int, num_classes: int, dev: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size, generator=g).to(dev, dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(dev)
    return images, labels


def _step_row(config, steps: int, fwd_bwd: float, opt: float) -> dict:
    total = fwd_bwd + opt
    return {"images_per_s": steps * config.data.batch_size / total, "step_ms": 1e3 * total / steps,
            "fwd_bwd_ms": 1e3 * fwd_bwd / steps, "optimizer_ms": 1e3 * opt / steps}


def bench_deepspeed_step(config, model, steps: int, warmup: int) -> dict:
    from .engine import compute_dtype, create_engine, device

    dev, dtype = device(), compute_dtype(config)
    micro = config.micro_batch_size(1)
    engine, _, _ = create_engine(model, config, 1, total_steps=10**6, warmup_steps=0)
    images, labels = _synthetic(micro, config.model.img_size or 224, config.model.num_classes, dev, dtype)
    criterion = torch.nn.CrossEntropyLoss()
    fwd_bwd = opt = 0.0
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        for micro in range(config.optim.grad_accum_steps):
            loss = criterion(engine(images).float(), labels)
            engine.backward(loss)
            if micro < config.optim.grad_accum_steps - 1:  # the boundary step is timed as "optimizer"
                engine.step()
        _sync(dev)
        t1 = time.perf_counter()
        engine.step()
        _sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd_bwd += t1 - t0
            opt += t2 - t1
    return _step_row(config, steps, fwd_bwd, opt)


def bench_plain_step(config, model, steps: int, warmup: int) -> dict:
    """The same step without DeepSpeed: torch AdamW with timm's param groups, autocast for bf16/fp16."""
    from .engine import compute_dtype, device, param_groups

    dev, dtype = device(), compute_dtype(config)
    model = model.to(dev)
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.optim.lr, betas=tuple(config.optim.betas))
    images, labels = _synthetic(config.micro_batch_size(1), config.model.img_size or 224, config.model.num_classes,
                                dev, torch.float32)
    criterion = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    fwd_bwd = opt = 0.0
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(config.optim.grad_accum_steps):
            with autocast:
                loss = criterion(model(images).float(), labels) / config.optim.grad_accum_steps
            loss.backward()
        _sync(dev)
        t1 = time.perf_counter()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            fwd_bwd += t1 - t0
            opt += t2 - t1
    return _step_row(config, steps, fwd_bwd, opt)


def bench_data_wait(config, plan, model, steps: int) -> dict:
    """The engine fed by the real loader: how much of the step waits for data."""
    from .data import DeviceNormalize, RankData
    from .engine import compute_dtype, create_engine, device

    dev, dtype = device(), compute_dtype(config)
    engine, _, _ = create_engine(model, config, 1, total_steps=10**6, warmup_steps=0)
    data = RankData(config, plan, 0, 1, config.model.img_size or 224, pin_memory=dev.type == "cuda")
    normalize = DeviceNormalize(config, dev)
    batches = iter(data.train_batches(epoch=0))
    criterion = torch.nn.CrossEntropyLoss()
    next(batches)
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps * config.optim.grad_accum_steps):
        t0 = time.perf_counter()
        images, labels, _, _ = next(batches)
        wait += time.perf_counter() - t0
        loss = criterion(engine(normalize(images.to(dev), True).to(dtype)).float(), labels.to(dev))
        engine.backward(loss)
        engine.step()
    _sync(dev)
    total = time.perf_counter() - start
    return {"images_per_s": steps * config.data.batch_size / total, "data_wait_fraction": wait / total}


# ----------------------------------------------------------------------------------------------------


def run(config, args) -> dict:
    from .data import build_transforms, plan_data
    from .engine import compute_dtype, device
    from .models import create_model

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
    results: dict = {"machine": machine_info(), "config": args.config, "overrides": args.overrides,
                     "model": config.model.name, "img_size": img_size, "batch_size": config.data.batch_size,
                     "workers": config.data.num_workers, "precision": config.deepspeed.precision,
                     "zero_stage": config.deepspeed.zero_stage}
    print(f"machine: {results['machine']['cpu']} x{results['machine']['cores']}, gpu {results['machine']['gpu']}",
          file=sys.stderr)

    if not args.skip_loader:
        # The bare baseline and timm's reader get the usual float (normalising) transforms; ours ends in
        # uint8 and normalises on the device, which is part of what is being measured.
        from timm.data import create_transform

        a = config.augment
        float_transform = create_transform(img_size, is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio),
                                           hflip=a.hflip, color_jitter=a.color_jitter, auto_augment=a.auto_augment,
                                           interpolation=a.interpolation)
        workers = max(1, config.data.num_workers)
        loader = {"bare_float_1core": bench_bare(plan.train_shards, float_transform, args.loader_images // 2),
                  "bare_uint8_1core": bench_bare(plan.train_shards, build_transforms(config, img_size, True),
                                                 args.loader_images // 2),
                  "pipeline": bench_pipeline_loader(config, plan, args.loader_images),
                  "timm_wds": bench_timm_wds(config, plan, float_transform, args.loader_images)}
        loader["pipeline_per_worker"] = loader["pipeline"] / workers
        loader["timm_wds_per_worker"] = loader["timm_wds"] / workers
        loader["pipeline_vs_timm"] = loader["pipeline"] / loader["timm_wds"]
        loader["streaming_overhead"] = 1 - loader["pipeline_per_worker"] / loader["bare_uint8_1core"]
        results["loader"] = loader

    if not args.skip_step:
        dev, dtype = device(), compute_dtype(config)
        torch.manual_seed(0)
        model = create_model(config.model, config.model.num_classes)
        flops = flops_per_image(model, img_size)
        peak = measured_peak_tflops(dtype if dev.type == "cuda" else torch.float32, dev)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ds = bench_deepspeed_step(config, model, args.steps, args.warmup)
        plain_model = create_model(config.model, config.model.num_classes)
        plain_model.load_state_dict(state)
        plain = bench_plain_step(config, plain_model, args.steps, args.warmup)
        for row in (ds, plain):
            row["tflops"] = row["images_per_s"] * flops / 1e12
            row["mfu"] = row["tflops"] / peak
        results["step"] = {"deepspeed": ds, "plain": plain, "gflops_per_image_fwd_bwd": flops / 1e9,
                           "peak_tflops_measured": peak,
                           "engine_overhead": plain["images_per_s"] / ds["images_per_s"] - 1}
        if not args.skip_loader:
            torch.manual_seed(0)
            results["step"]["with_loader"] = bench_data_wait(
                config, plan, create_model(config.model, config.model.num_classes), args.steps)
    return results


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"### {r['model']} @ {r['img_size']}px, batch {r['batch_size']}, {r['precision']}, "
             f"ZeRO-{r['zero_stage']}, {r['workers']} loader worker(s)",
             f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · torch {m['torch']}, "
             f"deepspeed {m['deepspeed']}, timm {m['timm']}", ""]
    if "loader" in r:
        lo = r["loader"]
        lines += ["| loader | images/s |", "|---|---|",
                  f"| bare decode+transform, float output (1 core) | {lo['bare_float_1core']:.1f} |",
                  f"| bare decode+transform, uint8 output (1 core) | {lo['bare_uint8_1core']:.1f} |",
                  f"| timm WebDataset reader (total / per worker) | {lo['timm_wds']:.1f} / {lo['timm_wds_per_worker']:.1f} |",
                  f"| this pipeline (total / per worker) | {lo['pipeline']:.1f} / {lo['pipeline_per_worker']:.1f} |",
                  f"| pipeline / timm | {lo['pipeline_vs_timm']:.2f}x |",
                  f"| streaming overhead vs bare uint8 loop | {100 * lo['streaming_overhead']:.1f}% |", ""]
    if "step" in r:
        s = r["step"]
        lines += ["| training step | images/s | step ms | fwd+bwd ms | optimizer ms | TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("deepspeed", "plain"):
            row = s[name]
            lines.append(f"| {name} | {row['images_per_s']:.1f} | {row['step_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | "
                         f"{row['optimizer_ms']:.1f} | {row['tflops']:.3f} | {100 * row['mfu']:.1f}% |")
        lines += ["", f"Engine overhead vs plain loop: {100 * s['engine_overhead']:.1f}% · "
                      f"{s['gflops_per_image_fwd_bwd']:.2f} GFLOP/image (fwd+bwd) · "
                      f"measured matmul peak {s['peak_tflops_measured']:.3f} TFLOP/s"]
        if "with_loader" in s:
            w = s["with_loader"]
            lines.append(f"With the real loader: {w['images_per_s']:.1f} images/s, "
                         f"data wait {100 * w['data_wait_fraction']:.1f}% of the step")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench/cpu_vit_tiny.yaml")
    parser.add_argument("--out", default="runs/bench", help="folder for bench-<date>.json/.md (default: %(default)s)")
    parser.add_argument("--loader-images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "bench_jpeg" in config.data.train_shards:
        write_jpeg_bench_shards(Path(config.data.train_shards).parent)
    from .data import DataError

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
    from .tracking import artifact_location, tracking_uri

    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(config))
        experiment = client.get_experiment_by_name("bench")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            "bench", artifact_location=artifact_location(config))
        run = client.create_run(experiment_id, run_name=f"bench {results['model']} {results['img_size']}px")
        flat = {f"loader_{k}": v for k, v in results.get("loader", {}).items()}
        for name in ("deepspeed", "plain"):
            for k, v in results.get("step", {}).get(name, {}).items():
                flat[f"step_{name}_{k}"] = v
        for k, v in flat.items():
            client.log_metric(run.info.run_id, k, float(v))
        client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
    except Exception as exc:  # a benchmark's numbers are already on disk
        print(f"warning: MLflow logging of the benchmark failed: {exc}", file=sys.stderr)
