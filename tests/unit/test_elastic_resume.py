"""Which world-size and ZeRO-stage changes a resumed run accepts (docs/reliability.md, "Elastic resume and which
ZeRO changes are allowed"), and that the others are refused before any rank starts, saying how to resume."""

from __future__ import annotations

import pytest

from launch.stages import check_resumable
from pipeline.config import ConfigError, load_config
from pipeline.data.plan import DataError, resolve_streams
from pipeline.rundir import RunDir
from pipeline.train.checkpoint import finalize
from pipeline.train.tags import elastic_problem, needs_universal, tag_for
from tests.conftest import ROOT

DEMO = ROOT / "configs/pretrain/digits_vit.yaml"


def saved(world_size: int, zero_stage: int) -> dict:
    return {"step": 4, "world_size": world_size, "zero_stage": zero_stage}


@pytest.mark.parametrize(
    "saved_world, saved_stage, world, stage",
    [
        (2, 2, 2, 2),  # nothing changed
        (2, 3, 2, 3),
        (2, 2, 1, 2),  # ZeRO-1/2 on fewer or more ranks: universal checkpoint
        (2, 2, 4, 2),
        (4, 1, 2, 1),
        (2, 1, 4, 2),  # ... and between ZeRO-1 and 2 at once
        (2, 1, 2, 2),  # ZeRO-1 <-> 2 on the same ranks
        (2, 2, 2, 1),
        (2, 0, 1, 0),  # ZeRO-0 on any world size: the optimizer state is whole in one file
        (2, 0, 4, 0),
    ],
)
def test_allowed_changes(saved_world, saved_stage, world, stage):
    assert elastic_problem(saved(saved_world, saved_stage), world, stage) is None


@pytest.mark.parametrize(
    "saved_world, saved_stage, world, stage",
    [
        (2, 3, 1, 3),  # ZeRO-3 on another world size (its universal resume was not exact)
        (2, 3, 4, 3),
        (2, 3, 2, 2),  # ZeRO-0/3 <-> 1/2, even on the same ranks
        (2, 2, 2, 3),
        (2, 0, 2, 1),
        (2, 1, 2, 0),
        (2, 0, 4, 2),
    ],
)
def test_refused_changes_say_what_was_saved_and_how_to_resume(saved_world, saved_stage, world, stage):
    problem = elastic_problem(saved(saved_world, saved_stage), world, stage)
    assert problem.startswith(
        f"the checkpoint was written by {saved_world} rank(s) at ZeRO-{saved_stage}; resuming it on {world} "
        f"rank(s) at ZeRO-{stage} is not supported (another world size needs ZeRO-1 or 2 on both sides"
    )
    assert problem.endswith(f"Resume on {saved_world} rank(s) with deepspeed.zero_stage={saved_stage}")


def test_only_another_world_size_at_zero_1_or_2_goes_through_a_universal_checkpoint():
    assert needs_universal(saved(2, 2), 1) and needs_universal(saved(2, 1), 4)
    assert not needs_universal(saved(2, 2), 2), "same ranks: a plain load"
    assert not needs_universal(saved(2, 1), 2), "ZeRO-1 <-> 2 on the same ranks: one partitioning, a plain load"
    assert not needs_universal(saved(2, 0), 4), "ZeRO-0: whole optimizer state, a plain load"


def test_a_checkpoint_without_meta_is_taken_as_made_by_this_world():
    assert elastic_problem({}, 4, 3) is None and not needs_universal({}, 4)


def _run_with_checkpoint(tmp_path, world_size: int, zero_stage: int) -> RunDir:
    """A run folder whose latest complete checkpoint was finalized as the trainer's rank 0 does it."""
    run = RunDir(tmp_path / "pretrain-vit-1")
    (run.checkpoints / tag_for(4)).mkdir(parents=True)
    finalize(run.checkpoints, tag_for(4), saved(world_size, zero_stage), keep_last=2)
    return run


@pytest.mark.parametrize(
    "overrides",
    [
        ["launch.nproc=1"],
        ["launch.nproc=4"],
        ["deepspeed.zero_stage=1", "launch.nproc=4"],
        ["launch.cluster=slurm", "launch.nodes=2", "launch.gpus_per_node=4"],  # 8 Slurm tasks
        ["launch.cluster=slurm", "launch.nodes=1", "launch.gpus_per_node=1"],
    ],
)
def test_the_cli_accepts_another_rank_count_at_zero_2(tmp_path, overrides):
    run = _run_with_checkpoint(tmp_path, world_size=2, zero_stage=2)
    stage = [] if any(o.startswith("deepspeed.zero_stage=") for o in overrides) else ["deepspeed.zero_stage=2"]
    check_resumable(run, load_config(DEMO, [*stage, *overrides]))


def test_the_cli_refuses_another_gpus_per_node_for_a_zero_3_run_naming_the_fix(tmp_path):
    run = _run_with_checkpoint(tmp_path, world_size=2, zero_stage=3)
    slurm = ["deepspeed.zero_stage=3", "launch.cluster=slurm", "launch.nodes=1"]
    check_resumable(run, load_config(DEMO, [*slurm, "launch.gpus_per_node=2"]))  # the same 2 ranks
    with pytest.raises(ConfigError) as refused:
        check_resumable(run, load_config(DEMO, [*slurm, "launch.gpus_per_node=4"]))
    said = str(refused.value)
    assert said.startswith("run.name=pretrain-vit-1 cannot resume from step00000004: the checkpoint was written")
    assert "on 4 rank(s) at ZeRO-3 is not supported" in said
    assert said.endswith("Resume on 2 rank(s) with deepspeed.zero_stage=3")


def test_the_canonical_streams_do_not_depend_on_the_world_size():
    """8 shards, global batch 32: 8 streams whether the run has 1, 2, 4 or 8 ranks, so it resumes on any of them."""
    assert {resolve_streams(None, shards=8, batch_size=32, world=w, resampled=False) for w in (1, 2, 4, 8)} == {8}


def test_a_world_size_that_does_not_divide_the_streams_is_refused_with_a_hint():
    with pytest.raises(DataError, match=r"data.streams=8 cannot be split evenly over 3 ranks.*multiple of the 3"):
        resolve_streams(8, shards=8, batch_size=48, world=3, resampled=False)
