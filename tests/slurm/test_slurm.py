"""Slurm launching: the submitit parameters a config makes (no cluster), and real 2-node CPU DeepSpeed jobs
on the project's test cluster (tests/slurm/cluster.sh): completion, requeue after preemption and after a
real time limit with exact resumption, scancel, and a failing rank.

The cluster tests skip with a loud reason when the cluster is not there, and fail instead when
REQUIRE_SLURM_TESTS=1 (CI). Jobs are stopped at chosen points with the trainer's VITPIPE_FAULT test hook
("hang": rank 0 holds at a step until a signal arrives), so no test depends on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

TOTAL_STEPS = 8
HANG_AT = 4  # the preempted / timed-out / cancelled runs hold here (checkpoint at step 3 already written)
PROFILE = "configs/cluster/local_test.yaml"
REPORT = os.environ.get("FAULT_REPORT")  # a JSON file the measured detection/recovery times are added to


def record_figures(name: str, **figures) -> None:
    """Add one test's measured times to FAULT_REPORT (docs/reliability.md); reported, never asserted."""
    if REPORT:
        path = Path(REPORT)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = {**figures, "load_1min": round(os.getloadavg()[0], 1)}
        path.write_text(json.dumps(data, indent=2))


def overrides(shards: Path, root: Path, name: str, *extra: str) -> list[str]:
    """A tiny ViT on digits, ZeRO-2 fp32, 8 steps, checkpoint every 3, loss logged every step; 2 nodes x 1 task;
    ``extra`` overrides these."""
    base = [
        f"data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={shards}/val-000000.tar",
        "data.batch_size=32",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "model.drop_path_rate=0.1",
        "augment.mixup=0.2",
        f"optim.epochs={TOTAL_STEPS * 32 / 1497}",
        "optim.warmup_epochs=0.05",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=fp32",
        "checkpoint.every_steps=3",
        "eval.every_steps=0",
        "tracking.log_every_steps=1",
        "launch.cluster=slurm",
        "launch.nodes=2",
        f"launch.slurm_profile={PROFILE}",
        "launch.slurm.cpus_per_task=1",
        "launch.wait=true",
        f"run.root={root}",
        f"run.name={name}",
    ]
    given = {item.split("=", 1)[0] for item in extra}  # each key once: the CLI refuses a key given twice
    return [item for item in base if item.split("=", 1)[0] not in given] + list(extra)


# ----------------------------------------------------------------------------------------------------
# Without a cluster


def test_executor_parameters_follow_the_config_and_profile(tmp_path, monkeypatch):
    """4 nodes x 8 GPUs from the example profile: what submitit gets, and the sbatch script it writes."""
    from launch.slurm.params import executor_parameters, make_executor
    from pipeline.config import load_config

    config = load_config(
        "configs/pretrain/digits_vit.yaml",
        [
            "launch.cluster=slurm",
            "launch.nodes=4",
            "launch.gpus_per_node=8",
            "data.batch_size=256",
            "launch.slurm_profile=configs/cluster/example.yaml",
            "launch.slurm.time_min=90",
        ],
    )
    params = executor_parameters(config.launch, name="pretrain-x", dependency="afterok:123")
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["timeout_min"] == 90  # an explicit override wins over the profile's 1440
    assert params["cpus_per_task"] == 12 and params["mem_gb"] == 480
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "my-project"
    assert params["slurm_signal_delay_s"] == 300 and params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    assert params["slurm_setup"][0].startswith("module load")
    extra = params["slurm_additional_parameters"]
    assert extra["dependency"] == "afterok:123" and extra["exclusive"] is True and extra["requeue"] is True

    # submitit only checks that srun exists when it is constructed: a placeholder lets it render the script here
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    executor = make_executor(tmp_path / "slurm", config.launch, name="pretrain-x", dependency="afterok:123")
    assert executor._executor.max_num_timeout == 10  # max_requeues
    script = executor._executor._make_submission_file_text("CMD", "uid")
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my-project",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint=a100-80gb",
        "#SBATCH --mem=480GB",
        "#SBATCH --dependency=afterok:123",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=FAIL",
        "#SBATCH --requeue",
        "module load cuda/12.4 nccl/2.21",
    ]:
        assert line in script, line
    assert "--kill-on-bad-exit=1" in script
    assert executor._executor.python.strip("'") == sys.executable  # the job runs this (the .venv) interpreter


