"""Command line: ``python -m pipeline {pretrain,finetune,pipeline,shards,ui,tracking-sync}``; the Makefile's targets
call these (``make bench`` runs benchmarks/, a tool beside the library). Argument parsing only: each command is
carried out elsewhere (launch/ for the training stages, pipeline/data for shards, pipeline/tracking for the UI
and sync).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIGS = {"pretrain": "configs/pretrain/digits_vit.yaml", "finetune": "configs/finetune/digits_vit.yaml"}
OVERRIDES_HELP = (
    "overrides: space-separated key=value, e.g. optim.lr=1e-3 data.batch_size=64 launch.nproc=2 "
    "run.name=myrun; each key once; quote shard patterns in a shell: 'data.train_shards=x-{0..7}.tar'"
)


def _train_parser(stage: str, sub) -> None:
    p = sub.add_parser(
        stage,
        help=f"{stage} a timm ViT/Swin with DeepSpeed (locally or on Slurm)",
        description=f"{stage.capitalize()} from WebDataset shards with DeepSpeed ZeRO. Runs N local "
        "processes (launch.nproc) or submits to Slurm (launch.cluster=slurm|auto). "
        "Starting the same run again resumes it from its latest complete checkpoint.",
        epilog=OVERRIDES_HELP,
    )
    p.add_argument("--config", default=DEFAULT_CONFIGS[stage], help="YAML config (default: %(default)s)")
    if stage == "finetune":
        p.add_argument(
            "--pretrained",
            default=None,
            help="run dir, checkpoint dir or MLflow run id of a pretraining run "
            "(default: the latest finished pretraining run of the same config family); "
            "'none': random init, the recipe's from-scratch baseline",
        )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser("pretrain", sub)
    _train_parser("finetune", sub)
    pipe = sub.add_parser(
        "pipeline",
        help="pretrain, then fine-tune from it (locally in turn; on Slurm as two "
        "jobs, the fine-tune starting once the pretraining has succeeded)",
        epilog="overrides apply to both stages; run.name=N names the runs N-pretrain and N-finetune",
    )
    pipe.add_argument("--pretrain-config", default=DEFAULT_CONFIGS["pretrain"], help="(default: %(default)s)")
    pipe.add_argument("--finetune-config", default=DEFAULT_CONFIGS["finetune"], help="(default: %(default)s)")
    pipe.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_parser("shards", help="write WebDataset shards (digits demo or an ImageFolder tree)", add_help=False)
    ui = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s; others only when asked)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--root", default="runs", help="runs folder holding mlflow.db (default: %(default)s)")
    ui.add_argument("--workers", type=int, default=2, help="server worker processes (default: %(default)s)")
    ui.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host headers the server accepts when bound beyond loopback (MLflow's default: localhost "
        "and private IPs), e.g. mlflow.example.org",
    )
    sync = sub.add_parser(
        "tracking-sync",
        help="upload a run's MLflow records kept while the server was unreachable",
        description="Sends what a run directory's tracking journal (tracking_spool.jsonl) still "
        "holds to its MLflow store, creating the MLflow run if it never was.",
    )
    sync.add_argument("run_dir", help="the run folder, e.g. runs/pretrain-digits_vit-20261121-093300")
    sync.add_argument(
        "--tracking-uri",
        default=None,
        help="store to send to (default: the run's tracking.tracking_uri, $MLFLOW_TRACKING_URI, "
        "or the run root's mlflow.db)",
    )
    sync.add_argument(
        "--timeout", type=float, default=60.0, help="keep trying this many seconds (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["shards"]:  # its own parser with its own --help
        from pipeline.data.shards_cli import main as shards_main

        return shards_main(argv[1:])
    parser = build_parser()
    # key=value overrides may come before and after options (argparse alone stops collecting them at an option)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):  # key=value: config's check
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "ui":
        from pipeline.tracking.store import serve_ui

        return serve_ui(args.host, args.port, Path(args.root), args.workers, args.allowed_hosts)
    if args.command == "tracking-sync":
        from pipeline.tracking.sync import sync_command

        return sync_command(Path(args.run_dir), args.tracking_uri, args.timeout)
    if args.command == "pipeline":
        from launch.pipeline import run_pipeline

        return run_pipeline(args.pretrain_config, args.finetune_config, args.overrides)
    from launch.stages import StageRequest, run_stage

    request = StageRequest(args.command, args.config, args.overrides, getattr(args, "pretrained", None))
    return run_stage(request, print_config=args.print_config)
