"""Command line: ``python -m pipeline {pretrain,finetune,shards,ui}``; the Makefile targets call these.

Everything that can be checked is checked here, before a process starts or a job is submitted:
a config or data problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    pipe = sub.add_parser("pipeline", help="pretrain, then fine-tune from it (locally in turn; on Slurm as two "
                                           "jobs, the fine-tune starting once the pretraining has succeeded)",
                          epilog="overrides apply to both stages; run.name=N names the runs N-pretrain and N-finetune")
    pipe.add_argument("--pretrain-config", default=DEFAULT_CONFIGS["pretrain"], help="(default: %(default)s)")
    pipe.add_argument("--finetune-config", default=DEFAULT_CONFIGS["finetune"], help="(default: %(default)s)")
    pipe.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_parser("shards", help="write WebDataset shards (digits demo or an ImageFolder tree)", add_help=False)
    sub.add_parser("bench", help="loader and training-step throughput vs baselines (make bench)", add_help=False)
    ui = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s; others only when asked)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--root", default="runs", help="runs folder holding mlflow.db (default: %(default)s)")
    ui.add_argument("--workers", type=int, default=2, help="server worker processes (default: %(default)s)")
    ui.add_argument("--allowed-hosts", default=None,
                    help="Host headers the server accepts when bound beyond loopback (MLflow's default: localhost "
                         "and private IPs), e.g. mlflow.example.org")
    sync = sub.add_parser("tracking-sync", help="upload a run's MLflow records kept while the server was unreachable",
                          description="Sends what a run directory's tracking journal (tracking_spool.jsonl) still "
                                      "holds to its MLflow store, creating the MLflow run if it never was.")
    sync.add_argument("run_dir", help="the run folder, e.g. runs/pretrain-digits_vit-20261121-093300")
    sync.add_argument("--tracking-uri", default=None,
                      help="store to send to (default: the run's tracking.tracking_uri, $MLFLOW_TRACKING_URI, "
                           "or the run root's mlflow.db)")
    sync.add_argument("--timeout", type=float, default=60.0, help="keep trying this many seconds (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["shards"]:  # its own parser with its own --help
        from pipeline.data.writer import main as shards_main

        return shards_main(argv[1:])
    if argv[:1] == ["bench"]:
        from benchmarks.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    # key=value overrides may come before and after options (argparse alone stops collecting them at an option)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command == "ui":
        return run_ui(args.host, args.port, Path(args.root), args.workers, args.allowed_hosts)
    if args.command == "tracking-sync":
        return run_tracking_sync(Path(args.run_dir), args.tracking_uri, args.timeout)
    if args.command == "pipeline":
        return run_pipeline(args)
    return run_stage(args.command, args)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def resolve_cluster(requested: str) -> str:
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return requested


def prepare(stage: str, config_path: str, overrides: list[str], pretrained: str | None = None,
            resolve_weights: bool = True):
    """Load, validate and complete a config for a stage; returns (config, family). Raises ConfigError/DataError.
    resolve_weights=False (a fine-tune chained after a pretraining job): the weights are found in the job."""
    from pipeline.config import ConfigError, load_config, validate
    from pipeline.data.stream import plan_data

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
    if stage == "finetune" and resolve_weights:
        from pipeline.finetune.pretrained import resolve_pretrained

        resolve_pretrained(config, pretrained, family)
    elif stage == "finetune":
        config.finetune.pretrained = pretrained
    return config, family


def run_stage(stage: str, args) -> int:
    from pipeline.config import ConfigError, to_yaml
    from pipeline.data.stream import DataError
    from pipeline.rundir import choose_run_dir, is_complete, write_config

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
    busy = slurm_job_busy(run_dir) if resuming else None
    if busy:
        return _fail(busy)
    write_config(run_dir, config)  # on resume: the saved one, with only allowed keys changed (run.stop_at_step...)
    print(f"{'resuming' if resuming else 'new'} {stage} run: {run_dir}", file=sys.stderr)
    if config.launch.cluster == "slurm":
        return run_slurm_stage(config, run_dir, resume_command(stage, args, run_dir))
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


def run_pipeline(args) -> int:
    """Both stages, the fine-tune from the pretraining run: locally one after the other; on Slurm as two
    jobs submitted at once, the fine-tune with afterok on the pretraining job (its weights are converted in
    that job when it starts). Both configs are checked before anything runs or is submitted."""
    import shlex

    from pipeline.config import ConfigError
    from pipeline.data.stream import DataError
    from pipeline.rundir import choose_run_dir, is_complete, write_config

    name = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("run.name=")), None)
    shared = [o for o in args.overrides if not o.startswith("run.name=")]
    stage_args = {stage: argparse.Namespace(config=config_path, print_config=False, pretrained=None,
                                            overrides=shared + ([f"run.name={name}-{stage}"] if name else []))
                  for stage, config_path in (("pretrain", args.pretrain_config), ("finetune", args.finetune_config))}
    again = (f"make pipeline PRETRAIN_CONFIG={shlex.quote(args.pretrain_config)} FINETUNE_CONFIG="
             f"{shlex.quote(args.finetune_config)} ARGS={shlex.quote(' '.join(args.overrides))}")
    try:
        config, family = prepare("pretrain", args.pretrain_config, stage_args["pretrain"].overrides)
        fconfig, ffamily = prepare("finetune", args.finetune_config, stage_args["finetune"].overrides,
                                   resolve_weights=False)
        run_dir, resuming = choose_run_dir(config, family)
    except (ConfigError, DataError) as exc:
        return _fail(str(exc))
    stage_args["finetune"].pretrained = str(run_dir.resolve())
    pretrain_done = resuming and is_complete(run_dir)
    if not pretrain_done:
        busy = slurm_job_busy(run_dir) if resuming else None
        if busy:
            return _fail(busy)
        write_config(run_dir, config)
        print(f"{'resuming' if resuming else 'new'} pretrain run: {run_dir}", file=sys.stderr)
    if config.launch.cluster != "slurm":
        code = 0 if pretrain_done else run_local_stage(config, run_dir)
        return code or run_stage("finetune", stage_args["finetune"])
    if fconfig.launch.cluster != "slurm":
        return _fail(f"{args.finetune_config} runs launch.cluster={fconfig.launch.cluster}; the pipeline needs both "
                     "stages on Slurm (set launch.cluster=slurm in ARGS)")

    from launch.slurm import SubmitError, submit_run

    dependency = job = None
    if not pretrain_done:
        try:
            job = submit_run(config, run_dir, resume_hint=again)
        except SubmitError as exc:
            return _fail(str(exc))
        print(describe_slurm_job(job, run_dir), file=sys.stderr)
        dependency = f"afterok:{job.job_id}"
    fconfig.finetune.pretrained = str(run_dir.resolve())
    try:
        frun, fresuming = choose_run_dir(fconfig, ffamily)
    except ConfigError as exc:
        return _fail(str(exc))
    busy = slurm_job_busy(frun) if fresuming else None
    if busy or (fresuming and is_complete(frun)):
        print(busy or f"{frun} is already complete", file=sys.stderr)
        return 0 if not busy else EXIT_USAGE
    write_config(frun, fconfig)
    print(f"{'resuming' if fresuming else 'new'} finetune run: {frun} (after {run_dir.name})", file=sys.stderr)
    try:
        fjob = submit_run(fconfig, frun, dependency=dependency, entry="pipeline.worker:run_after_pretrain",
                          extra_args=[ffamily], resume_hint=again)
    except SubmitError as exc:
        return _fail(str(exc))
    print(describe_slurm_job(fjob, frun) + (f"\n  starts after job {job.job_id} succeeds" if job else ""),
          file=sys.stderr)
    if not config.launch.wait:
        print("  (returns now; add launch.wait=true to follow both jobs)", file=sys.stderr)
        return 0
    if job is not None:
        code = follow_slurm_job(job, run_dir, again)
        if code:
            print(f"the fine-tune job {fjob.job_id} will not start (its dependency failed)", file=sys.stderr)
            return code
    return follow_slurm_job(fjob, frun, again)


def resume_command(stage: str, args, run_dir: Path) -> str:
    """The command that continues this run (what a user reruns after a cancel or a failure)."""
    import shlex

    overrides = [o for o in args.overrides if not o.startswith("run.name=")] + [f"run.name={run_dir.name}"]
    pretrained = f" PRETRAINED={shlex.quote(args.pretrained)}" if getattr(args, "pretrained", None) else ""
    return f"make {stage} CONFIG={shlex.quote(args.config)}{pretrained} ARGS={shlex.quote(' '.join(overrides))}"


def slurm_job_busy(run_dir: Path) -> str | None:
    """A message when Slurm still runs (or queues) a job on this run dir: two jobs must not share it."""
    if not (run_dir / "slurm").is_dir():
        return None
    from launch.slurm import active_job

    active = active_job(run_dir / "slurm")
    if active is None:
        return None
    job_id, state = active
    return (f"{run_dir} already has Slurm job {job_id} ({state}); follow it (squeue -j {job_id}), or scancel "
            f"{job_id} first, or set run.name=<new name> for a new run")


def run_slurm_stage(config, run_dir: Path, resume: str, dependency: str | None = None):
    """Submit the run as one Slurm job; with launch.wait, follow rank 0 and return the job's exit code."""
    from launch.slurm import SubmitError, submit_run

    try:
        job = submit_run(config, run_dir, dependency=dependency, resume_hint=resume)
    except SubmitError as exc:
        return _fail(f"{exc} (check launch.slurm.* / the cluster profile {config.launch.slurm_profile or '(none)'})")
    print(describe_slurm_job(job, run_dir), file=sys.stderr)
    if not config.launch.wait:
        print("  (returns now; add launch.wait=true to follow the job until it ends)", file=sys.stderr)
        return 0
    return follow_slurm_job(job, run_dir, resume)