def test_task_environment_from_the_job_environment(monkeypatch):
    """What each task hands its rank: torch.distributed's variables (submitit's TorchDistributedEnvironment on
    Slurm's variables) plus the neutral node name, job id and attempt that the trainer reads instead of SLURM_*."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    from launch.slurm.task import master_port, task_environment

    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_RESTART_COUNT": "2",
        "SLURMD_NODENAME": "gpu08",
        "SUBMITIT_EXECUTOR": "slurm",  # what submitit sets in every task it starts
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = task_environment(SlurmJobEnvironment(), attempt=2)
    assert env == {
        "RANK": "11",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(master_port("4242", 2)),
        "VITPIPE_NODE": "gpu08",
        "VITPIPE_JOB_ID": "4242",
        "VITPIPE_ATTEMPT": "2",
    }
    assert master_port("4242", 2) != master_port("4242", 3)  # a requeued attempt does not reuse the port


@pytest.mark.parametrize(
    "bad, needle",
    [
        (["launch.slurm.time_min=2", "launch.slurm.signal_delay_s=120"], "launch.slurm.signal_delay_s=120"),
        (["launch.slurm.extra_sbatch={time: 5}"], "launch.slurm.extra_sbatch: time"),
        (["launch.slurm.cpus_per_task=0"], "launch.slurm.cpus_per_task=0"),
    ],
)
def test_a_broken_slurm_config_is_refused_before_anything_is_submitted(tmp_path, bad, needle):
    result = run_cli("pretrain", "launch.cluster=slurm", f"run.root={tmp_path}", "run.name=x", *bad, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and result.stderr.count("error:") == 1
    assert not (tmp_path / "x").exists()


def shard_overrides(shards: Path) -> list[str]:
    """The tests' own shards: a fresh clone has no data/digits until `make shards` runs."""
    return [f"data.train_shards={shards}/train-{{000000..000003}}.tar", f"data.val_shards={shards}/val-000000.tar"]


def submit_args(shards: Path, root: Path, name: str, *extra: str) -> list[str]:
    """A ``pretrain`` on the test cluster's profile with one CPU per task, for the tests of what is refused or
    reported around submitting (none of them trains)."""
    return [
        "pretrain",
        "launch.cluster=slurm",
        f"launch.slurm_profile={PROFILE}",
        "launch.slurm.cpus_per_task=1",
        *shard_overrides(shards),
        *extra,
        f"run.root={root}",
        f"run.name={name}",
    ]


