"""The hang watchdog's verdicts (launch/watchdog.py) on heartbeat files written by the ranks' own writer
(pipeline/train/heartbeat.py), with the clock set by the test: no test waits for time to pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.watchdog import Watch, Watchdog
from pipeline.rundir import RunDir
from pipeline.train.heartbeat import Heartbeat

HANG_TIMEOUT_S, STARTUP_GRACE_S = 60.0, 600.0
T0 = 1_800_000_000.0  # when the launcher started the ranks


class SetClock:
    """A wall clock that reads what the test set it to."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Ranks:
    """The heartbeat writers of a job's ranks, one file per rank in a run folder, all on one set clock."""

    def __init__(self, run_path: Path, world_size: int):
        self.run, self.clock = RunDir(run_path), SetClock()
        self.beats = [
            Heartbeat(
                self.run.heartbeat(rank),
                rank=rank,
                node=f"node-{rank}",
                attempt=0,
                interval_s=1.0,
                clock=self.clock,
            )
            for rank in range(world_size)
        ]
        self.run.heartbeats.mkdir(parents=True)

    def at(self, seconds: float) -> Ranks:
        self.clock.now = T0 + seconds
        return self

    def step(self, rank: int, step: int, phase: str = "training") -> None:
        """The rank reached ``step`` (or began ``phase``) now, and its writer wrote the file."""
        self.beats[rank].progress(step, phase)
        self.beats[rank].write_now()

    def beat(self, *ranks: int) -> None:
        """The writers of these ranks wrote their file now, without progress (a rank stuck inside a step)."""
        for rank in ranks:
            self.beats[rank].write_now()

    def watchdog(self, started_at: float = T0, hang_timeout_s: float = HANG_TIMEOUT_S) -> Watchdog:
        watch = Watch(self.run.heartbeats, hang_timeout_s, STARTUP_GRACE_S, beat_interval_s=1.0)
        return watch.dog(len(self.beats), started_at=started_at)


@pytest.fixture
def ranks(tmp_path) -> Ranks:
    return Ranks(tmp_path / "run", world_size=2)


def test_ranks_starting_within_the_grace_get_no_verdict(ranks):
    ranks.at(0).beat(0)  # rank 0 has started (phase "starting"); rank 1 has not written anything yet
    assert ranks.watchdog().check(now=T0 + STARTUP_GRACE_S - 1) is None


def test_a_rank_never_heard_from_past_the_grace_is_named(ranks):
    ranks.at(0).beat(0)
    ranks.at(STARTUP_GRACE_S).beat(0)
    hang = ranks.watchdog().check(now=T0 + STARTUP_GRACE_S + 1)
    assert (hang.rank, hang.node, hang.step, hang.phase, hang.answering) == (1, "?", 0, "starting", False)
    assert "rank 1 on ? made no progress" in hang.describe(STARTUP_GRACE_S)
    assert "before its first step" in hang.describe(STARTUP_GRACE_S)


def test_a_rank_without_progress_past_the_timeout_is_named_with_its_host_and_last_step(ranks):
    ranks.at(10).step(0, 7)
    ranks.step(1, 7)
    ranks.at(11).step(0, 8)  # rank 0 goes on to step 8, then waits for rank 1 in the next collective
    for second in range(12, int(10 + HANG_TIMEOUT_S) + 2):  # both keep beating: stuck, not frozen
        ranks.at(second).beat(0, 1)
    dog = ranks.watchdog()
    assert dog.check(now=T0 + 10 + HANG_TIMEOUT_S - 1) is None
    hang = dog.check(now=T0 + 10 + HANG_TIMEOUT_S + 1)
    assert (hang.rank, hang.node, hang.step, hang.phase, hang.answering) == (1, "node-1", 7, "training", True)
    said = hang.describe(HANG_TIMEOUT_S)
    assert "rank 1 on node-1 made no progress for 61 s (training at step 7; limit 60 s)" in said
    assert "still running but stuck" in said
    assert dog.last_step(1) == 7


def test_a_checkpoint_save_gets_the_startup_grace_instead_of_the_hang_timeout(ranks):
    ranks.at(10).step(0, 5, "saving")
    ranks.step(1, 5, "saving")
    dog = ranks.watchdog()
    ranks.at(10 + HANG_TIMEOUT_S + 1).beat(0, 1)
    assert dog.check(now=T0 + 10 + HANG_TIMEOUT_S + 1) is None, "a long save is not a hang"
    ranks.at(10 + STARTUP_GRACE_S).step(0, 5)  # rank 0 finished its part of the save; rank 1 still writes
    ranks.at(10 + STARTUP_GRACE_S + 1).beat(0, 1)
    hang = dog.check(now=T0 + 10 + STARTUP_GRACE_S + 1)
    assert (hang.rank, hang.step, hang.phase) == (1, 5, "saving")


def test_a_rank_that_stopped_beating_is_blamed_before_a_stuck_one_even_at_a_higher_step(ranks):
    """Rank 1 froze (SIGSTOP: no more beats) after step 4; rank 0, stuck at step 3 in a collective with it,
    still beats. The frozen rank is the cause."""
    ranks.at(10).step(0, 3)
    ranks.step(1, 4)
    ranks.at(10 + HANG_TIMEOUT_S + 5).beat(0)
    hang = ranks.watchdog().check(now=T0 + 10 + HANG_TIMEOUT_S + 5)
    assert (hang.rank, hang.step, hang.answering) == (1, 4, False)
    assert "not answering (stopped, frozen or hung in the kernel)" in hang.describe(HANG_TIMEOUT_S)


def test_among_stuck_ranks_the_lowest_step_is_blamed_then_the_longest_silence(tmp_path):
    ranks = Ranks(tmp_path / "run", world_size=3)
    ranks.at(10).step(2, 6)
    ranks.at(20).step(0, 5)
    ranks.at(30).step(1, 5)
    ranks.at(100).beat(0, 1, 2)
    dog = ranks.watchdog()
    assert dog.check(now=T0 + 100).rank == 0, "step 5 is the lowest; rank 0 has been silent longer than rank 1"
    ranks.at(100).step(0, 6)
    assert dog.check(now=T0 + 100).rank == 1


def test_the_beats_of_an_earlier_attempt_do_not_count(ranks):
    """A retry's watchdog starts at its own launch: the files the failed attempt left are not its ranks."""
    ranks.at(10).step(0, 9)
    ranks.step(1, 9)
    retry_started = T0 + 500
    dog = ranks.watchdog(started_at=retry_started)
    assert dog.check(now=retry_started + HANG_TIMEOUT_S + 1) is None, "still within the retry's start-up grace"
    assert dog.last_step(0) is None
    hang = dog.check(now=retry_started + STARTUP_GRACE_S + 1)
    assert (hang.rank, hang.phase, hang.answering) == (0, "starting", False)


def test_a_zero_hang_timeout_turns_the_watchdog_off(ranks):
    ranks.at(0).step(0, 1)
    dog = ranks.watchdog(hang_timeout_s=0)
    assert not dog.enabled and dog.check(now=T0 + 10 * STARTUP_GRACE_S) is None
