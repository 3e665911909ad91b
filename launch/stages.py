"""Running a stage (pretrain or finetune) or the whole pipeline, the way the CLI's commands do it.

Everything that can be checked is checked before a process starts or a job is submitted, cheapest first: the
config (no heavy imports), the data plan, the cluster request, the model name (timm), the pretrained weights.
Any problem is one line on stderr and exit code 2. Then the run folder is chosen (a new one, or the one to
resume) and the stage runs locally (launch/local.py) or is submitted to Slurm (launch/slurm/).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.config import FROM_SCRATCH, Config, ConfigError
from pipeline.data.plan import DataError
from pipeline.rundir import EXIT_RESUMABLE, RunDir, choose_run_dir

EXIT_USAGE = 2


@dataclass
class StageRequest:
    """What the user asked for, as typed (kept to print the command that resumes the run)."""

    stage: str
    config_path: str
    overrides: list[str] = field(default_factory=list)
    pretrained: Optional[str] = None

    def resume_command(self, run: RunDir) -> str:
        """The command that continues this run (what a user reruns after a cancel or a failure)."""
        overrides = [o for o in self.overrides if not o.startswith("run.name=")] + [f"run.name={run.name}"]
        pretrained = f" PRETRAINED={shlex.quote(self.pretrained)}" if self.pretrained else ""
        return (
            f"make {self.stage} CONFIG={shlex.quote(self.config_path)}{pretrained} "
            f"ARGS={shlex.quote(' '.join(overrides))}"
        )


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def resolve_cluster(requested: str) -> str:
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return requested


def prepare(request: StageRequest, resolve_weights: bool = True) -> tuple[Config, str]:
    """Load, check and complete a stage's config; returns (config, family). Raises ConfigError / DataError.
    ``resolve_weights=False``: a fine-tune chained after a pretraining job finds its weights in the job."""
    from pipeline.config import load_config
    from pipeline.data.plan import plan_data

    config = load_config(request.config_path, request.overrides, stage=request.stage)
    cluster = resolve_cluster(config.launch.cluster)
    if cluster != config.launch.cluster:
        config.launch.cluster = cluster
        config.check()  # the world size may have changed
    if cluster == "slurm":
        from launch.slurm.params import check_slurm, fit_to_partition

        check_slurm(config.launch)
        fit_to_partition(config.launch)
    plan = plan_data(config, config.world_size)
    for note in plan.notes:  # e.g. what indexing the shards found
        print(note, file=sys.stderr)
    if config.model.num_classes is None and config.objective.name == "supervised":
        if not plan.num_classes:
            raise ConfigError(
                "model.num_classes is unset: no manifest.json or classes.json names the classes and the shards "
                "have no .cls labels; set model.num_classes"
            )
        config.model.num_classes = plan.num_classes
    config.data.train_samples = plan.train_samples
    from pipeline.model.spec import check_model  # timm's names, cached: no timm (seconds) before the launch

    check_model(config.model)
    family = Path(request.config_path).stem
    config.tracking.experiment = config.tracking.experiment or family
    if request.stage == "finetune" and (request.pretrained or config.finetune.pretrained) == FROM_SCRATCH:
        _from_scratch(config)
    elif request.stage == "finetune":
        config.finetune.register_as = (
            config.finetune.register_as if config.finetune.register_as is not None else f"{family}-finetuned"
        )
        if resolve_weights:
            from pipeline.finetune.resolve import resolve_pretrained

            resolve_pretrained(config, request.pretrained, family)
        else:
            config.finetune.pretrained = request.pretrained
    return config, family


def _from_scratch(config: Config) -> None:
    """``PRETRAINED=none``: the fine-tune recipe from random init, the baseline a pretraining is measured
    against; not registered as a model unless finetune.register_as says so."""
    config.finetune.pretrained, config.finetune.weights = FROM_SCRATCH, None
    if config.finetune.register_as is None:
        config.finetune.register_as = ""
    print("pretrained: none (random init: the from-scratch baseline of this recipe)", file=sys.stderr)


def open_run(config: Config, family: str) -> tuple[RunDir, bool, Optional[str]]:
    """(run folder, resuming?, why it must not start). Writes the config of a run that may start."""
    run, resuming = choose_run_dir(config, family)
    if resuming and run.is_complete():
        return run, resuming, "complete"
    busy = slurm_job_busy(run) if resuming else None
    if busy:
        return run, resuming, busy
    if resuming:
        check_resumable(run, config)
    run.write_config(config)  # on resume: the saved one, with only allowed keys changed (run.stop_at_step...)
    print(f"{'resuming' if resuming else 'new'} {config.run.stage} run: {run}", file=sys.stderr)
    return run, resuming, None


def check_resumable(run: RunDir, config: Config) -> None:
    """A checkpoint of another world size resumes through DeepSpeed's universal checkpoints (ZeRO-1/2 only):
    refuse what cannot work now, not after the ranks have started."""
    from pipeline.train.tags import elastic_problem, latest_complete, read_meta

    tag = latest_complete(run.checkpoints)
    if tag is not None:
        problem = elastic_problem(read_meta(run.checkpoints / tag), config.world_size, config.deepspeed.zero_stage)
        if problem:
            raise ConfigError(f"run.name={run.name} cannot resume from {tag}: {problem}")


def run_stage(request: StageRequest, print_config: bool = False) -> int:
    from pipeline.config import to_yaml
    from pipeline.train.startup import mark_stage_start

    mark_stage_start()  # the start-up clock of the ranks this stage starts
    try:
        config, family = prepare(request)
        if print_config:
            print(to_yaml(config), end="")
            return 0
        run, _, blocked = open_run(config, family)
    except (ConfigError, DataError) as exc:
        return fail(str(exc))
    if blocked == "complete":
        print(f"{run} is already complete (summary.json); set run.name=<new name> for a new run", file=sys.stderr)
        return 0
    if blocked:
        return fail(blocked)
    if config.launch.cluster == "slurm":
        return run_slurm_stage(config, run, request.resume_command(run))
    return run_local_stage(config, run)


def run_local_stage(config: Config, run: RunDir) -> int:
    """The ranks as local processes, restarted from the latest checkpoint after a failure (launch.max_failures)."""
    from launch.local import run_local
    from launch.retry import record_failure, retry_decision
    from launch.watchdog import Watch

    launch = config.launch
    watch = Watch(run.heartbeats, launch.hang_timeout_s, launch.startup_grace_s, launch.heartbeat_s)
    attempt = 0
    while True:
        result = run_local(
            [sys.executable, "-m", "pipeline.worker", str(run)], launch.nproc, run.logs, watch=watch, attempt=attempt
        )
        code, failure = result.code, result.failure
        if failure is None:
            break
        record_failure(
            run, rank=failure.rank, node=failure.node, step=failure.step, cause=failure.cause, attempt=attempt
        )
        retry, why = retry_decision(run, launch.max_failures)
        if not retry:
            if launch.max_failures:
                print(f"not retried: {why}", file=sys.stderr)
            break
        attempt += 1
        print(
            f"retrying from the latest checkpoint ({why}); cause: rank {failure.rank} at step {failure.step}: "
            f"{failure.cause}",
            file=sys.stderr,
        )
    if code == EXIT_RESUMABLE:
        print(
            f"stopped with a checkpoint; run the same command again (or add run.name={run.name}) to resume",
            file=sys.stderr,
        )
    elif code == 0:
        print(f"finished: {run}\n  summary: {run.summary}\n  MLflow: make ui", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------------------------------
# Slurm


def slurm_job_busy(run: RunDir) -> Optional[str]:
    """A message when Slurm still runs (or queues) a job on this run dir: two jobs must not share it."""
    if not run.slurm.is_dir():
        return None
    from launch.slurm.status import active_job

    active = active_job(run.slurm)
    if active is None:
        return None
    job_id, state = active
    return (
        f"{run} already has Slurm job {job_id} ({state}); follow it (squeue -j {job_id}), or scancel "
        f"{job_id} first, or set run.name=<new name> for a new run"
    )


def submit_stage(config: Config, run: RunDir, resume: str, dependency: Optional[str] = None):
    """Submit one run as one job; prints how to follow it. Raises SubmitError."""
    from launch.slurm.monitor import describe, submit_run

    job = submit_run(config, run.path, dependency=dependency, resume_hint=resume)
    print(f"{describe(job)}\n  run:    {run}  (status: {run.slurm / 'status.json'})", file=sys.stderr)
    return job


def run_slurm_stage(config: Config, run: RunDir, resume: str) -> int:
    """Submit the run as one Slurm job; with launch.wait, follow rank 0 and return the job's exit code."""
    from launch.slurm.params import SubmitError

    try:
        job = submit_stage(config, run, resume)
    except SubmitError as exc:
        return fail(f"{exc} (check launch.slurm.* / the cluster profile {config.launch.slurm_profile or '(none)'})")
    if not starts(job):
        return 1
    if not config.launch.wait:
        print("  (returns now; add launch.wait=true to follow the job until it ends)", file=sys.stderr)
        return 0
    return follow_slurm_job(job, run, resume)


