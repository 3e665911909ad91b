"""``make pipeline``: pretrain, then fine-tune from that run, under one parent MLflow run.

Locally the stages run one after the other; on Slurm as two jobs submitted at once, the fine-tune with
``afterok`` on the pretraining job (its weights are converted in that job when it starts). Both configs are
checked before anything runs or is submitted. The parent run (``<run.root>/pipeline-<pretrain run>/``) nests
both stages; the fine-tune, the last stage, marks it FINISHED; a stage that fails marks it FAILED here.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from launch.stages import (
    EXIT_USAGE,
    StageRequest,
    fail,
    follow_slurm_job,
    open_run,
    prepare,
    run_local_stage,
    run_stage,
    submit_stage,
)
from pipeline.config import Config, ConfigError
from pipeline.data.plan import DataError
from pipeline.rundir import RunDir, RunsRoot


def run_pipeline(pretrain_config: str, finetune_config: str, overrides: list[str]) -> int:
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.name=")), None)
    shared = [o for o in overrides if not o.startswith("run.name=")]
    pre = StageRequest("pretrain", pretrain_config, shared + ([f"run.name={name}-pretrain"] if name else []))
    fine = StageRequest("finetune", finetune_config, shared + ([f"run.name={name}-finetune"] if name else []))
    again = (
        f"make pipeline PRETRAIN_CONFIG={shlex.quote(pretrain_config)} FINETUNE_CONFIG="
        f"{shlex.quote(finetune_config)} ARGS={shlex.quote(' '.join(overrides))}"
    )
    try:
        config, family = prepare(pre)
        fconfig, _ = prepare(fine, resolve_weights=False)
        if config.launch.cluster != fconfig.launch.cluster:
            raise ConfigError(
                f"{finetune_config} runs launch.cluster={fconfig.launch.cluster} and {pretrain_config} "
                f"launch.cluster={config.launch.cluster}; the pipeline runs both stages in one place"
            )
        run, _, blocked = open_run(config, family)
    except (ConfigError, DataError) as exc:
        return fail(str(exc))
    if blocked and blocked != "complete":
        return fail(blocked)
    fine.pretrained = fconfig.finetune.pretrained = str(run.path.resolve())
    parent = _parent_run(config, run)
    for stage_config in (config, fconfig):
        stage_config.tracking.parent_run_id = parent.run_id
    if blocked != "complete":
        run.write_config(config)  # now nested under the parent (tracking keys may change on resume)
    try:
        if config.launch.cluster == "slurm":
            return _on_slurm(config, run, fconfig, fine, again, done=blocked == "complete")
        code = 0 if blocked == "complete" else run_local_stage(config, run)
        if code == 0:
            code = run_stage(StageRequest("finetune", finetune_config, fine.overrides + _nest(parent), fine.pretrained))
        if code not in (0, 3):
            parent.finish("FAILED")
        return code
    finally:
        parent.close(wait_s=10.0)


def _nest(parent) -> list[str]:
    return [f"tracking.parent_run_id={parent.run_id}"] if parent.run_id else []


def _parent_run(config: Config, run: RunDir):
    """The pipeline's MLflow run, kept in its own folder beside the stages (resumed with the pretraining run)."""
    from pipeline.tracking.tracker import pipeline_run

    parent = pipeline_run(config, RunsRoot(config.run.root).path / f"pipeline-{run.name}")
    parent.wait_for_run_id(30.0)  # None while the store is unreachable: the stages then are not nested
    return parent


def _on_slurm(config: Config, run: RunDir, fconfig: Config, fine: StageRequest, again: str, done: bool) -> int:
    from launch.slurm.params import SubmitError

    job = None
    try:
        if not done:
            job = submit_stage(config, run, again)
        frun, _, blocked = open_run(fconfig, _family(fine))
    except (SubmitError, ConfigError) as exc:
        return fail(str(exc))
    if blocked:
        print(f"{frun}: {'already complete' if blocked == 'complete' else blocked}", file=sys.stderr)
        return 0 if blocked == "complete" else EXIT_USAGE
    try:
        fjob = submit_stage(fconfig, frun, again, dependency=f"afterok:{job.job_id}" if job else None)
    except SubmitError as exc:
        return fail(str(exc))
    if job:
        print(f"  the fine-tune job {fjob.job_id} starts after job {job.job_id} succeeds", file=sys.stderr)
    if not config.launch.wait:
        print("  (returns now; add launch.wait=true to follow both jobs)", file=sys.stderr)
        return 0
    if job is not None:
        code = follow_slurm_job(job, run, again)
        if code:
            print(f"the fine-tune job {fjob.job_id} will not start (its dependency failed)", file=sys.stderr)
            return code
    return follow_slurm_job(fjob, frun, again)


def _family(request: StageRequest) -> str:
    return Path(request.config_path).stem
