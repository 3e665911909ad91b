"""MLflow tracking against a real ``mlflow server`` on loopback (started as users start it: ``python -m
pipeline ui``), killed and restarted under a live tracker and under a real 2-process training run, plus the
UI checked in headless Chromium. No mocks; waits are bounded polls on observable state, never timings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from launch.env import node_name
from launch.local import free_port
from pipeline import cli
from pipeline.config import Config
from pipeline.rundir import RunDir
from pipeline.tracking.journal import Spool
from pipeline.tracking.tracker import Tracker, pipeline_run
from tests.conftest import ROOT, fault_report, run_cli

NAME_RE = r"\d{4}-\d\d-\d\d \d\d:\d\d"  # the date part of a readable run name


class MlflowServer:
    """``python -m pipeline ui`` on a loopback port, in its own process group so it can be killed whole."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root.parent / f"{root.name}-server-{self.port}.log"

    def start(self, timeout_s: float = 240.0) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "ui",
                    "--root",
                    str(self.root),
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for(self._healthy, timeout_s, f"mlflow server on {self.uri} (log {self.log})")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"mlflow server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def up(self) -> MlflowServer:
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def kill(self) -> None:
        """SIGKILL the whole server (uvicorn and its workers): the store goes away without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"gave up waiting for {what} after {timeout_s:.0f} s")


def tracker_config(uri: str, root: Path, experiment: str, **tracking) -> Config:
    config = Config()
    config.run.root = str(root)
    config.model.name = "vit_tiny_patch16_224"
    config.tracking.tracking_uri, config.tracking.experiment = uri, experiment
    config.tracking.flush_every_s, config.tracking.final_wait_s = 0.2, 60.0
    for key, value in tracking.items():
        setattr(config.tracking, key, value)
    return config


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One store and port for the module: started by the first test that needs it up (starting a server
    is the slow part of these tests), killed and restarted by the outage tests."""
    srv = MlflowServer(tmp_path_factory.mktemp("store"))
    yield srv
    srv.kill()


@pytest.fixture
def live(server):
    return server.up()


# ----------------------------------------------------------------------------------------------------
# The tracker against a real server


def test_tracker_survives_a_server_down_at_start_and_killed_mid_run(server, tmp_path):
    """Down at start: nothing blocks, the run is created once the server answers. Killed mid-run and
    restarted: the backlog arrives, and every step is there exactly once."""
    from mlflow.tracking import MlflowClient

    srv = server
    srv.kill()  # down at start (a no-op when this test runs first)
    config = tracker_config(srv.uri, tmp_path, "unit-outage")
    run_dir = tmp_path / "run"
    tracker = Tracker(config, run_dir, enabled=True, img_size=32)
    try:
        for step in range(1, 11):
            tracker.log_metrics({"train_loss": 1.0 / step}, step)
        assert tracker.run_id is None and not RunDir(run_dir).mlflow_run_id.exists()
        assert Spool(run_dir).pending_count() >= 11  # the creation record and ten metric records, on disk

        srv.start()
        assert tracker.flush(180), tracker.delivery.last_error
        client = MlflowClient(srv.uri)
        run_id = RunDir(run_dir).mlflow_run_id.read_text()
        assert steps_of(client, run_id, "train_loss") == list(range(1, 11))

        srv.kill()
        for step in range(11, 21):
            tracker.log_metrics({"train_loss": 1.0 / step}, step)
        assert not tracker.flush(1.0)  # nothing can be sent: it stays pending, and logging did not block
        srv.start()
        for step in range(21, 31):
            tracker.log_metrics({"train_loss": 1.0 / step}, step)
        tracker.finish("FINISHED")
        assert tracker.close()
        assert steps_of(client, run_id, "train_loss") == list(range(1, 31))  # none missing, none twice
        assert client.get_run(run_id).info.status == "FINISHED"
        assert len(client.search_runs([client.get_experiment_by_name("unit-outage").experiment_id])) == 1
    finally:
        tracker.close(wait_s=0)


