"""``make bench-checkpoint``: what a checkpoint save costs the training loop, synchronous vs background write.

N local ranks (launch/local.py) train one timm model with DeepSpeed on a synthetic batch held in memory and save
through pipeline/train/checkpoint.py exactly as the Trainer does, alternating the two modes in rounds on the same
engine (so a slow spell of a shared machine hits both). Per save it records: the time the loop was blocked (the
slowest rank), the time until the checkpoint was complete on disk, and the steps trained meanwhile with their
excess over the median step before the save (the background write competes with training for the cores). The
throughput cost at an interval T is (blocked + excess) / T. Results: JSON + Markdown under runs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

MODES = ("sync", "background")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_large_patch16_224")
    parser.add_argument("--zero", type=int, nargs="+", default=[1, 2], help="ZeRO stages (default: 1 2)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2, help="per rank (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="saves per mode (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="steps before each save (default: %(default)s)")
    parser.add_argument("--interval-s", type=float, default=120.0, help="checkpoint interval for the cost")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank: JSON settings
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    from launch.local import run_local

    out = Path(args.out)
    folder = out / f"checkpoint-{time.strftime('%Y%m%d-%H%M%S')}"
    report = {"machine": _machine(), "model": args.model, "ranks": args.ranks, "micro_batch": args.micro_batch}
    for stage in args.zero:
        settings = {**vars(args), "zero": stage, "folder": str(folder / f"zero{stage}")}
        settings.pop("worker")
        argv = [sys.executable, "-m", "benchmarks.checkpoint", "--worker", json.dumps(settings)]
        result = run_local(argv, args.ranks, folder / f"zero{stage}" / "logs")
        if result.code != 0:  # the other stages' figures are still written
            print(f"error: the ZeRO-{stage} ranks failed ({result.failure})", file=sys.stderr)
            report.setdefault("failed", []).append(f"ZeRO-{stage}: {result.failure}")
            continue
        report[f"zero{stage}"] = summarize(json.loads((folder / f"zero{stage}" / "saves.json").read_text()), args)
    report["machine"]["load_end"] = os.getloadavg()
    markdown = to_markdown(report, args.interval_s)
    stem = out / f"bench-checkpoint-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"written: {stem}.json, .md", file=sys.stderr)
    return 1 if report.get("failed") else 0


def _machine() -> dict:
    import platform

    load = os.getloadavg()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "host": platform.node(), "load": load}


# ----------------------------------------------------------------------------------------------------
# One rank


def _worker(settings: dict) -> int:
    import torch
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.train.engine import create_engine, device, init_distributed
    from pipeline.train.optim import make_optimizer

    config = load_config(
        None,
        [
            f"model.name={settings['model']}",
            "model.num_classes=1000",
            "deepspeed.precision=fp32",
            f"deepspeed.zero_stage={settings['zero']}",
            f"data.batch_size={settings['micro_batch'] * settings['ranks']}",
            f"launch.nproc={settings['ranks']}",
        ],
    )
    env = init_distributed(config)
    from pipeline.model.factory import create_model

    torch.manual_seed(0)
    model = create_model(config.model, 1000)
    engine = create_engine(model, make_optimizer(model, config, device()), config, env.world_size)
    images = torch.randn(settings["micro_batch"], 3, 224, 224)
    labels = torch.randint(0, 1000, (settings["micro_batch"],))

    def step() -> float:
        start = time.perf_counter()
        engine.backward(torch.nn.functional.cross_entropy(engine(images), labels))
        getattr(engine.checkpoint_engine, "wait_staged", lambda: None)()  # as the Trainer: the copy before the update
        engine.step()
        return time.perf_counter() - start

    saves = _rounds(engine, step, env, settings)
    if env.rank == 0:
        Path(settings["folder"], "saves.json").write_text(json.dumps(saves, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _rounds(engine, step, env, settings: dict) -> list[dict]:
    """Both modes in every round, their order alternating; one save each, with the steps around it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pipeline.train.background import BackgroundCheckpointEngine, can_defer_copy

    defer = can_defer_copy(engine.module, settings["zero"])  # as the Trainer
    background = BackgroundCheckpointEngine(env.rank, pin=False, defer_copy=defer)
    engines = {"sync": TorchCheckpointEngine(None), "background": background}
    engines["sync"].zipfile_serialization = True  # as the engine's own: DeepSpeed's default
    for _ in range(2):
        step()  # warm-up (allocator, DeepSpeed's buffers)
    saves, count = [], 0
    for round_ in range(settings["rounds"]):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            engine.checkpoint_engine = engines[mode]
            count += 1
            saves.append(_one_save(engine, step, env, settings, mode, engines[mode], count))
    return saves