def test_auto_runs_locally_where_there_is_no_sbatch(tmp_path, digits_shards):
    bin_dir = Path(sys.executable).parent  # python only; no Slurm client on this PATH
    result = run_cli(
        "pretrain",
        "launch.cluster=auto",
        "--print-config",
        *shard_overrides(digits_shards),
        cwd=ROOT,
        env={"PATH": str(bin_dir)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cluster: local" in result.stdout


# ----------------------------------------------------------------------------------------------------
# On the test cluster


def cluster_problem() -> str | None:
    """Why the test cluster cannot be used here, or None."""
    if os.geteuid() != 0:
        return "not running as root (the test cluster's daemons run as root)"
    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        return f"SLURM_CONF={conf!r} is not an existing slurm.conf"
    if not shutil.which("sinfo"):
        return "sinfo is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if out.returncode:
        return f"sinfo failed: {out.stderr.strip()[:300]}"
    nodes = dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())
    if not {"node1", "node2"} <= set(nodes):
        return f"sinfo lists {nodes or 'no nodes'}, not node1/node2 of tests/slurm/cluster.sh"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        message = (
            f"the Slurm tests need the test cluster: {problem}. Start it with: bash tests/slurm/cluster.sh "
            'install && bash tests/slurm/cluster.sh start && eval "$(bash tests/slurm/cluster.sh env)"'
        )
        if os.environ.get("REQUIRE_SLURM_TESTS") == "1":
            pytest.fail(f"REQUIRE_SLURM_TESTS=1 and {message}", pytrace=False)
        pytest.skip(f"!!! SLURM TESTS SKIPPED !!! {message}")


def wait_until(predicate, what: str, timeout_s: float = 600.0, every_s: float = 0.5):
    """Poll until predicate() is truthy; a deadlock guard, not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting ({timeout_s:.0f} s) for {what}")
        time.sleep(every_s)


class Cli:
    """``python -m pipeline <command> ...`` as a user runs it, in the background; output to a file."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict | None = None):
        self.log = tmp / f"{name}.cli.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
            )

    def finish(self, timeout_s: float = 900) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the CLI did not return; its output:\n{self.output()[-4000:]}") from None
        return code, self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Run:
    """One run folder (its own runs root and MLflow store) and its Slurm job."""

    def __init__(
        self,
        tmp: Path,
        shards: Path,
        name: str,
        *extra: str,
        env: dict | None = None,
        command: str = "pretrain",
        config: str | None = None,
    ):
        self.root = tmp / name
        self.dir = self.root / (name if command == "pretrain" else f"{name}-pretrain")
        self.args = [command, *(["--config", config] if config else []), *overrides(shards, self.root, name, *extra)]
        self.cli = Cli(tmp, name, self.args, env)

    @property
    def status(self) -> dict:
        try:
            return json.loads((self.dir / "slurm/status.json").read_text())
        except (OSError, ValueError):
            return {}

    def job_id(self) -> str:
        return wait_until(
            lambda: self.status.get("job_id") or (self.cli.proc.poll() is not None and "none"),
            "the job id in status.json",
        )

    def rank0_log(self) -> str:
        """Rank 0's stderr and stdout (submitit logs to stdout), all attempts."""
        text = ""
        for suffix in ("err", "out"):
            try:
                text += (self.dir / f"slurm/{self.job_id()}_0_log.{suffix}").read_text(errors="replace")
            except OSError:
                pass
        return text

    def wait_for_hang(self) -> None:
        wait_until(
            lambda: (
                f"VITPIPE_FAULT: rank 0 at step {HANG_AT}: hang" in self.rank0_log() or self.cli.proc.poll() is not None
            ),
            f"rank 0 holding at step {HANG_AT}",
        )
        assert self.cli.proc.poll() is None, self.cli.output()[-4000:]

    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    def rank_at_step(self, rank: int, step: int, attempt: int | None = None) -> dict:
        """Rank ``rank``'s heartbeat once it has done ``step`` steps (in ``attempt``, if given): its pid, node, step,
        and when the step was done (progress_at)."""

        def beat():
            try:
                record = json.loads((self.dir / f"heartbeat/rank{rank:05d}.json").read_text())
            except (OSError, ValueError):
                return None
            if attempt is not None and record.get("attempt") != attempt:
                return None
            return record if record["step"] >= step and record["phase"] == "training" else None

        found = wait_until(
            lambda: beat() or (self.cli.proc.poll() is not None and "ended"), f"rank {rank} at step {step}"
        )
        assert found != "ended", self.cli.output()[-4000:]
        return found

    def losses(self) -> dict[int, float]:
        return dict(map(tuple, self.summary()["loss_history"]))

    def mlflow_runs(self, run_dir: Path | None = None) -> list:
        """The MLflow runs logged from this run folder (or another one in the same store)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}")
        found = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return [r for r in found if r.data.tags.get("run_dir") == str((run_dir or self.dir).resolve())]


# MAE (configs/pretrain/digits_mae.yaml) at the tests' size: labels on the shards are there but never read
MAE = dict(
    config="configs/pretrain/digits_mae.yaml",
    extra=(
        "augment.mixup=0.0",
        "objective.decoder_dim=16",
        "objective.decoder_depth=1",
        "objective.decoder_heads=2",
    ),
)


def hang_env() -> dict:
    """Rank 0 holds at step HANG_AT in the first attempt only: an attempt resumed from an earlier checkpoint trains
    through HANG_AT again and must not hold there (its peers would wait out the collective timeout)."""
    return {"VITPIPE_FAULT": f"rank=0,step={HANG_AT},action=hang,attempt=0"}


@pytest.fixture(scope="module")
def jobs(slurm_cluster, digits_shards, tmp_path_factory):
    """The jobs run side by side (the test cluster fits four at a time); each test then acts on and checks its
    own. The time-limit job's warning comes 150-180 s after it starts (Slurm checks limits every 30 s), well
    after its rank 0 holds at the hang."""
    tmp = tmp_path_factory.mktemp("slurm")
    started = {"tmp": tmp}
    started["reference"] = Run(tmp, digits_shards, "reference", env={"VITPIPE_FAULT": ""}, command="pipeline")
    started["timeout"] = Run(
        tmp, digits_shards, "timeout", "launch.slurm.time_min=4", "launch.slurm.signal_delay_s=60", env=hang_env()
    )
    started["extended"] = extend_after_requeue(started["timeout"])
    started["preempted"] = Run(tmp, digits_shards, "preempted", *MAE["extra"], env=hang_env(), config=MAE["config"])
    started["failing"] = Run(
        tmp,
        digits_shards,
        "failing",
        "launch.cluster=auto",  # sbatch is here: Slurm
        env={"VITPIPE_FAULT": "rank=1,step=3"},
    )
    for name in ("reference", "timeout", "preempted", "failing"):  # queued behind these: starts when one ends
        started[name].job_id()
    started["mae-reference"] = Run(
        tmp, digits_shards, "mae-reference", *MAE["extra"], env={"VITPIPE_FAULT": ""}, config=MAE["config"]
    )
    started["cancelled"] = Run(tmp, digits_shards, "cancelled", env=hang_env())
    started["killed"] = Run(  # rank 0 holds at step 4 (only on the first attempt): rank 1 is alive for its test
        tmp,
        digits_shards,
        "killed",
        "launch.max_failures=1",
        "launch.heartbeat_s=1",
        "checkpoint.every_steps=2",
        "launch.hang_timeout_s=1800",  # its hold must not look like a hang before its test comes
        env=hang_env(),
    )
    started["stalled"] = Run(
        tmp,
        digits_shards,
        "stalled",
        "launch.hang_timeout_s=20",
        "launch.heartbeat_s=1",
        f"optim.epochs={20000 * 32 / 1497}",  # still training when its test comes; the watchdog ends it
    )
    yield started
    for value in started.values():  # a test that failed half-way leaves no job behind
        if isinstance(value, Run) and value.cli.proc.poll() is None:
            subprocess.run(["scancel", value.job_id()], capture_output=True)
            value.cli.proc.kill()


def extend_after_requeue(run: Run, minutes: int = 30) -> dict:
    """Once the time-limit warning has requeued the job, give the next attempt a long limit (the way an
    admin would with scontrol), so that it finishes instead of meeting its own warning on a slow machine."""
    import threading

    done: dict = {}

    def watch():
        try:
            # (a warning before training started is requeued at once, without a checkpoint: wait for the next)
            wait_until(
                lambda: (
                    run.status.get("state") == "REQUEUED"
                    and "message" not in run.status
                    or run.cli.proc.poll() is not None
                ),
                "the time-limit requeue",
            )
            # while the requeue is under way Slurm may answer "Job has already finished": ask again
            for _ in range(120):
                done["result"] = subprocess.run(
                    ["scontrol", "update", f"JobId={run.job_id()}", f"TimeLimit={minutes}"],
                    capture_output=True,
                    text=True,
                )
                if done["result"].returncode == 0 or run.cli.proc.poll() is not None:
                    break
                time.sleep(1.0)
        except BaseException as exc:  # reported by the test
            done["error"] = exc

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    done["thread"] = thread
    return done


def assert_resumed_exactly(run: Run, reference: Run, restarts: int) -> None:
    """All steps done once, the losses after the resume equal the uninterrupted run's, one MLflow run."""
    summary = run.summary()
    assert summary["step"] == TOTAL_STEPS and summary["world_size"] == 2
    losses, expected = run.losses(), reference.losses()
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    for step in range(HANG_AT + 1, TOTAL_STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    (mlflow_run,) = run.mlflow_runs()  # the requeued attempt continued the same MLflow run
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["restarts"] == str(restarts)
    assert sorted({m.step for m in _history(run, mlflow_run)}) == list(range(1, TOTAL_STEPS + 1))


def _history(run: Run, mlflow_run) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run.root / 'mlflow.db'}").get_metric_history(
        mlflow_run.info.run_id, "train_loss"
    )


