"""``make gpu-check``: the CUDA paths end to end on one GPU in at most ~8 minutes, one JSON + Markdown report.

Without CUDA it refuses with one line and exit code 2, having run nothing. On a GPU, in order (each part timed;
a failing part is reported and the next one runs; a part whose estimate no longer fits ``--budget-s`` is
reported as skipped):

1. ``engine``: DeepSpeed on one GPU, ZeRO-1 and ZeRO-2, bf16, fused AdamW, ``model.compile``: steps of a 2-block
   ViT-B/16 at 224 on one repeated batch (finite losses that fall).
2. ``adapt``: the fine-tune adaptation (pipeline/model/adapt.py: ViT position embeddings 14x14 -> 24x24, Swin
   relative-position tables window 7 -> 12) run on the device, against the same on the CPU.
3. ``runs``: the real CLI on the digits shards (bf16, compiled, ZeRO-2, pinned-memory loader, background
   checkpoint writes from pinned host copies): an uninterrupted run and one stopped at step 10, then resumed
   (its losses against the uninterrupted run's); then ``pipeline finetune`` from the finished run at 64 px
   (consolidation of the ZeRO checkpoint, position-embedding resampling, EMA) on the GPU.
4. ``mae``: MAE (ViT-B/16) and SimMIM (Swin-B) steps as their objectives train them (bf16, ZeRO-2, fused AdamW).
5. ``bench``: ViT-B/16 and Swin-B at 224, bf16 (configs/bench/gpu_vit_b16.yaml, gpu_swin_b.yaml): images/s and
   MFU against the measured bf16 matmul peak, for DeepSpeed, the same plain loop and a timm ``train.py``-style
   loop (benchmarks/bench.py), and the data wait with the real (pinned-memory) loader.

Report: ``runs/gpu-check/gpu-check-<date>.json`` and ``.md``; exit code 0 when no part failed, 1 otherwise.
``--cpu-dry-run`` (for developing this script on a machine without a GPU): the same parts on the CPU, with fp32,
no compile and small models; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFUSAL = "error: make gpu-check needs a CUDA GPU, and torch sees none on this machine (nothing was run)"


@dataclass
class Settings:
    """What the parts run with: the GPU settings, or the CPU dry run's."""

    out: Path
    budget_s: float
    dry_run: bool
    started: float = field(default_factory=time.monotonic)

    @property
    def precision(self) -> str:
        return "fp32" if self.dry_run else "bf16"

    @property
    def compile(self) -> str:
        return "false" if self.dry_run else "true"

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check", help="report folder (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time for all parts (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run these parts only")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(REFUSAL, file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = Settings(Path(args.out) / stamp, args.budget_s, args.cpu_dry_run)
    settings.out.mkdir(parents=True, exist_ok=True)
    _single_process_group()
    from benchmarks.bench import machine_info

    report = {"machine": machine_info(), "dry_run": args.cpu_dry_run, "budget_s": args.budget_s, "parts": []}
    for name, (part, estimate_s) in PARTS.items():
        if args.only and name not in args.only:
            continue
        report["parts"].append(_run_part(name, part, estimate_s, settings))
        _write_report(report, Path(args.out) / f"gpu-check-{stamp}")  # a killed check still leaves its report
    failed = [p["name"] for p in report["parts"] if p["status"] == "failed"]
    print(to_markdown(report))
    print(f"written: {Path(args.out) / f'gpu-check-{stamp}'}.json, .md", file=sys.stderr)
    return 1 if failed else 0


def _run_part(name: str, part, estimate_s: float, settings: Settings) -> dict:
    """One part, timed; an exception is its failure (with the traceback's end), not the check's end."""
    if settings.left_s() < estimate_s:
        return {"name": name, "status": "skipped", "reason": f"{settings.left_s():.0f} s left, needs ~{estimate_s:.0f}"}
    print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = {"name": name, "status": "ok", **(part(settings) or {})}
    except Exception as exc:
        result = {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["traceback"] = traceback.format_exc()[-4000:]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu-check: {name} {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)
    return result


def _single_process_group() -> None:
    """The environment DeepSpeed's initialize reads for a world of one process (as benchmarks/bench.py)."""
    from launch.local import free_port

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


# ----------------------------------------------------------------------------------------------------
# 1. DeepSpeed steps, 2. adaptation on the device


def check_engine(settings: Settings) -> dict:
    """ZeRO-1 and ZeRO-2: 8 steps each on one repeated batch; the losses must be finite and fall."""
    import torch

    from pipeline.config import load_config
    from pipeline.model.factory import create_model
    from pipeline.train.engine import compute_dtype, create_engine, device
    from pipeline.train.optim import make_optimizer, use_fused_adamw

    out = {}
    for zero in (1, 2):
        model_name = "vit_tiny_patch16_224" if settings.dry_run else "vit_base_patch16_224"
        config = load_config(
            None,
            [f"model.name={model_name}", "model.depth=2", "model.num_classes=10", "model.img_size=224",
             f"model.compile={settings.compile}", f"deepspeed.precision={settings.precision}",
             f"deepspeed.zero_stage={zero}", f"data.batch_size={4 if settings.dry_run else 64}", "optim.lr=1e-3",
             "optim.warmup_epochs=0"],
        )  # fmt: skip
        dev, dtype = device(), compute_dtype(config)
        torch.manual_seed(0)
        model = create_model(config.model, 10)
        engine = create_engine(model, make_optimizer(model, config, dev), config, 1)
        images = torch.randn(config.data.batch_size, 3, 224, 224, device=dev, dtype=dtype)
        labels = torch.randint(0, 10, (config.data.batch_size,), device=dev)
        losses, start = [], time.perf_counter()
        for _ in range(8):
            loss = torch.nn.functional.cross_entropy(engine(images).float(), labels)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
            raise RuntimeError(f"ZeRO-{zero}: losses {losses} are not finite and falling")
        out[f"zero{zero}"] = {
            "losses": losses,
            "seconds_8_steps_with_compile": round(time.perf_counter() - start, 2),
            "fused_adamw": use_fused_adamw(config, dev),
            "engine_dtype": str(next(engine.module.parameters()).dtype),
        }
        del engine
    return out


def check_adapt(settings: Settings) -> dict:
    """adapt_state_dict on device tensors against the CPU result: ViT pos-embeds, Swin relative-position tables."""
    import timm

    from pipeline.model.adapt import adapt_state_dict
    from pipeline.train.engine import device

    dev = device()
    out = {}
    cases = {
        "vit_pos_embed_14_to_24": ("vit_tiny_patch16_224", {"img_size": 224}, {"img_size": 384}),
        "swin_window_7_to_12": ("swin_tiny_patch4_window7_224", {}, {"img_size": 384, "window_size": 12}),
    }
    for name, (arch, old_kw, new_kw) in cases.items():
        source = timm.create_model(arch, pretrained=False, num_classes=10, **old_kw).state_dict()
        target = timm.create_model(arch, pretrained=False, num_classes=10, **new_kw)
        on_cpu, report = adapt_state_dict(source, target)
        on_dev, _ = adapt_state_dict({k: v.to(dev) for k, v in source.items()}, target.to(dev))
        changed = [k for k in on_cpu if on_cpu[k].shape != source.get(k, on_cpu[k]).shape]
        if not changed:
            raise RuntimeError(f"{name}: nothing was resampled")
        diff = max((on_dev[k].float().cpu() - on_cpu[k].float()).abs().max().item() for k in changed)
        if diff > 1e-4:
            raise RuntimeError(f"{name}: the device result differs from the CPU's by {diff}")
        out[name] = {"resampled": len(changed), "max_abs_diff_vs_cpu": diff, "device": str(on_dev[changed[0]].device)}
    return out


# ----------------------------------------------------------------------------------------------------
# 3. The CLI: pretrain, stop, resume, fine-tune


def _cli(settings: Settings, *args: str) -> subprocess.Popen:
    """``python -m pipeline <args>`` as the Makefile runs it, its output in a log file under the report folder."""
    name = next((a.split("=", 1)[1] for a in args if a.startswith("run.name=")), args[0])
    log = open(settings.out / f"{name}-{len(list(settings.out.glob(name + '-*.log')))}.log", "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # the launcher sets its own
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdout=log, stderr=log)
    proc.log_path = Path(log.name)
    return proc


def _wait(procs: dict[str, subprocess.Popen], settings: Settings) -> dict[str, tuple[int, str]]:
    """Return codes and the end of each output; a process still running when the budget is spent is ended."""
    out = {}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(10.0, settings.left_s()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out[name] = (proc.returncode, proc.log_path.read_text(errors="replace")[-3000:])
    return out


def _pretrain_args(settings: Settings, name: str, *extra: str) -> list[str]:
    return [
        "pretrain", "--config", "configs/pretrain/digits_vit.yaml", f"deepspeed.precision={settings.precision}",
        "deepspeed.zero_stage=2", f"model.compile={settings.compile}", "optim.epochs=2", "optim.warmup_epochs=0.5",
        "checkpoint.every_steps=5", "checkpoint.background_write=true", "eval.every_steps=0", "data.num_workers=2",
        "tracking.log_every_steps=1", f"run.root={settings.out / 'runs'}", f"run.name={name}", *extra,
    ]  # fmt: skip


# MLflow tracking (and its GPU system metrics) in the uninterrupted run only: two processes creating one sqlite
# store at the same moment would race (the runs would go on, with warnings)
QUIET = ("tracking.enabled=false",)


def check_runs(settings: Settings) -> dict:
    """Phase 1: the uninterrupted run beside the one stopped at step 10; phase 2: the resume beside the
    fine-tune from the finished run. The two runs share the GPU (tiny models); the losses must agree."""
    _digits_shards()
    first = _wait(
        {
            "full": _cli(settings, *_pretrain_args(settings, "full")),
            "stopped": _cli(settings, *_pretrain_args(settings, "resumed", "run.stop_at_step=10", *QUIET)),
        },
        settings,
    )
    _expect(first, {"full": 0, "stopped": 3})
    runs = settings.out / "runs"
    finetune = [
        "finetune", "--config", "configs/finetune/digits_vit.yaml", "--pretrained", str(runs / "full"),
        f"deepspeed.precision={settings.precision}", "optim.epochs=2", "optim.warmup_epochs=0.5", "data.num_workers=2",
        f"run.root={runs}", "run.name=finetune", *QUIET,
    ]  # fmt: skip
    second = _wait(
        {
            "resumed": _cli(settings, *_pretrain_args(settings, "resumed", *QUIET)),
            "finetune": _cli(settings, *finetune),
        },
        settings,
    )
    _expect(second, {"resumed": 0, "finetune": 0})
    if "resumed from step00000010" not in _full_log(settings, "resumed"):
        raise RuntimeError("the second start of the stopped run did not resume from step00000010")
    return {**_compare_losses(runs), "finetune": _summary(runs / "finetune").get("final", {})}


def _expect(results: dict[str, tuple[int, str]], codes: dict[str, int]) -> None:
    for name, want in codes.items():
        code, tail = results[name]
        if code != want:
            raise RuntimeError(f"{name}: exit code {code}, expected {want}; output ends:\n{tail}")


def _full_log(settings: Settings, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(settings.out.glob(f"{name}-*.log")))


def _summary(run: Path) -> dict:
    from pipeline.rundir import RunDir

    return RunDir(run).read_summary()


def _compare_losses(runs: Path) -> dict:
    """The resumed run's losses after step 10 against the uninterrupted run's (bf16 on a GPU: close, not equal;
    some CUDA backward kernels accumulate in a nondeterministic order)."""
    full = dict(map(tuple, _summary(runs / "full")["loss_history"]))
    resumed = dict(map(tuple, _summary(runs / "resumed")["loss_history"]))
    steps = sorted(s for s in full if s > 10)
    if not steps or any(s not in resumed for s in steps):
        raise RuntimeError(f"loss histories do not cover the same steps: {sorted(full)} vs {sorted(resumed)}")
    worst = max(abs(resumed[s] - full[s]) / max(abs(full[s]), 1e-8) for s in steps)
    first = abs(resumed[steps[0]] - full[steps[0]]) / max(abs(full[steps[0]]), 1e-8)
    if worst > 0.05:
        raise RuntimeError(f"the resumed losses differ from the uninterrupted run's by up to {worst:.2%}")
    return {"resumed_steps": len(steps), "first_resumed_step_rel_diff": first, "max_rel_diff": worst}


def _digits_shards() -> None:
    """The demo shards, as ``make pretrain`` writes them (once)."""
    if not (ROOT / "data/digits/manifest.json").exists():
        cmd = [sys.executable, "-m", "pipeline", "shards", "--source", "digits", "--out", "data/digits"]
        subprocess.run(cmd, cwd=ROOT, check=True)


# ----------------------------------------------------------------------------------------------------
# 4. MAE (a hook), 5. the bench rows


def check_mae_step(settings: Settings) -> dict:
    """MAE (ViT-B/16, encoder on the visible quarter) and SimMIM (Swin-B) as the objectives train them, ZeRO-2
    bf16 fused AdamW: 8 steps each on one repeated batch; the losses must be finite and fall."""
    import torch

    from pipeline.config import load_config
    from pipeline.model.factory import create_model
    from pipeline.train.engine import compute_dtype, create_engine, device
    from pipeline.train.objectives import StepContext, build_objective
    from pipeline.train.optim import make_optimizer

    models = {"mae": "vit_base_patch16_224", "simmim": "swin_base_patch4_window7_224"}
    if settings.dry_run:
        models = {"mae": "vit_tiny_patch16_224", "simmim": "swin_tiny_patch4_window7_224"}
    out = {}
    for objective_name, model_name in models.items():
        config = load_config(
            None,
            [f"objective.name={objective_name}", f"model.name={model_name}", "model.img_size=224",
             f"deepspeed.precision={settings.precision}", "deepspeed.zero_stage=2",
             f"data.batch_size={4 if settings.dry_run else 64}", "optim.lr=1e-3", "optim.warmup_epochs=0"],
        )  # fmt: skip
        dev, dtype = device(), compute_dtype(config)
        torch.manual_seed(0)
        objective = build_objective(config, 0)
        module = objective.wrap(create_model(config.model, objective.head_classes(0)))
        engine = create_engine(module, make_optimizer(module, config, dev), config, 1)
        images = torch.randn(config.data.batch_size, 3, 224, 224, device=dev)
        losses, start = [], time.perf_counter()
        for step in range(8):
            loss = objective.loss(engine, images, None, StepContext(step, 0, 0, 0, dtype, dev))
            engine.backward(loss)
            engine.step()
            losses.append(loss.float().item())
        if not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
            raise RuntimeError(f"{objective_name}: losses {losses} are not finite and falling")
        out[objective_name] = {
            "model": model_name,
            "losses": losses,
            "seconds_8_steps": round(time.perf_counter() - start, 2),
        }
        del engine
    return out


BENCH_CONFIGS = {"vit_b16": "configs/bench/gpu_vit_b16.yaml", "swin_b": "configs/bench/gpu_swin_b.yaml"}


def check_bench(settings: Settings, which: str) -> dict:
    """One GPU bench row set (benchmarks/bench.py's measurement): plain, DeepSpeed and timm-style steps, MFU
    against the measured matmul peak, and the data wait with the real loader."""
    import torch

    from benchmarks.bench import BENCH_SETS, bench_data_wait, bench_step, write_jpeg_bench_shards
    from pipeline.config import load_config
    from pipeline.data.plan import plan_data
    from pipeline.model.factory import create_model

    small = ["model.name=vit_tiny_patch16_224" if which == "vit_b16" else "model.name=swin_tiny_patch4_window7_224"]
    dry = [*small, "data.batch_size=4", "data.num_workers=1", "model.compile=false", "deepspeed.precision=fp32"]
    config = load_config(BENCH_CONFIGS[which], dry if settings.dry_run else [])
    folder = Path(config.data.train_shards).parent
    write_jpeg_bench_shards(folder, *BENCH_SETS[folder.name])
    steps, warmup, rounds = (2, 1, 1) if settings.dry_run else (12, 3, 2)
    step = bench_step(config, 224, steps, warmup, rounds)
    torch.manual_seed(0)
    plan = plan_data(config, 1)
    config.model.compile = False  # eager here: one more compile would not fit the time; the row is about the loader
    step["with_loader"] = bench_data_wait(config, plan, create_model(config.model, config.model.num_classes), steps)
    return {"model": config.model.name, "batch_size": config.data.batch_size, "step": step}


# name -> (function, the seconds it needs on an H100/H200, estimated: a part is skipped when less is left)
PARTS = {
    "engine": (check_engine, 60.0),
    "adapt": (check_adapt, 10.0),
    "runs": (check_runs, 150.0),
    "mae": (check_mae_step, 40.0),
    "bench_vit_b16": (lambda s: check_bench(s, "vit_b16"), 100.0),
    "bench_swin_b": (lambda s: check_bench(s, "swin_b"), 130.0),
}


# ----------------------------------------------------------------------------------------------------
# The report


def _write_report(report: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(to_markdown(report))


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"## make gpu-check{' (CPU DRY RUN: figures mean nothing)' if report['dry_run'] else ''}",
        f"{m['date']} · {m.get('gpu') or 'no GPU'} · {m['cpu']} x{m['cores']} · torch {m['torch']}, "
        f"CUDA {m.get('cuda')}, deepspeed {m['deepspeed']}, timm {m['timm']}",
        "",
        "| part | status | seconds | notes |",
        "|---|---|---|---|",
    ]
    for part in report["parts"]:
        status = part.get("status")
        note = (part.get("error") or part.get("reason") or _note(part)).replace("|", "/").replace("\n", " / ")
        lines.append(f"| {part['name']} | {status} | {part.get('seconds', '')} | {note} |")
    rows = [p for p in report["parts"] if p["name"].startswith("bench_") and p["status"] == "ok"]
    if rows:
        lines += [
            "",
            "| model | batch | loop | images/s | step ms | MFU | peak TFLOP/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for part in rows:
            step = part["step"]
            for loop in ("deepspeed", "plain", "timm_style"):
                if loop in step:
                    r = step[loop]
                    lines.append(
                        f"| {part['model']} | {part['batch_size']} | {loop} | {r['images_per_s']:.1f} | "
                        f"{r['step_ms']:.1f} | {100 * r['mfu']:.1f}% | {step['peak_tflops_measured']:.1f} |"
                    )
            wait = step["with_loader"]
            lines.append(
                f"| {part['model']} | {part['batch_size']} | DeepSpeed (eager) + real loader | {wait['images_per_s']:.1f} | "
                f"| data wait {100 * wait['data_wait_fraction']:.1f}% | |"
            )
    return "\n".join(lines) + "\n"


def _note(part: dict) -> str:
    if part["name"] in ("engine", "mae"):
        return ", ".join(f"{k}: loss {v['losses'][0]:.3f} -> {v['losses'][-1]:.3f}" for k, v in part.items()
                         if isinstance(v, dict))  # fmt: skip
    if part["name"] == "runs":
        return (
            f"resumed losses vs uninterrupted: max rel diff {part['max_rel_diff']:.2e}; "
            f"fine-tune val top-1 {part['finetune'].get('val_top1', float('nan')):.1f}"
        )
    if part["name"] == "adapt":
        return ", ".join(
            f"{k}: max diff {v['max_abs_diff_vs_cpu']:.1e}" for k, v in part.items() if isinstance(v, dict)
        )
    return ""


if __name__ == "__main__":
    sys.exit(main())