def _one_save(engine, step, env, settings: dict, mode: str, writer, count: int) -> dict:
    """Steps before (the baseline), the save, then steps until the checkpoint is complete on every rank (sync:
    as many steps as the previous background save needed, at least 2, for the page cache's own write-back)."""
    import torch

    from pipeline.rundir import RunDir
    from pipeline.train import checkpoint as ckpt

    before = [step() for _ in range(settings["steps"])]
    waited_before = getattr(writer, "staged_wait_s", 0.0)
    start = time.perf_counter()
    result = ckpt.save(
        engine,
        RunDir(settings["folder"]).checkpoints,
        count,
        {"step": count},
        rank=env.rank,
        keep_last=1,
        world_size=env.world_size,
        zero_stage=settings["zero"],
        writer=writer if mode == "background" else None,
    )
    after = []
    while _max_over_ranks(float(mode == "background" and writer.in_flight())) or (
        mode == "sync" and len(after) < max(2, settings.get("sync_after", 2))
    ):
        after.append(step())
    if mode == "background":
        writer.wait()
        settings["sync_after"] = len(after)
    torch.distributed.barrier()
    durable = _max_over_ranks(time.perf_counter() - start)
    # Blocked: the save call, plus (deferred copy) the next optimizer step's wait for the copy; that wait is
    # inside a step's time, so it is taken out of the excess.
    waited = getattr(writer, "staged_wait_s", 0.0) - waited_before
    blocked = _max_over_ranks(result.seconds + waited)
    base = statistics.median(before)
    return {
        "mode": mode,
        "blocked_s": blocked,
        "call_s": _max_over_ranks(result.seconds),
        "staged_wait_s": _max_over_ranks(waited),
        "complete_after_s": durable,
        "step_s": base,
        "steps_meanwhile": len(after),
        "excess_s": max(0.0, sum(max(0.0, s - base) for s in after) - waited),
        "bytes_rank0": result.bytes,
    }


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ----------------------------------------------------------------------------------------------------
# Report


def summarize(saves: list[dict], args) -> dict:
    """Medians and ranges per mode; the cost at the interval; blocking of background vs sync, per round."""
    out: dict = {"saves": saves}
    for mode in MODES:
        mine = [s for s in saves if s["mode"] == mode]
        costs = [(s["blocked_s"] + s["excess_s"]) / args.interval_s for s in mine]
        out[mode] = {
            key: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for key, v in {
                "blocked_s": [s["blocked_s"] for s in mine],
                "complete_after_s": [s["complete_after_s"] for s in mine],
                "excess_s": [s["excess_s"] for s in mine],
                "step_s": [s["step_s"] for s in mine],
                "cost_at_interval": costs,
            }.items()
        }
    sync = [s["blocked_s"] for s in saves if s["mode"] == "sync"]
    background = [s["blocked_s"] for s in saves if s["mode"] == "background"]
    ratios = [b / s for b, s in zip(background, sync)]
    out["blocked_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def to_markdown(report: dict, interval_s: float) -> str:
    m = report["machine"]
    lines = [
        f"### checkpoint saves: {report['model']}, {report['ranks']} ranks, micro batch {report['micro_batch']}, fp32",
        f"{m['date']} · {m['cores']} cores · load average (1, 5, 15 min) {', '.join(f'{x:.1f}' for x in m['load'])}"
        f" at the start, {', '.join(f'{x:.1f}' for x in m.get('load_end', ()))} at the end",
        "",
        f"| ZeRO | mode | blocked s | complete after s | excess step time s | cost at {interval_s:.0f} s |",
        "|---|---|---|---|---|---|",
    ]

    def cell(d: dict, scale: float = 1.0, digits: int = 2) -> str:
        return f"{d['median'] * scale:.{digits}f} ({d['min'] * scale:.{digits}f}-{d['max'] * scale:.{digits}f})"

    for key in sorted(k for k in report if k.startswith("zero")):
        r = report[key]
        for mode in MODES:
            row = r[mode]
            lines.append(
                f"| {key[4:]} | {mode} | {cell(row['blocked_s'])} | {cell(row['complete_after_s'])} | "
                f"{cell(row['excess_s'])} | {cell(row['cost_at_interval'], 100, 1)}% |"
            )
        lines.append(f"| {key[4:]} | background / sync blocked | {cell(r['blocked_ratio'], 100, 1)}% | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
