"""Command line: ``python -m pipeline {pretrain,finetune,shards,ui}``; the Makefile targets call these.

Everything that can be checked is checked here, before a process starts or a job is submitted:
a config or data problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_CONFIGS = {"pretrain": "configs/pretrain/digits_vit.yaml", "finetune": "configs/finetune/digits_vit.yaml"}
EXIT_USAGE = 2


def _train_parser(stage: str, sub) -> None:
    p = sub.add_parser(stage, help=f"{stage} a timm ViT/Swin with DeepSpeed (locally or on Slurm)",
                       description=f"{stage.capitalize()} from WebDataset shards with DeepSpeed ZeRO. "
                                   "Runs N local processes (launch.nproc) or submits to Slurm (launch.cluster=slurm|auto). "
                                   "Starting the same run again resumes it from its latest complete checkpoint.",
                       epilog="overrides: space-separated key=value, e.g. optim.lr=1e-3 data.batch_size=64 "
                              "launch.nproc=2 run.name=myrun")
    p.add_argument("--config", default=DEFAULT_CONFIGS[stage], help="YAML config (default: %(default)s)")
    if stage == "finetune":
        p.add_argument("--pretrained", default=None,
                       help="run dir, checkpoint dir or MLflow run id of a pretraining run "
                            "(default: the latest finished pretraining run of the same config family)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser("pretrain", sub)
    _train_parser("finetune", sub)
    sub.add_parser("shards", help="write WebDataset shards (digits demo or an ImageFolder tree)", add_help=False)
    ui = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s; others only when asked)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--root", default="runs", help="runs folder holding mlflow.db (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["shards"]:  # its own parser with its own --help
        from .shards import main as shards_main

        return shards_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "ui":
        return run_ui(args.host, args.port, Path(args.root))
    return run_stage(args.command, args)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def resolve_cluster(requested: str) -> str:
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return requested


def prepare(stage: str, config_path: str, overrides: list[str], pretrained: str | None = None):
    """Load, validate and complete a config for a stage; returns (config, family). Raises ConfigError/DataError."""
    from .config import ConfigError, load_config, validate
    from .data import plan_data

    config = load_config(config_path, [*overrides, f"run.stage={stage}"])
    cluster = resolve_cluster(config.launch.cluster)
    if cluster != config.launch.cluster:
        config.launch.cluster = cluster
        validate(config)  # the world size may have changed
    plan = plan_data(config, config.world_size)
    if config.model.num_classes is None:
        if not plan.classes:
            raise ConfigError("model.num_classes is unset and no manifest.json names the classes; set model.num_classes")
        config.model.num_classes = len(plan.classes)
    config.data.train_samples = plan.train_samples
    family = Path(config_path).stem
    config.tracking.experiment = config.tracking.experiment or family
    if stage == "finetune":
        from .finetune import resolve_pretrained

        resolve_pretrained(config, pretrained, family)
    return config, family


def run_stage(stage: str, args) -> int:
    from .config import ConfigError, to_yaml
    from .data import DataError
    from .runs import choose_run_dir, is_complete, write_config

    try:
        config, family = prepare(stage, args.config, args.overrides, getattr(args, "pretrained", None))
        if args.print_config:
            print(to_yaml(config), end="")
            return 0
        run_dir, resuming = choose_run_dir(config, family)
    except (ConfigError, DataError) as exc:
        return _fail(str(exc))
    if resuming and is_complete(run_dir):
        print(f"{run_dir} is already complete (summary.json); set run.name=<new name> for a new run", file=sys.stderr)
        return 0
    write_config(run_dir, config)  # on resume: the saved one, with only allowed keys changed (run.stop_at_step...)
    print(f"{'resuming' if resuming else 'new'} {stage} run: {run_dir}", file=sys.stderr)
    if config.launch.cluster == "slurm":
        from launch.slurm import submit_run

        return submit_run(config, run_dir)
    return run_local_stage(config, run_dir)


def worker_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.worker", str(run_dir)]


def run_local_stage(config, run_dir: Path) -> int:
    from launch.local import RESUMABLE_EXIT, run_local

    code = run_local(worker_command(run_dir), config.launch.nproc, run_dir / "logs")
    if code == RESUMABLE_EXIT:
        print(f"stopped with a checkpoint; run the same command again (or add run.name={run_dir.name}) to resume",
              file=sys.stderr)
    elif code == 0:
        summary = run_dir / "summary.json"
        print(f"finished: {run_dir}\n  summary: {summary}\n  MLflow: make ui", file=sys.stderr)
    return code


def run_ui(host: str, port: int, root: Path) -> int:
    """The MLflow UI on the same store the runs log to ($MLFLOW_TRACKING_URI, else runs/mlflow.db)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"
    if uri.startswith("http"):
        return _fail(f"MLFLOW_TRACKING_URI={uri} is a server already; open it in a browser")
    root.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--default-artifact-root", (root.resolve() / "mlartifacts").as_uri()]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