def sacct_end(job_id: str) -> tuple[str, float]:
    """(Slurm's final state, its end as a Unix time) from the accounting database, once it has both."""

    def ended():
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,End"], capture_output=True, text=True
        ).stdout.split()
        state, _, end = (out[-1] if out else "|").partition("|")
        return (state.split()[0], end) if end[:1].isdigit() else None

    state, end = wait_until(ended, f"sacct's end of job {job_id}", timeout_s=120)
    return state, datetime.fromisoformat(end).timestamp()


@pytest.mark.slurm
def test_a_job_sbatch_refuses_is_one_error_line(slurm_cluster, tmp_path, digits_shards):
    result = run_cli(*submit_args(digits_shards, tmp_path, "x", "launch.slurm.partition=nosuchpartition"), cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "nosuchpartition" in line or "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: launch.slurm.partition=nosuchpartition")
    assert "its partitions: debug" in errors[0] and not (tmp_path / "x").exists()


@pytest.mark.slurm
def test_a_job_that_can_never_start_is_refused_before_it_is_submitted(slurm_cluster, tmp_path, digits_shards):
    """The default profile-less request used to pend forever (8 CPUs per task on 4-CPU nodes): the request is now
    compared with what the partition offers, and the mismatch named, exit 2; without a setting, cpus_per_task
    fits the nodes."""
    base = [
        "pretrain",
        "launch.cluster=slurm",
        *shard_overrides(digits_shards),
        f"run.root={tmp_path}",
    ]
    too_big = run_cli(*base, "launch.nodes=2", "launch.slurm.cpus_per_task=8", "run.name=big", cwd=ROOT)
    assert too_big.returncode == 2, too_big.stderr[-3000:]
    last = too_big.stderr.strip().splitlines()[-1]
    assert (
        "the job can never start" in last
        and "launch.slurm.cpus_per_task=8" in last
        and "largest node has 4 CPUs" in last
    )
    fitted = run_cli(*base, "launch.nodes=2", "--print-config", "run.name=fit", cwd=ROOT)
    assert fitted.returncode == 0 and "cpus_per_task: 4" in fitted.stdout, fitted.stderr[-3000:]
    long = run_cli(*base, "launch.nodes=3", "data.batch_size=96", "run.name=three", cwd=ROOT)  # 3 ranks divide it
    assert long.returncode == 2 and "has 2 such node(s)" in long.stderr


