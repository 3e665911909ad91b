"""``make bench-startup``: where the time from ``make pretrain`` to the first training step and the first logged
metric goes, phase by phase (the trainer's start-up clock, pipeline/train/startup.py, writes startup.json).

It runs the pipeline's own command (``python -m pipeline pretrain``, the default digits config unless --config)
``--rounds`` times, each a new run stopped after two steps, all in one MLflow store (the first round also creates
the store: reported on its own, as a user's very first run). Results: JSON + Markdown under runs/bench/, the
median of the later rounds per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain/digits_vit.yaml")
    parser.add_argument(
        "--rounds", type=int, default=4, help="runs (default: %(default)s; the first is reported apart)"
    )
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return parser.parse_args(argv)


def one_start(config: str, root: Path, name: str, overrides: list[str]) -> dict:
    """One `python -m pipeline pretrain` to its second step; the start-up record and the command's wall time."""
    command = [sys.executable, "-m", "pipeline", "pretrain", "--config", config]
    command += [f"run.root={root}", f"run.name={name}", "run.stop_at_step=2", "tracking.log_every_steps=1"]
    command += ["eval.every_steps=0", "checkpoint.every_steps=0", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITPIPE_")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 3:  # run.stop_at_step: stopped with a checkpoint
        raise SystemExit(f"bench-startup: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    record = json.loads((root / name / "startup.json").read_text())
    return {**record, "command_wall": round(wall, 3)}


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / f"startup-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    rounds = [one_start(args.config, out / "runs", f"start{i}", args.overrides) for i in range(args.rounds)]
    later = rounds[1:] or rounds
    median = {key: round(statistics.median(r[key] for r in later), 2) for key in later[0] if key != "attempt"}
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "machine": _machine(),
        "first_run": rounds[0],
        "median_later_runs": median,
        "rounds": rounds,
    }
    (out / "startup.json").write_text(json.dumps(report, indent=2))
    (out / "startup.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out}/startup.json, startup.md")
    return 0


def markdown(report: dict) -> str:
    first, median, m = report["first_run"], report["median_later_runs"], report["machine"]
    machine = f"{m['date']}, {m['cpu']}, {m['cores']} cores, load {m['load_1min']}, GPU: {m['gpu'] or 'none'}"
    rows = [f"| {name} | {first.get(name, 0):.2f} | {median[name]:.2f} |" for name in median]
    return "\n".join(
        [
            f"Start-up of `python -m pipeline pretrain --config {report['config']}` ({machine}), seconds:",
            "",
            "| phase | first run (new MLflow store) | median of later runs |",
            "|---|---:|---:|",
            *rows,
            "",
        ]
    )


def _machine() -> dict:
    """benchmarks/bench.py's machine record (read after the runs: its imports are not in their way), with the load."""
    from benchmarks.bench import machine_info

    return {**machine_info(), "load_1min": round(os.getloadavg()[0], 1)}


if __name__ == "__main__":
    raise SystemExit(main())
