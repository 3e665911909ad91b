"""The fault suite: real processes, real signals, real checkpoints (docs/reliability.md has the measured times).

Each test starts the CLI as a user would (`python -m pipeline pretrain ...`, 2 local ranks unless said), waits
for observable progress (the ranks' heartbeat files), injects the fault from outside and asserts the outcome:
nothing hangs, the right rank is named, the run resumes where it should, one MLflow run, no lost samples.
The Slurm faults (a killed rank of a 2-node job, a hung one) are in tests/slurm/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.rundir import RunDir
from tests.conftest import ROOT, run_cli
from tests.conftest import fault_report as report

pytestmark = pytest.mark.slow


def overrides(shards: Path, root: Path, name: str, steps: int, *extra: str) -> list[str]:
    """A tiny ViT on digits, 2 ranks, batch 32, ``steps`` optimizer steps, no stochastic layers or mixup (so a
    resumed run must reproduce the uninterrupted losses), a heartbeat every second; ``extra`` overrides these."""
    base = [f"data.train_shards={shards}/train-{{000000..000007}}.tar", f"data.val_shards={shards}/val-000000.tar",
            "data.batch_size=32", "data.num_workers=1", "data.shuffle_buffer=64", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "augment.label_smoothing=0", f"optim.epochs={steps * 32 / 1497}",
            "optim.warmup_epochs=0.02", "deepspeed.zero_stage=2", "deepspeed.precision=fp32", "launch.nproc=2",
            "launch.heartbeat_s=1", "launch.startup_grace_s=600", "eval.every_steps=0", "tracking.log_every_steps=1",
            f"run.root={root}", f"run.name={name}"]  # fmt: skip
    given = {item.split("=", 1)[0] for item in extra}  # each key once: the CLI refuses a key given twice
    return [item for item in base if item.split("=", 1)[0] not in given] + list(extra)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 train shards (one per canonical stream of the 2- and 4-rank runs) and a val shard."""
    from pipeline.data.sources import write_digits

    out = tmp_path_factory.mktemp("digits8")
    write_digits(out, samples_per_shard=200)
    return out


EPOCH_SHARDS, EPOCH_SHARD_SAMPLES = 8, 32  # one shard per canonical stream; at batch 32, an epoch is 8 steps


@pytest.fixture(scope="module")
def epoch_shards(tmp_path_factory) -> Path:
    """Train shards of 32 samples: the first 8 (``overrides`` takes those) are an epoch of 8 steps at batch 32, one
    shard per canonical stream."""
    from pipeline.data.sources import write_digits

    out = tmp_path_factory.mktemp("digits32")
    write_digits(out, samples_per_shard=EPOCH_SHARD_SAMPLES)
    return out