def git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_tracker_sends_everything_with_readable_names_tags_and_a_parent_run(live, tmp_path):
    from mlflow.tracking import MlflowClient

    config = tracker_config(live.uri, tmp_path, "unit-batches")
    parent = pipeline_run(config, tmp_path / "pipeline", img_size=32)
    parent_id = parent.wait_for_run_id(120)
    assert parent_id, parent.delivery.last_error
    config.tracking.parent_run_id = parent_id
    run_dir = tmp_path / "child"
    RunDir(run_dir).write_config(config)
    tracker = Tracker(config, run_dir, enabled=True, img_size=32, job_id="4242")
    tracker.log_params({f"p{i:03d}": i for i in range(150)})  # more than one log_batch holds
    for step in range(1, 31):
        tracker.log_metrics({"train_loss": 1.0 / step, "lr": 0.1, "grad_norm": None}, step)
    tracker.log_metrics({f"system/n{i}/cpu_percent": float(i) for i in range(1200)}, 31)  # > 1000 in one record
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.finish("FINISHED")
    assert tracker.close()
    parent.finish("FINISHED")
    assert parent.close()

    client = MlflowClient(live.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert re.fullmatch(rf"pretrain vit_tiny 32px {NAME_RE}", run.info.run_name)
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["job_id"] == "4242"
    assert run.data.tags["run_dir"] == str(run_dir.resolve()) and run.data.tags["git_commit"] == git_head()
    assert len(run.data.params) == 150
    assert steps_of(client, tracker.run_id, "train_loss") == list(range(1, 31))
    assert "grad_norm" not in run.data.metrics and run.data.metrics["system/n1199/cpu_percent"] == 1199.0
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
    assert RunDir(run_dir).mlflow_run_id.read_text() == tracker.run_id
    assert not RunDir(run_dir).spool.exists(), "a fully sent journal is removed"
    parent_run = client.get_run(parent_id)
    assert re.fullmatch(rf"pipeline vit_tiny 32px {NAME_RE}", parent_run.info.run_name)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["stage"] == "pipeline"
    experiment = client.get_experiment_by_name("unit-batches")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view


def test_unreachable_to_the_end_keeps_a_spool_that_tracking_sync_uploads(live, tmp_path, caplog, capsys):
    from mlflow.tracking import MlflowClient

    dead = f"http://127.0.0.1:{free_port()}"
    config = tracker_config(dead, tmp_path, "unit-sync", final_wait_s=1.0)
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_config(config)
    RunDir(run_dir).spool.write_text('{"t":"metr')  # the fragment a crashed attempt may leave
    tracker = Tracker(config, run_dir, enabled=True, img_size=32)
    for step in range(1, 6):
        tracker.log_metrics({"train_loss": 1.0 / step}, step)
    tracker.finish("FINISHED")
    assert tracker.close() is False
    assert "tracking-sync" in caplog.text and str(run_dir) in caplog.text
    assert RunDir(run_dir).spool.exists() and not RunDir(run_dir).mlflow_run_id.exists()

    assert cli.main(["tracking-sync", str(tmp_path / "nope")]) == 2  # bad input: one line, exit 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["tracking-sync", str(run_dir), "--timeout", "0"]) == 1  # its store is still down: kept
    assert "still in" in capsys.readouterr().err and RunDir(run_dir).spool.exists()

    assert cli.main(["tracking-sync", str(run_dir), "--tracking-uri", live.uri]) == 0
    assert "nothing left to send" in capsys.readouterr().err
    client = MlflowClient(live.uri)
    run_id = RunDir(run_dir).mlflow_run_id.read_text()
    assert steps_of(client, run_id, "train_loss") == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not RunDir(run_dir).spool.exists()


# ----------------------------------------------------------------------------------------------------
# A real training run through the CLI while the server is down, then killed, then back


TOTAL_STEPS = 24
STOP_AT = 3


def train_overrides(shards: Path, root: Path) -> list[str]:
    """A tiny ViT on digits, 2 ranks, 24 steps, every step logged; peak_tflops set so that MFU is
    computed on CPU too."""
    return [
        f"data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={shards}/val-000000.tar",
        "data.batch_size=32",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        f"optim.epochs={TOTAL_STEPS * 32 / 1497}",
        "optim.warmup_epochs=0.05",
        "deepspeed.zero_stage=1",
        "deepspeed.precision=fp32",
        "launch.nproc=2",
        "checkpoint.every_steps=0",
        "eval.every_steps=0",
        "tracking.log_every_steps=1",
        "tracking.flush_every_s=0.2",
        "tracking.peak_tflops=0.5",
        f"run.root={root}",
        "run.name=outage",
    ]


def _spool_records(run_dir: Path) -> int:
    path = RunDir(run_dir).spool
    return path.read_text().count("\n") if path.exists() else 0


def _restart_and_measure_the_backlog(srv, run_dir: Path, proc: subprocess.Popen) -> None:
    """Starts the server again; for the report (never asserted): seconds from its answering again until the
    journal kept while it was down is sent (the sender's offset past it, or the journal gone at the run's end)."""
    run = RunDir(run_dir)
    backlog = run.spool.stat().st_size if run.spool.exists() else 0
    started = time.monotonic()
    srv.start()
    answering = time.monotonic()

    def sent() -> bool:
        try:
            return not run.spool.exists() or int(run.spool_sent.read_text() or 0) >= backlog
        except (OSError, ValueError):
            return False

    _wait_for(sent, 300, "the backlog sent to the restarted server", proc)
    fault_report(
        "mlflow_server_down",
        server_restart_s=round(answering - started, 1),
        backlog_sent_after_answering_s=round(time.monotonic() - answering, 1),
        backlog_bytes=backlog,
    )


@pytest.fixture(scope="module")
def outage_run(digits_shards, server, tmp_path_factory):
    """Attempt 1 has no server to talk to (its address answers nothing) and stops, resumably, at step 3.
    Attempt 2 resumes against the live server, nested under a pipeline parent run; the server is SIGKILLed
    while it trains, and restarted."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "outage"
    out = {"server": server, "root": root, "run_dir": run_dir}
    out["first"] = run_cli(
        "pretrain",
        *train_overrides(digits_shards, root),
        f"run.stop_at_step={STOP_AT}",
        "tracking.final_wait_s=1",
        cwd=ROOT,
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
    )
    srv = server.up()
    env = {"MLFLOW_TRACKING_URI": srv.uri}
    try:
        parent = pipeline_run(tracker_config(srv.uri, root, "digits_vit"), root / "pipeline-demo", img_size=32)
        parent_id = parent.wait_for_run_id(120)
        out["parent_id"] = parent_id
        log = root / "second.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "pretrain",
                    *train_overrides(digits_shards, root),
                    f"tracking.parent_run_id={parent_id}",
                    "tracking.final_wait_s=300",
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        client = MlflowClient(srv.uri)

        def delivered_past_resume():
            if not RunDir(run_dir).mlflow_run_id.exists():
                return False
            return max(steps_of(client, RunDir(run_dir).mlflow_run_id.read_text(), "train_loss") or [0]) > STOP_AT + 1

        _wait_for(delivered_past_resume, 300, "steps of attempt 2 on the server", proc)
        srv.kill()
        out["killed_ms"] = int(time.time() * 1000)
        out["training_done_at_kill"] = (run_dir / "summary.json").exists()
        killed_at = _spool_records(run_dir)
        _wait_for(
            lambda: _spool_records(run_dir) >= killed_at + 3 or (run_dir / "summary.json").exists(),
            300,
            "records logged while the server is down",
            proc,
        )
        _restart_and_measure_the_backlog(srv, run_dir, proc)
        out["second_rc"] = proc.wait(timeout=600)
        out["second_log"] = log.read_text()
        parent.finish("FINISHED")
        out["parent_closed"] = parent.close()
    finally:
        srv.up()  # for the browser test, and whatever the failure
    yield out


@pytest.mark.slow
def test_training_completes_through_outages_with_every_step_logged(outage_run):
    from mlflow.tracking import MlflowClient

    first, run_dir = outage_run["first"], outage_run["run_dir"]
    assert first.returncode == 3, first.stderr[-3000:]  # stopped resumably, not broken by the dead server
    assert "tracking-sync" in first.stderr  # told where its records are and how to send them
    assert outage_run["second_rc"] == 0, outage_run["second_log"][-4000:]
    assert not outage_run["training_done_at_kill"], "the server was killed while training ran"
    assert outage_run["parent_closed"]

    client = MlflowClient(outage_run["server"].uri)
    experiment = client.get_experiment_by_name("digits_vit")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_dir = '{run_dir.resolve()}'")
    assert len(runs) == 1, "both attempts are one MLflow run, created when the server first answered"
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.end_time > outage_run["killed_ms"]  # its end was journaled while the server was dead
    assert steps_of(client, run_id, "train_loss") == list(range(1, TOTAL_STEPS + 1))  # none missing, none twice
    assert re.fullmatch(rf"pretrain vit_tiny 32px {NAME_RE}", run.info.run_name)
    assert run.data.tags["mlflow.parentRunId"] == outage_run["parent_id"]
    assert run.data.tags["world_size"] == "2" and run.data.tags["restarts"] == "1"
    assert float(run.data.tags["model_gflops_per_image"]) > 0 and run.data.tags["device_name"] == "cpu"
    assert run.data.tags["checkpoint.last_path"].endswith(f"step{TOTAL_STEPS:08d}")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "restarts")] == [(0, 0.0), (STOP_AT, 1.0)]
    node = node_name()
    for key in (
        "lr",
        "grad_norm",
        "images_per_s",
        "images_per_s_per_gpu",
        "images_per_s_per_gpu_min",
        "data_wait_fraction",
        "skipped_samples",
        "mfu_percent",
        "val_top1",
        "val_top5",
        "checkpoint_seconds",
        "checkpoint_mib",
        f"system/{node}/cpu_percent",
        f"system/{node}/memory_percent",
    ):
        assert key in run.data.metrics, key
    assert 0 < run.data.metrics["mfu_percent"] < 100
    assert run.data.params["tracking.log_every_steps"] == "1"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "summary.json"}
    assert not RunDir(run_dir).spool.exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == TOTAL_STEPS


# ----------------------------------------------------------------------------------------------------
# The UI in a real browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium; the test skips loudly without it, and fails instead where CI requires it."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} missing: apt-get install -y --no-install-recommends chromium"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is missing: uv sync (it is in the dev group)"
    if missing:
        if os.environ.get("REQUIRE_BROWSER_TESTS") == "1":
            pytest.fail(f"REQUIRE_BROWSER_TESTS=1 but {missing}")
        pytest.skip(f"BROWSER TEST NOT RUN: {missing}")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    return CHROMIUM


@pytest.mark.browser
def test_mlflow_ui_shows_the_experiment_runs_charts_and_artifacts(chromium, outage_run, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    srv = outage_run["server"].up()
    experiment_id = MlflowClient(srv.uri).get_experiment_by_name("digits_vit").experiment_id
    shot = Path(os.environ.get("UI_SCREENSHOT") or tmp_path / "mlflow_ui.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1150})
            # the assistant side panel would cover half the page
            context.add_init_script(
                "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            )
            page = context.new_page()
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            runs_page = f"{srv.uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            page.goto(runs_page)
            expect(page.get_by_text("digits_vit").first).to_be_visible()  # the experiment
            parent = page.get_by_text(re.compile(r"^pipeline vit_tiny 32px")).first
            expect(parent).to_be_visible()
            parent.locator("xpath=ancestor::*[@role='gridcell'][1]").locator("button").first.click()  # expand
            expect(page.get_by_text(re.compile(r"^pretrain vit_tiny 32px")).first).to_be_visible()  # nested run

            page.goto(runs_page + "&compareRunsMode=CHART")  # charts render lazily: search for the ones to check
            page.get_by_placeholder("Search metric charts").fill(
                f"train_loss|val_top1|images_per_s$|mfu|system/{node_name()}/cpu"
            )
            title = page.get_by_text("train_loss", exact=True).first
            expect(title).to_be_visible()
            # a drawn line in the train_loss chart (plotly draws each trace as an svg path.js-line), in its own card
            card = title.locator("xpath=ancestor::*[.//*[contains(@class, 'js-line')]][1]")
            expect(card.locator("path.js-line").first).to_be_attached()
            expect(card).not_to_contain_text("mfu_percent")
            expect(page.get_by_text(f"system/{node_name()}/cpu_percent").first).to_be_visible()  # per-node section
            page.screenshot(path=str(shot))

            run_id = RunDir(outage_run["run_dir"]).mlflow_run_id.read_text()  # artifacts are served and previewed
            page.goto(f"{srv.uri}/#/experiments/{experiment_id}/runs/{run_id}/artifacts?workflowType=machine_learning")
            expect(page.get_by_text("summary.json").first).to_be_visible()
            page.get_by_text("config.yaml").first.click()
            expect(page.get_by_text("log_every_steps").first).to_be_visible()
        finally:
            browser.close()
    print(f"MLflow UI screenshot: {shot}")
    assert shot.stat().st_size > 10_000