def describe_slurm_job(job, run_dir: Path) -> str:
    from launch.slurm import describe

    return f"{describe(job)}\n  run:    {run_dir}  (status: {run_dir / 'slurm' / 'status.json'})"


def follow_slurm_job(job, run_dir: Path, resume: str) -> int:
    """Stream rank 0 until the job ends; 0 finished, 3 stopped/cancelled with a checkpoint, 1 failed."""
    from launch.local import RESUMABLE_EXIT
    from launch.slurm import explain_failure, wait, write_status

    from pipeline.train.checkpoint import latest_complete

    try:
        outcome = wait(job)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job.job_id} keeps running (scancel {job.job_id} stops it, "
              f"with a checkpoint)", file=sys.stderr)
        return 130
    folder = run_dir / "slurm"
    if outcome.status == "completed":
        print(f"finished: {run_dir} (Slurm job {job.job_id})\n  summary: {run_dir / 'summary.json'}\n"
              f"  MLflow: make ui", file=sys.stderr)
        return 0
    tag = latest_complete(run_dir / "checkpoints")
    where = f"its latest checkpoint is {run_dir / 'checkpoints' / tag}" if tag else "it has no checkpoint yet"
    if outcome.status == "failed":
        print(explain_failure(outcome, folder), file=sys.stderr)
        write_status(folder, state="FAILED", slurm_state=outcome.state, resume=resume)
        print(f"once fixed, {'resume' if tag else 'start'} it again ({where}): {resume}", file=sys.stderr)
        return 1
    what = {"stopped": "stopped with a checkpoint", "cancelled": "was cancelled",
            "timeout": "hit its time limit"}.get(outcome.status, f"ended {outcome.state or 'without a result'}")
    write_status(folder, state=outcome.state or outcome.status.upper(), slurm_state=outcome.state, resume=resume,
                 message=f"job {what}; {where}")
    print(f"Slurm job {job.job_id} {what} ({outcome.state}); {where}.\n  resume: {resume}", file=sys.stderr)
    if outcome.log_tail and outcome.status not in ("stopped", "cancelled"):
        print(f"--- last lines of rank 0 ---\n{outcome.log_tail}---", file=sys.stderr)
    return RESUMABLE_EXIT if tag else 1


