"""The start-up clock: phases between marks, counted from the command's start that the CLI exports."""

import os
import time
from pathlib import Path

from pipeline.train.startup import T0_ENV, T_SPAWN_ENV, StartupClock

ROOT = Path(__file__).resolve().parents[2]


def test_phases_are_the_time_between_marks_and_a_mark_is_kept_once():
    clock = StartupClock(t0=100.0)
    clock.marks.update({"imports": 4.0, "engine": 6.5})
    clock.mark("imports")  # already there: a second pass does not move it
    assert clock.phases() == {"imports": 4.0, "engine": 2.5}
    assert clock.since_start("engine") == 6.5 and clock.since_start("first_step") is None
    assert clock.describe("engine") == "6.5 s after the command (imports 4.0, engine 2.5)"


def test_the_clock_counts_from_the_exported_command_start(monkeypatch):
    monkeypatch.setenv(T0_ENV, "1000.5")
    assert StartupClock().t0 == 1000.5


def test_each_stage_exports_its_own_start_to_the_ranks_it_launches(monkeypatch):
    """run_stage stamps the clock (a config error returns before any launch); a second stage, as in make pipeline,
    stamps it again: a fine-tune's start-up does not include the pretraining before it."""
    from launch.stages import StageRequest, run_stage

    monkeypatch.setenv(T0_ENV, "1.0")  # a stale stamp: an earlier stage's
    before = time.time()
    assert run_stage(StageRequest("pretrain", str(ROOT / "configs/pretrain/digits_vit.yaml"), ["optim.lrr=1"])) == 2
    assert before <= float(os.environ[T0_ENV]) <= time.time()


def test_the_command_phase_ends_when_the_launcher_started_the_rank(monkeypatch):
    monkeypatch.setenv(T0_ENV, "100.0")
    monkeypatch.setenv(T_SPAWN_ENV, "103.5")
    clock = StartupClock()
    clock.mark_spawn()
    assert clock.marks == {"command": 3.5}
    monkeypatch.setenv(T_SPAWN_ENV, "99.0")  # a stale stamp from before this command: not a phase
    late = StartupClock()
    late.mark_spawn()
    assert late.marks == {}