def starts(job, seconds: float = 30.0) -> bool:
    """Wait until the scheduler has looked at a new job: one pending for a reason that will not clear by itself
    (a limit it exceeds: cancelled; nodes that are down) is reported now, and False returned."""
    import subprocess
    import time

    from launch.slurm.status import pending_verdict

    end = time.monotonic() + seconds
    verdict, reason = pending_verdict(job.job_id)
    while verdict == "unknown" and time.monotonic() < end:
        time.sleep(1.0)
        verdict, reason = pending_verdict(job.job_id)
    if verdict == "never":
        subprocess.run(["scancel", str(job.job_id)], check=False)
        print(
            f"error: job {job.job_id} can never start (pending, Reason={reason}); it was cancelled: change "
            f"launch.nodes / launch.slurm.* or the cluster profile",
            file=sys.stderr,
        )
        return False
    if verdict == "blocked":
        print(cannot_start(job.job_id, reason), file=sys.stderr)
        return False
    if verdict == "queued":
        print(f"  queued: job {job.job_id} is pending (Reason={reason})", file=sys.stderr)
    return True


def cannot_start(job_id: str, reason: str) -> str:
    """The report on a job left queued that waits for what will not come by itself: nodes that are down or
    drained, or (a job queued again after a limit changed) a limit it exceeds."""
    from launch.slurm.status import NEVER_STARTS

    if reason in NEVER_STARTS:
        return f"error: job {job_id} can never start: pending, Reason={reason}; scancel {job_id}, or change the limit"
    return (
        f"error: job {job_id} cannot start: pending, Reason={reason} (nodes down or drained); "
        f"scancel {job_id}, or bring the nodes back"
    )