@pytest.mark.slurm
def test_a_job_waiting_for_a_down_node_is_reported_not_left_pending(slurm_cluster, tmp_path, digits_shards):
    """node2 down: a 2-node job pends with ReqNodeNotAvail; the submit command says so and exits non-zero instead
    of printing "submitted" and leaving it. (Runs before the module's jobs start, while the cluster is idle.)"""
    subprocess.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=vitpipe-test"], check=True)
    try:
        result = run_cli(*submit_args(digits_shards, tmp_path, "down", "launch.nodes=2"), cwd=ROOT)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=True)
    out = result.stderr
    if "the job can never start" in out:  # sinfo already showed node2 down: refused before submitting, also right
        assert result.returncode == 2 and "1 such node(s)" in out, out[-3000:]
        return
    assert result.returncode == 1, out[-3000:]
    assert "cannot start: pending, Reason=ReqNodeNotAvail" in out and "scancel" in out
    job_id = json.loads((tmp_path / "down/slurm/status.json").read_text())["job_id"]
    subprocess.run(["scancel", job_id], check=False)


def scontrol_value(kind: str, name: str, key: str) -> str:
    """One field of `scontrol show <kind> <name>` (e.g. a partition's MaxTime), to put it back after a test."""
    out = subprocess.run(["scontrol", "show", kind, name, "-o"], capture_output=True, text=True, check=True).stdout
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith(f"{key}="))


def squeue_line(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True).stdout.strip()