def run_tracking_sync(run_dir: Path, uri: str | None, timeout_s: float) -> int:
    """0: everything sent (or nothing to send); 1: the store is still unreachable; 2: not a run folder."""
    from pipeline.config import ConfigError
    from pipeline.tracking.tracker import SPOOL_FILE, sync_run

    if timeout_s < 0:
        return _fail(f"--timeout={timeout_s} must be >= 0 (seconds)")
    try:
        sent, left, error = sync_run(run_dir, uri, timeout_s)
    except (FileNotFoundError, ConfigError) as exc:
        return _fail(f"tracking-sync: {exc}; give a run folder such as runs/<stage>-<config>-<timestamp>")
    except ValueError as exc:
        print(f"tracking-sync: {exc}", file=sys.stderr)
        return 1
    if left:
        print(f"tracking-sync: sent {sent} records, {left} still in {run_dir / SPOOL_FILE}: the store did not "
              f"answer ({error}); run the same command again later", file=sys.stderr)
        return 1
    print(f"tracking-sync: {run_dir}: sent {sent} records; nothing left to send", file=sys.stderr)
    return 0


def run_ui(host: str, port: int, root: Path, workers: int = 2, allowed_hosts: str | None = None) -> int:
    """The MLflow UI on the same store the runs log to ($MLFLOW_TRACKING_URI, else runs/mlflow.db).

    Artifacts are proxied (--artifacts-destination): experiments the server creates get mlflow-artifacts:/
    locations, so runs on other machines can upload through it; runs that logged straight to the sqlite store
    keep their file:// locations, which the server reads directly."""
    if not 0 < port < 65536:
        return _fail(f"--port={port} must be a TCP port, 1-65535")
    if workers < 1:
        return _fail(f"--workers={workers} must be >= 1")
    # the job executor runs GenAI scorers and trace archival in extra processes: nothing this project uses
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"
    if uri.startswith("http"):
        return _fail(f"MLFLOW_TRACKING_URI={uri} is a server already; open it in a browser")
    root.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(workers), "--artifacts-destination", (root.resolve() / "mlartifacts").as_uri()]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the server replaces this process, so Ctrl-C and SIGTERM reach it directly
    return 0  # not reached