def follow_slurm_job(job, run: RunDir, resume: str) -> int:
    """Stream rank 0 until the job ends; 0 finished, 3 stopped/cancelled with a checkpoint, 1 failed."""
    from launch.slurm.monitor import explain_failure, wait
    from launch.slurm.status import write_status
    from pipeline.train.tags import latest_complete

    try:
        outcome = wait(job)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job.job_id} keeps running (scancel {job.job_id} stops it, with a checkpoint)",
            file=sys.stderr,
        )
        return 130
    if outcome.status == "blocked":  # it was queued, then the nodes it needs went down (or a limit changed)
        print(cannot_start(job.job_id, outcome.reason), file=sys.stderr)
        return 1
    if outcome.status == "completed":
        print(f"finished: {run} (Slurm job {job.job_id})\n  summary: {run.summary}\n  MLflow: make ui", file=sys.stderr)
        return 0
    tag = latest_complete(run.checkpoints)
    where = f"its latest checkpoint is {run.checkpoints / tag}" if tag else "it has no checkpoint yet"
    if outcome.status == "failed":
        print(explain_failure(outcome, run.slurm), file=sys.stderr)
        write_status(run.slurm, state="FAILED", slurm_state=outcome.state, resume=resume)
        print(f"once fixed, {'resume' if tag else 'start'} it again ({where}): {resume}", file=sys.stderr)
        return 1
    what = {"stopped": "stopped with a checkpoint", "cancelled": "was cancelled", "timeout": "hit its time limit"}.get(
        outcome.status, f"ended {outcome.state or 'without a result'}"
    )
    write_status(
        run.slurm,
        state=outcome.state or outcome.status.upper(),
        slurm_state=outcome.state,
        resume=resume,
        message=f"job {what}; {where}",
    )
    print(f"Slurm job {job.job_id} {what} ({outcome.state}); {where}.\n  resume: {resume}", file=sys.stderr)
    if outcome.log_tail and outcome.status not in ("stopped", "cancelled"):
        print(f"--- last lines of rank 0 ---\n{outcome.log_tail}---", file=sys.stderr)
    return EXIT_RESUMABLE if tag else 1