@pytest.mark.slurm
def test_a_queued_job_whose_nodes_go_down_ends_the_wait_with_the_reason(slurm_cluster, tmp_path, digits_shards):
    """After submitting: a 2-node job queued behind a job on both nodes (Reason=Resources: it will start), then
    node2 is drained. Its reason stays "Resources" (shown as "Nodes required for job are DOWN, DRAINED or
    reserved..."), and now it can never start: `launch.wait=true` says so and exits non-zero, the job left queued.
    (Runs before the module's jobs start, while the cluster is idle.)"""
    blocker = subprocess.run(
        ["sbatch", "--parsable", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 600"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    run = None
    try:
        wait_until(lambda: squeue_line(blocker).startswith("RUNNING"), f"the blocking job {blocker} to run")
        run = Run(tmp_path, digits_shards, "queued")  # launch.wait=true
        job_id = run.job_id()
        wait_until(lambda: "queued: job" in run.cli.output() or run.cli.proc.poll() is not None, "the queued report")
        assert run.cli.proc.poll() is None, run.cli.output()[-3000:]  # it waits, as it should for Resources
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=vitpipe-test"], check=True)
        code, output = run.cli.finish(timeout_s=300)
        pending = squeue_line(job_id)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=True)
        subprocess.run(["scancel", blocker, *([run.status["job_id"]] if run and run.status.get("job_id") else [])])
    assert code == 1, output[-3000:]
    assert f"submitted Slurm job {job_id}" in output
    assert f"queued: job {job_id} is pending (Reason=" in output  # Resources, or Priority behind the blocker
    assert (
        f"error: job {job_id} cannot start: pending, Reason=Nodes required for job are DOWN, DRAINED" in output
        and "; partition debug has 1 usable node(s), the job needs 2 (nodes down or drained)" in output
        and f"scancel {job_id}" in output
    ), output[-3000:]
    assert pending.startswith("PENDING|")  # reported and left queued, for its owner to cancel or wait out


@pytest.mark.slurm
@pytest.mark.parametrize(
    "ask, needle, offer",
    [
        ("launch.slurm.mem_gb=16", "16 GB (launch.slurm.mem_gb)", "7 GB"),
        ("launch.gpus_per_node=1", "1 GPUs, but partition debug has 0 such node(s)", "0 GPUs"),
    ],
)
def test_memory_or_gpus_the_nodes_lack_are_refused_before_submitting(
    slurm_cluster, tmp_path, digits_shards, ask, needle, offer
):
    """The nodes have 4 CPUs, 8000 MB and no GPUs: asking more is refused with exit 2, what was asked and what the
    largest node has named; nothing is submitted."""
    result = run_cli(*submit_args(digits_shards, tmp_path, "x", "launch.nodes=2", ask), cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "the job can never start" in last and needle in last and "its largest node has 4 CPUs" in last
    assert offer in last and not (tmp_path / "x").exists()


@pytest.mark.slurm
def test_a_time_limit_above_the_partitions_is_refused_before_submitting(slurm_cluster, tmp_path, digits_shards):
    """The partition's MaxTime set to 10 min (scontrol, put back after): the profile's time_min=30 is refused."""
    before = scontrol_value("partition", "debug", "MaxTime")
    subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=10"], check=True)
    try:
        result = run_cli(*submit_args(digits_shards, tmp_path, "x"), cwd=ROOT)
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", f"MaxTime={before}"], check=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "launch.slurm.time_min=30 exceeds the time limit of partition debug (10 min)" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slurm
def test_two_node_run_completes_on_both_nodes(jobs):
    """The pretraining job of `pipeline`: rank 0's progress streams to the submitter, both nodes train,
    one MLflow run."""
    run = jobs["reference"]
    code, output = run.cli.finish()
    assert code == 0, output[-4000:]
    job_id = run.status["job_id"]
    assert f"submitted Slurm job {job_id}" in output and f"tail -f {run.dir}/slurm/{job_id}_0_log.err" in output
    assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in output and "finished:" in output  # streamed from rank 0's log
    assert run.summary()["step"] == TOTAL_STEPS and run.summary()["world_size"] == 2
    assert run.status["state"] == "COMPLETED" and run.status["nodes"] == ["node1", "node2"]
    assert Path(run.status["python"]) == Path(sys.executable) and Path(sys.executable).is_relative_to(ROOT / ".venv")
    (mlflow_run,) = run.mlflow_runs()
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["hosts"] == "node1,node2"
    assert mlflow_run.data.tags["world_size"] == "2"


@pytest.mark.slurm
def test_pipeline_chains_the_fine_tune_after_the_pretraining_job(jobs):
    """`pipeline` on Slurm: both jobs submitted at once, the fine-tune with afterok on the pretraining job,
    converting that run's final checkpoint when it starts."""
    run = jobs["reference"]
    code, output = run.cli.finish()
    assert code == 0, output[-4000:]
    finetune = run.root / "reference-finetune"
    pre_id, ft_id = run.status["job_id"], json.loads((finetune / "slurm/status.json").read_text())["job_id"]
    assert f"starts after job {pre_id} succeeds" in output
    assert f"#SBATCH --dependency=afterok:{pre_id}" in (finetune / f"slurm/{ft_id}_submission.sh").read_text()
    times = {}
    for job_id in (pre_id, ft_id):
        out = (
            subprocess.run(
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Start,End"],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.split()[-1]
            .split("|")
        )
        times[job_id] = out
    assert times[pre_id][0] == times[ft_id][0] == "COMPLETED"
    assert times[ft_id][1] >= times[pre_id][2]  # ISO times: the fine-tune started after the pretraining ended
    assert json.loads((finetune / "pretrained.json").read_text())["tag"] == f"step{TOTAL_STEPS:08d}"
    assert json.loads((finetune / "summary.json").read_text())["step"] == TOTAL_STEPS
    (mlflow_run,) = run.mlflow_runs(finetune)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["stage"] == "finetune"


@pytest.mark.slurm
def test_a_failing_rank_fails_the_job_with_its_traceback(jobs):
    run = jobs["failing"]
    code, output = run.cli.finish()
    assert code == 1, output[-4000:]
    assert f"submitted Slurm job {run.status['job_id']}" in output  # launch.cluster=auto found sbatch
    # the cause first (the job's teardown named it), then that rank's traceback
    assert "failed (FAILED): rank 1 on node2 at step" in output and "Traceback of rank 1:" in output, output[-3000:]
    assert "VITPIPE_FAULT: injected failure on rank 1 at step 3" in output
    assert run.status["state"] == "FAILED" and run.status["failed_rank"] == 1
    assert "once fixed, start it again (it has no checkpoint yet): make pretrain" in output


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(jobs):
    """submitit's preemption (SIGTERM + USR2) mid-run of an MAE job: every rank saves, the job requeues itself and
    resumes with the uninterrupted MAE run's losses (its masks drawn again the same)."""
    from submitit.slurm.slurm import SlurmJob

    run = jobs["preempted"]
    run.wait_for_hang()
    assert (run.dir / "checkpoints/step00000003/COMPLETE").exists()
    SlurmJob(folder=run.dir / "slurm", job_id=run.job_id(), tasks=[0, 1])._interrupt()
    code, output = run.cli.finish()
    assert code == 0, output[-4000:]
    log = run.rank0_log()
    assert (
        f"checkpoint step{HANG_AT:08d} saved (stop: SIGUSR2)" in log
        or f"checkpoint step{HANG_AT:08d} saved (stop: SIGTERM)" in log
    )
    assert "Requeued job" in log and f"resumed from step{HANG_AT:08d}" in log
    assert run.status["attempt"] == 1 and run.status["state"] == "COMPLETED"
    assert run.summary()["objective"] == "mae"
    code, output = jobs["mae-reference"].cli.finish()
    assert code == 0, output[-4000:]
    assert_resumed_exactly(run, jobs["mae-reference"], restarts=1)


@pytest.mark.slurm
def test_time_limit_warning_checkpoints_and_requeues(jobs):
    """A real time limit: Slurm's USR2 (signal_delay_s before it) -> checkpoint on every rank -> requeue."""
    run = jobs["timeout"]
    code, output = run.cli.finish()
    assert code == 0, output[-4000:]
    jobs["extended"]["thread"].join(timeout=60)
    # (the extension is only a helper: if the resumed attempt finished first, scontrol found nothing to extend)
    assert "error" not in jobs["extended"], jobs["extended"]
    log = run.rank0_log()
    assert f"checkpoint step{HANG_AT:08d} saved (stop: SIGUSR2)" in log
    assert "this job is timed-out" in log and "Requeued job" in log  # submitit's own accounting of time-outs
    assert run.status["attempt"] >= 1 and run.status["state"] == "COMPLETED"  # 2 if a warning beat the start-up
    assert_resumed_exactly(run, jobs["reference"], restarts=1)  # resumed from a checkpoint once


@pytest.mark.slurm
def test_scancel_leaves_a_resumable_run_that_says_how_to_resume(jobs):
    from pipeline.train.checkpoint import latest_complete

    run = jobs["cancelled"]
    run.wait_for_hang()
    job_id = run.job_id()
    again = Cli(jobs["tmp"], "cancelled-twice", run.args)  # two jobs must never share a run dir
    code, output = again.finish()
    assert code == 2 and f"already has Slurm job {job_id} (RUNNING)" in output, output[-3000:]

    subprocess.run(["scancel", job_id], check=True)
    code, output = run.cli.finish()
    assert code == 3, output[-4000:]  # stopped, resumable
    assert f"Slurm job {job_id} was cancelled" in output and "resume: make pretrain" in output
    tag = latest_complete(run.dir / "checkpoints")
    assert tag in ("step00000003", f"step{HANG_AT:08d}")  # SIGTERM's own save, if it fit in KillWait
    status = run.status
    assert status["state"] == "CANCELLED" and f"run.name={run.dir.name}" in status["resume"]
    assert "checkpoint" in status["message"]
    (mlflow_run,) = run.mlflow_runs()
    if tag == f"step{HANG_AT:08d}":  # the ranks saw SIGTERM and stopped cleanly: MLflow says so
        assert mlflow_run.info.status == "KILLED" and mlflow_run.data.tags["run_state"] == "stopped"

    # the same command again, without launch.wait (submit and return), continues it
    resumed = Cli(
        jobs["tmp"], "cancelled-resumed", [a for a in run.args if a != "launch.wait=true"], env={"VITPIPE_FAULT": ""}
    )
    code, output = resumed.finish()
    assert code == 0, output[-4000:]
    assert f"resuming pretrain run: {run.dir}" in output and "returns now" in output
    assert run.status["job_id"] != job_id
    wait_until(
        lambda: run.status.get("state") in ("COMPLETED", "FAILED") and run.status["job_id"] != job_id,
        "the resumed job to end",
    )
    assert run.status["state"] == "COMPLETED", run.status
    assert_resumed_exactly(run, jobs["reference"], restarts=1)


@pytest.mark.slurm
def test_a_killed_rank_of_a_two_node_job_is_named_and_the_job_retried(jobs):
    """SIGKILL of rank 1 on node2 (what the OOM killer does): the batch script's teardown names rank 1, node2 and the
    signal (not rank 0's lost-peer error), records it and requeues the job (launch.max_failures=1); the next
    attempt resumes from the latest checkpoint and finishes the run, in the same MLflow run."""
    run = jobs["killed"]
    beat = run.rank_at_step(1, 3)
    killed_at = time.monotonic()
    os.kill(beat["pid"], 9)
    failures_file = run.dir / "failures.jsonl"  # the teardown records the cause, then prints it
    wait_until(lambda: failures_file.exists() or run.cli.proc.poll() is not None, "rank 1 named", every_s=0.2)
    named_s = time.monotonic() - killed_at
    code, output = run.cli.finish()
    assert code == 0, output[-4000:]
    log = run.rank0_log()
    assert f"vitpipe: rank 1 on {beat['node']} failed at step" in log and "killed by SIGKILL" in log, log[-3000:]
    assert "killed by SIGKILL (most often the out-of-memory killer; see dmesg" in log  # the hint, in the report
    assert "requeueing job" in log
    failures = [json.loads(line) for line in (run.dir / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["rank"] == 1 and failures[0]["node"] == beat["node"]
    assert run.status["state"] == "COMPLETED" and run.status["attempt"] == 1
    assert run.summary()["step"] == TOTAL_STEPS
    (mlflow_run,) = run.mlflow_runs()
    assert mlflow_run.info.status == "FINISHED" and "SIGKILL" in mlflow_run.data.tags["failure.1"]
    assert "out-of-memory" in mlflow_run.data.tags["failure.1"]
    record_figures("slurm_killed_rank", sigkill_to_named_s=round(named_s, 1), failed_step=failures[0]["step"])


@pytest.mark.slurm
def test_a_stalled_rank_of_a_two_node_job_is_found_by_the_watchdog(jobs):
    """SIGSTOP of rank 1: no collective timeout fires, but the tasks' hang watchdog ends the job after
    launch.hang_timeout_s, and the failure names rank 1 on its node as not answering."""
    run = jobs["stalled"]
    beat = run.rank_at_step(1, 3)
    stopped_at = time.time()
    os.kill(beat["pid"], 19)  # SIGSTOP
    try:
        code, output = run.cli.finish()
        reported_s = time.time() - stopped_at
    finally:
        subprocess.run(["kill", "-CONT", str(beat["pid"])], capture_output=True)
    assert code == 1, output[-4000:]
    assert f"rank 1 on {beat['node']}" in output and "hang: rank 1" in output and "not answering" in output
    assert run.status["state"] == "FAILED" and run.status["failed_rank"] == 1
    assert "hang watchdog" in run.rank0_log()
    state, ended_at = sacct_end(run.status["job_id"])
    assert state == "FAILED"  # Slurm's books too: a failed job (an afterok successor would not start)
    record_figures(
        "slurm_stalled_rank",
        hang_timeout_s=20,
        sigstop_to_job_end_s=round(ended_at - stopped_at, 1),  # sacct's End: whole seconds
        sigstop_to_reported_s=round(reported_s, 1),
    )


@pytest.mark.slurm
def test_scontrol_requeue_of_a_running_job_resumes_it_exactly(jobs, digits_shards):
    """`scontrol requeue` of the running 2-node job (an admin, a node health check): Slurm sends SIGTERM to every
    task (SIGKILL after KillWait, 5 s here), the ranks save at the step they are at if that fits, the job runs again
    as attempt 1 under the same id, resumes from the latest complete checkpoint and finishes with the uninterrupted
    run's step count and losses, in one MLflow run with restarts=1. Not a failure: nothing in failures.jsonl.
    Started here, last, when the other jobs have left the cluster (a job holding a slot from the start could
    keep a requeued one of the other tests from running)."""
    code, output = jobs["reference"].cli.finish()  # the losses to compare with
    assert code == 0, output[-4000:]
    run = Run(jobs["tmp"], digits_shards, "requeued", "launch.heartbeat_s=1", env=hang_env())
    jobs["requeued"] = run  # the fixture cancels it if this test fails half-way
    run.wait_for_hang()
    assert (run.dir / "checkpoints/step00000003/COMPLETE").exists()
    job_id = run.job_id()
    requeued_at = time.time()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_until(lambda: "resumed from step" in run.rank0_log() or run.cli.proc.poll() is not None, "the resume")
    resumed_s = time.time() - requeued_at
    first_step = run.rank_at_step(0, 1, attempt=1)
    code, output = run.cli.finish()
    assert code == 0, output[-4000:]
    log = run.rank0_log()
    tags = [t for t in (f"step{HANG_AT:08d}", "step00000003") if f"resumed from {t}" in log]
    assert len(tags) == 1, log[-3000:]  # step 4 if the SIGTERM's save fit in KillWait, else step 3
    assert run.status["state"] == "COMPLETED" and run.status["attempt"] == 1 and run.status["job_id"] == job_id
    assert not (run.dir / "failures.jsonl").exists()
    assert_resumed_exactly(run, jobs["reference"], restarts=1)
    record_figures(
        "slurm_requeue",
        resumed_from=tags[0],
        requeue_to_resumed_s=round(resumed_s, 1),  # the resumed attempt has loaded the checkpoint
        requeue_to_first_step_s=round(first_step["progress_at"] - requeued_at, 1),
    )