class Job:
    """The CLI in a fresh process, its output in a file, the ranks found through their heartbeats."""

    def __init__(self, args: list[str], root: Path, name: str, env: dict | None = None):
        self.run = RunDir(root / name)
        self.log = root / f"{name}-{len(list(root.glob(name + '-*.log')))}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "pretrain", *args],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def beat(self, rank: int) -> dict:
        try:
            return json.loads(self.run.heartbeat(rank).read_text())
        except (OSError, ValueError):
            return {}

    def wait_for_step(self, rank: int, step: int, timeout_s: float = 900) -> dict:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            beat = self.beat(rank)
            if beat.get("step", 0) >= step and beat.get("phase") == "training":
                return beat
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the run ended ({self.proc.returncode}) before rank {rank} reached step {step}:\n"
                    f"{self.output()[-3000:]}"
                )
            time.sleep(0.2)
        pytest.fail(f"rank {rank} did not reach step {step} in {timeout_s:.0f} s:\n{self.output()[-3000:]}")

    def wait(self, timeout_s: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the CLI did not return in {timeout_s:.0f} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in run.read_train_log()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _seconds_until(job: Job, since: float, happened, timeout_s: float = 900) -> float:
    """For the report only (never asserted): seconds from ``since`` until ``happened()`` while the job runs,
    polled every 0.1 s; -1 when the job ended first."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and job.proc.poll() is None:
        if happened():
            return round(time.monotonic() - since, 1)
        time.sleep(0.1)
    return -1.0


def _retry_trained_a_step(job: Job) -> bool:
    """Rank 0 of the retry (attempt 1) has trained a step past its checkpoint (as its heartbeat says; the heartbeat
    interval is the resolution)."""
    beat = job.beat(0)
    return beat.get("attempt", 0) >= 1 and beat.get("step", 0) > 0 and beat.get("phase") != "starting"


# ----------------------------------------------------------------------------------------------------


def test_a_stopped_rank_ends_the_job_naming_it_and_the_checkpoint_stays_usable(shards, tmp_path):
    """SIGSTOP of rank 1: the collective never returns (gloo's timeout does not fire on CPU); the watchdog ends
    the job after launch.hang_timeout_s, names rank 1 as not answering, and the last complete checkpoint is whole."""
    job = Job(
        overrides(
            shards,
            tmp_path,
            "stopped",
            400,
            "checkpoint.every_steps=2",
            "launch.hang_timeout_s=15",
            "tracking.enabled=false",
        ),
        tmp_path,
        "stopped",
    )
    beat = job.wait_for_step(1, 4)
    os.kill(beat["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        code = job.wait(timeout_s=300)
    finally:
        if _alive(beat["pid"]):
            os.kill(beat["pid"], signal.SIGKILL)
    ended_after = time.monotonic() - stopped_at
    out = job.output()
    assert code != 0, out[-3000:]
    assert "hang watchdog: rank 1 on" in out and "not answering" in out, out[-3000:]
    assert "Current thread" in out or "Thread 0x" in out, "rank 0's Python stacks were dumped"
    assert not _alive(beat["pid"]), "the hung rank was ended too"
    from pipeline.train.checkpoint import MARKER, latest_complete

    tag = latest_complete(job.run.checkpoints)
    assert tag is not None and (job.run.checkpoints / tag / MARKER).exists()
    assert int(tag.removeprefix("step")) >= 2
    report("sigstop_of_a_rank", hang_timeout_s=15, job_ended_after_s=round(ended_after, 1))


def test_a_killed_rank_is_named_and_the_run_is_retried_to_its_end(shards, tmp_path):
    """SIGKILL of rank 1 (what the OOM killer does): the launcher names rank 1 and the signal ahead of rank 0's
    lost-peer error, then (launch.max_failures=1) restarts from the latest checkpoint: same run folder, same MLflow
    run, the uninterrupted run's step count, the failure and its cause logged."""
    steps = 12
    job = Job(
        overrides(shards, tmp_path, "killed", steps, "checkpoint.every_steps=3", "launch.max_failures=1"),
        tmp_path,
        "killed",
    )
    beat = job.wait_for_step(1, 5)
    os.kill(beat["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    named_after = _seconds_until(job, killed_at, lambda: "was killed by SIGKILL" in job.output())
    retried_after = _seconds_until(job, killed_at, lambda: _retry_trained_a_step(job))
    code = job.wait()
    ended_after = time.monotonic() - killed_at
    out = job.output()
    assert code == 0, out[-4000:]
    first = out.index("rank 1 of 2 on")
    assert "was killed by SIGKILL (most often the out-of-memory killer" in out[first : first + 200]
    if "rank 0 (after rank 1)" in out:  # the rank that lost its peer, when it failed before it was stopped
        assert out.index("rank 0 (after rank 1)") > first
    assert "retrying from the latest checkpoint" in out
    failures = job.run.read_failures()
    assert len(failures) == 1 and failures[0]["rank"] == 1 and "SIGKILL" in failures[0]["cause"]
    assert job.run.read_summary()["step"] == steps and sorted(losses(job.run)) == list(range(1, steps + 1))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["run_state"] == "finished"
    assert "SIGKILL" in run.data.tags["failure.1"] and run.data.tags["failures"] == "1"
    report(
        "sigkill_of_a_rank",
        named_after_s=named_after,
        retry_first_step_after_s=retried_after,
        run_ended_after_s=round(ended_after, 1),
    )


def test_the_same_error_at_the_same_step_twice_is_not_retried(shards, tmp_path):
    """A deterministic bug (the test hook raises on rank 1 at step 3, every attempt): one retry, then it stops."""
    result = run_cli(
        "pretrain",
        *overrides(
            shards, tmp_path, "bug", 8, "checkpoint.every_steps=2", "launch.max_failures=3", "tracking.enabled=false"
        ),
        cwd=ROOT,
        env={"VITPIPE_FAULT": "rank=1,step=3,action=raise"},
    )
    assert result.returncode not in (0, 3), result.stderr[-3000:]
    assert "not retried: the same error at the same step (3) twice" in result.stderr, result.stderr[-3000:]
    failures = RunDir(tmp_path / "bug").read_failures()
    assert [f["step"] for f in failures] == [3, 3] and all("injected failure" in f["cause"] for f in failures)
    first, second = (time.mktime(time.strptime(f["time"], "%Y-%m-%d %H:%M:%S")) for f in failures)
    report("same_error_twice", retry_back_at_the_step_after_s=second - first, resolution_s=1)


def _the_mlflow_run(tmp_path: Path):
    """The one MLflow run of the test's store (the runs' default sqlite store under run.root)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def _mlflow_state(run) -> tuple[str, str, str]:
    return run.info.status, run.data.tags.get("run_state", ""), run.data.tags.get("stopped_reason", "")


def _stop_the_launcher(job: Job, sig: signal.Signals) -> tuple[int, float]:
    """``sig`` to the launcher's pid alone (the ranks have process groups of their own): every rank must stop
    with a checkpoint, exit 3. Returns the step it stopped at and the seconds from the signal to the exit."""
    from pipeline.train.checkpoint import latest_complete, tag_for

    os.kill(job.proc.pid, sig)
    sent = time.monotonic()
    code = job.wait()
    exited_after = time.monotonic() - sent
    out = job.output()
    assert code == 3, out[-3000:]
    step = int(out.split("stopped at step ")[-1].split("/")[0])
    assert latest_complete(job.run.checkpoints) == tag_for(step), "every rank saved at the step it stopped at"
    return step, exited_after


def _wait_until_mlflow_says_running(client, run_id: str, job: Job, timeout_s: float = 300) -> None:
    """Polls the store while ``job`` is held inside a step (so the run cannot move on to another state first)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and job.proc.poll() is None:
        if _mlflow_state(client.get_run(run_id))[:2] == ("RUNNING", "running"):
            return
        time.sleep(0.2)
    state = _mlflow_state(client.get_run(run_id))
    pytest.fail(f"MLflow still says {state} for the resumed run:\n{job.output()[-3000:]}")


def test_sigint_and_sigterm_to_the_launcher_alone_stop_the_run_and_mlflow_follows_each_state(shards, tmp_path):
    """`kill -INT`, later `kill -TERM`, of the launcher only (a supervisor's stop): each time every rank stops
    at its next step with a checkpoint, exit 3, and MLflow says KILLED / run_state=stopped; each resumed attempt
    makes the same MLflow run RUNNING / run_state=running again (seen while the test hook holds rank 1 inside a
    step, so no timing decides it); the last one ends FINISHED with every step, in one MLflow run."""
    steps = 400  # enough that the first attempt cannot end before the signal lands
    args = overrides(shards, tmp_path, "int", steps, "checkpoint.every_steps=0")
    first = Job(args, tmp_path, "int")
    first.wait_for_step(0, 3)
    on_sigint, sigint_exit_s = _stop_the_launcher(first, signal.SIGINT)
    client, run = _the_mlflow_run(tmp_path)
    status, run_state, reason = _mlflow_state(run)
    assert (status, run_state) == ("KILLED", "stopped") and "SIGINT" in reason

    hold = on_sigint + 2  # a step the resumed attempt trains through; rank 1 waits there for a stop signal
    second = Job(args, tmp_path, "int", env={"VITPIPE_FAULT": f"rank=1,step={hold},action=hang"})
    started = time.monotonic()
    second.wait_for_step(0, on_sigint + 1)
    first_step_s = time.monotonic() - started
    second.wait_for_step(1, hold)
    _wait_until_mlflow_says_running(client, run.info.run_id, second)
    running_s = time.monotonic() - started
    on_sigterm, sigterm_exit_s = _stop_the_launcher(second, signal.SIGTERM)
    assert on_sigterm == hold
    status, run_state, reason = _mlflow_state(client.get_run(run.info.run_id))
    assert (status, run_state) == ("KILLED", "stopped") and "SIGTERM" in reason

    last = Job(args, tmp_path, "int")
    assert last.wait() == 0, last.output()[-3000:]
    final = client.get_run(run.info.run_id)
    assert _mlflow_state(final)[:2] == ("FINISHED", "finished")
    assert final.data.tags["restarts"] == "2", "the same MLflow run continued twice"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    done = last.run.read_summary()["step"]
    assert sorted(losses(last.run)) == list(range(1, done + 1)), "no step lost or repeated over the three attempts"
    report(
        "sigint_sigterm_to_the_launcher",
        sigint_to_exit_s=round(sigint_exit_s, 1),
        sigterm_to_exit_s=round(sigterm_exit_s, 1),
        resume_to_first_new_step_s=round(first_step_s, 1),
        resume_to_mlflow_running_s=round(running_s, 1),
    )


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background-write"])
def test_a_rank_killed_while_writing_a_checkpoint_falls_back_to_the_previous_one(shards, tmp_path, background):
    """Rank 0 frozen, then killed, in the middle of a checkpoint save (caught by its heartbeat saying 'saving',
    or with checkpoint.background_write naming the checkpoint its writer thread is writing, while the tag has no
    COMPLETE marker yet): the retry resumes from the previous complete checkpoint, never the half-written one,
    and the run ends with every step."""
    from pipeline.train.checkpoint import MARKER

    steps = 40
    job = Job(
        overrides(
            shards,
            tmp_path,
            "midsave",
            steps,
            "checkpoint.every_steps=1",
            f"checkpoint.background_write={str(background).lower()}",
            "launch.max_failures=1",
            "launch.heartbeat_s=0.05",
            "model.embed_dim=192",
            "model.depth=4",
            "model.num_heads=3",
            "tracking.enabled=false",
        ),
        tmp_path,
        "midsave",
    )
    caught = None
    while caught is None and job.proc.poll() is None:
        beat = job.beat(0)
        writing = beat.get("writing") if background else beat.get("phase") == "saving" and f"step{beat['step']:08d}"
        if writing and writing != "step00000001":  # from step 2 on, a complete checkpoint precedes it
            os.kill(beat["pid"], signal.SIGSTOP)
            if not (job.run.checkpoints / writing / MARKER).exists():
                caught = int(writing.removeprefix("step"))
                os.kill(beat["pid"], signal.SIGKILL)
            else:  # it had finished already: let it go on to the next save
                os.kill(beat["pid"], signal.SIGCONT)
        time.sleep(0.01)
    assert caught is not None, job.output()[-3000:]
    killed_at = time.monotonic()
    named_after = _seconds_until(job, killed_at, lambda: "retrying from the latest checkpoint" in job.output())
    retried_after = _seconds_until(job, killed_at, lambda: _retry_trained_a_step(job))
    assert job.wait() == 0, job.output()[-4000:]
    report(
        f"kill_during_checkpoint_write_{'background' if background else 'sync'}",
        named_after_s=named_after,
        retry_first_step_after_s=retried_after,
    )
    out = job.output()
    assert f"resumed from step{caught - 1:08d}" in out, out[-3000:]
    total = int(re.search(r"step \d+/(\d+) ", out).group(1))  # about ``steps``: epochs round to whole steps
    assert abs(total - steps) <= 1 and job.run.read_summary()["step"] == total


def _keys_per_step(run: RunDir) -> dict[int, list[str]]:
    """step -> the sorted sample keys of its global batch (the last attempt's record wins)."""
    records: dict[tuple[int, int, int], list[str]] = {}
    for path in sorted((run.path / "keys").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(record["step"], rank, record["micro"])] = record["keys"]
    steps: dict[int, list[str]] = defaultdict(list)
    for (step, _rank, _micro), keys in records.items():
        steps[step] += keys
    return {step: sorted(keys) for step, keys in steps.items()}


def _shard_keys(shards: Path) -> list[str]:
    """The sample keys of the first EPOCH_SHARDS train shards, as webdataset names them (the file name up to its
    first dot)."""
    import tarfile

    keys = set()
    for index in range(EPOCH_SHARDS):
        with tarfile.open(shards / f"train-{index:06d}.tar") as tar:
            keys |= {Path(name).name.split(".")[0] for name in tar.getnames()}
    return sorted(keys)


def _epoch_keys(keys_per_step: dict[int, list[str]], steps: int) -> list[str]:
    return sorted(key for step in range(steps) for key in keys_per_step[step])


def test_a_run_resumes_on_another_world_size_with_the_same_losses_and_samples(epoch_shards, tmp_path):
    """Stopped on 2 ranks (ZeRO-2) at step 4, the middle of its one epoch, resumed on 1 and on 4: DeepSpeed's
    universal checkpoint re-partitions model and optimizer, the canonical streams give every step the same
    samples, so the next losses match the uninterrupted 2-rank run's, each global batch holds the same sample
    keys, and the whole epoch holds the uninterrupted epoch's samples, each as often (none lost or repeated).
    (Not each shard sample exactly once: a stream's shuffle buffer reads on into its next pass over the shards,
    here 64 samples of a 32-sample stream, so an epoch repeats some samples and leaves others for later.)"""
    steps, stop = 8, 4  # one epoch (EPOCH_SHARDS x EPOCH_SHARD_SAMPLES samples at batch 32)
    common = ["checkpoint.every_steps=0", "data.record_keys=true", "tracking.enabled=false", "optim.epochs=1"]
    _ok(run_cli("pretrain", *overrides(epoch_shards, tmp_path, "ref", steps, *common), cwd=ROOT))
    stopped = run_cli(
        "pretrain", *overrides(epoch_shards, tmp_path, "elastic", steps, *common, f"run.stop_at_step={stop}"), cwd=ROOT
    )
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    shutil.copytree(tmp_path / "elastic", tmp_path / "elastic4")
    reference, ref_keys = losses(RunDir(tmp_path / "ref")), _keys_per_step(RunDir(tmp_path / "ref"))
    assert max(reference) == steps and set(_epoch_keys(ref_keys, steps)) <= set(_shard_keys(epoch_shards))
    for name, ranks in (("elastic", 1), ("elastic4", 4)):
        started = time.monotonic()
        result = run_cli(
            "pretrain", *overrides(epoch_shards, tmp_path, name, steps, *common, f"launch.nproc={ranks}"), cwd=ROOT
        )
        _ok(result)
        assert "converting it to a universal checkpoint" in result.stderr
        run = RunDir(tmp_path / name)
        resumed = losses(run)
        for step in range(stop + 1, steps + 1):
            assert resumed[step] == pytest.approx(reference[step], rel=1e-4), (ranks, step)
        keys = _keys_per_step(run)
        assert all(keys[step] == ref_keys[step] for step in range(steps)), f"{ranks} ranks: other samples"
        assert _epoch_keys(keys, steps) == _epoch_keys(ref_keys, steps), f"{ranks} ranks: a sample lost or repeated"
        assert run.read_summary()["world_size"] == ranks
        converted = re.search(r"converted in ([\d.]+) s", result.stderr)
        report(
            f"world_size_2_to_{ranks}",
            resume_wall_s=round(time.monotonic() - started, 1),
            command_to_first_step_s=json.loads(run.startup.read_text()).get("to_first_step"),
            universal_conversion_s=float(converted.group(1)) if converted else None,
        )


def test_resuming_a_zero3_run_on_another_world_size_is_refused_clearly(shards, tmp_path):
    stopped = run_cli(
        "pretrain",
        *overrides(
            shards,
            tmp_path,
            "z3",
            6,
            "deepspeed.zero_stage=3",
            "run.stop_at_step=2",
            "checkpoint.every_steps=0",
            "tracking.enabled=false",
        ),
        cwd=ROOT,
    )
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    again = run_cli(
        "pretrain",
        *overrides(
            shards,
            tmp_path,
            "z3",
            6,
            "deepspeed.zero_stage=3",
            "launch.nproc=1",
            "checkpoint.every_steps=0",
            "tracking.enabled=false",
        ),
        cwd=ROOT,
    )
    assert again.returncode == 2, again.stderr[-3000:]  # refused before any rank starts
    last = again.stderr.strip().splitlines()[-1]
    assert "is not supported (another world size needs ZeRO-1 or 2 on both sides" in last
    assert "Resume on 2 rank(s)" in last


def _ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
