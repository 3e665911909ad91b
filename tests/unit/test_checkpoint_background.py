"""Background checkpoint writes (pipeline/train/background.py): the host snapshot, the writer thread, the markers.
The whole path through DeepSpeed (2 ranks, exact resume, a rank killed mid-write) is in tests/e2e and tests/faults."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint as ckpt
from pipeline.train.background import WRITTEN, BackgroundCheckpointEngine, Snapshot


def _tree() -> dict:
    flat = torch.arange(12, dtype=torch.float32)
    return {
        "module": OrderedDict(weight=flat[:6].view(2, 3), bias=flat[6:]),  # two views of one flat buffer
        "param": torch.nn.Parameter(torch.ones(3)),
        "moments": [{"exp_avg": torch.zeros(4, dtype=torch.float64)}, (torch.tensor(7),)],
        "scaler": {"scale": 2.0**16, "name": "dynamic"},
    }


def test_the_snapshot_freezes_values_keeps_views_sharing_and_reuses_its_buffers():
    tree = _tree()
    snapshot = Snapshot(pin=False)
    copy = snapshot.copy(tree, "model.pt")
    tree["module"]["weight"].add_(100)  # training goes on
    tree["param"].data.mul_(5)
    tree["moments"][0]["exp_avg"].fill_(1)
    assert torch.equal(copy["module"]["weight"], torch.arange(6.0).view(2, 3))
    assert torch.equal(copy["module"]["bias"], torch.arange(6.0, 12.0))
    w, b = copy["module"]["weight"], copy["module"]["bias"]
    assert w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one copy of the flat buffer
    assert isinstance(copy["module"], OrderedDict) and isinstance(copy["param"], torch.nn.Parameter)
    assert torch.equal(copy["param"], torch.ones(3)) and copy["moments"][0]["exp_avg"].sum() == 0
    assert copy["moments"][1][0].item() == 7 and copy["scaler"] == tree["scaler"]
    assert snapshot.bytes == 12 * 4 + 3 * 4 + 4 * 8 + 8
    buffers = {slot: storage.data_ptr() for slot, storage in snapshot.buffers.items()}
    again = snapshot.copy(tree, "model.pt")
    assert {slot: storage.data_ptr() for slot, storage in snapshot.buffers.items()} == buffers  # reused
    assert torch.equal(again["module"]["weight"], torch.arange(6.0).view(2, 3) + 100)


def test_the_writer_thread_writes_each_file_durably_then_its_marker_then_finalizes(tmp_path: Path):
    writer = BackgroundCheckpointEngine(rank=0, pin=False)
    tag_dir = tmp_path / "step00000005"
    tag_dir.mkdir()
    (tag_dir / WRITTEN.format(rank=0)).write_text("a killed attempt's")
    finalized = []
    writer.begin("step00000005", tag_dir)
    assert not (tag_dir / WRITTEN.format(rank=0)).exists()  # a stale marker is gone before anything is copied
    tree = _tree()
    writer.save(tree, str(tag_dir / "model.pt"))
    writer.save({"rng": torch.get_rng_state()}, str(tag_dir / "rng_rank00000.pt"))
    tree["module"]["bias"].fill_(-1)  # after the copy: not in the file
    writer.submit(lambda: finalized.append((tag_dir / WRITTEN.format(rank=0)).exists()))
    writer.wait()
    assert finalized == [True] and not writer.in_flight()
    loaded = torch.load(tag_dir / "model.pt", weights_only=False)
    assert torch.equal(loaded["module"]["bias"], torch.arange(6.0, 12.0))
    assert sorted(p.name for p in tag_dir.iterdir()) == [WRITTEN.format(rank=0), "model.pt", "rng_rank00000.pt"]
    (done,) = writer.poll()
    assert done.tag == "step00000005" and done.bytes == sum(
        (tag_dir / name).stat().st_size for name in ("model.pt", "rng_rank00000.pt")
    )
    assert writer.poll() == []


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path: Path):
    writer = BackgroundCheckpointEngine(rank=1, pin=False)
    writer.begin("step00000001", tmp_path / "gone")
    writer.save({"x": torch.ones(2)}, str(tmp_path / "gone" / "model.pt"))  # its folder does not exist
    writer.submit()
    with pytest.raises(RuntimeError, match="writing a checkpoint in the background failed"):
        writer.wait()
    writer.wait()  # reported once; the writer is idle again


def test_rank0_marks_the_checkpoint_complete_once_every_rank_said_its_files_are_durable(tmp_path: Path):
    tag = "step00000004"
    (tmp_path / tag).mkdir()
    for rank in range(2):
        (tmp_path / tag / WRITTEN.format(rank=rank)).write_text(tag)
    ckpt._finalize_when_written(tmp_path, tag, {"step": 4, "world_size": 2, "zero_stage": 2}, keep_last=2)
    assert ckpt.latest_complete(tmp_path) == tag and ckpt.read_meta(tmp_path / tag)["world_size"] == 2
    assert not list((tmp_path / tag).glob(".written-rank*")) and (tmp_path / "latest").read_text() == tag


def test_a_deferred_copy_runs_on_the_writer_thread_and_the_update_waits_for_it(tmp_path: Path):
    """defer_copy: save() keeps the live tensors (nothing copied on the training thread); wait_staged (before the
    optimizer step) returns once the writer copied them, so an update after it is not in the file."""
    import threading

    writer = BackgroundCheckpointEngine(rank=0, pin=False, defer_copy=True)
    release, copying = threading.Event(), threading.Event()
    real_copy = writer.snapshot.copy

    def gated_copy(*args, **kwargs):
        copying.set()
        release.wait()
        return real_copy(*args, **kwargs)

    writer.snapshot.copy = gated_copy
    tag_dir = tmp_path / "step00000002"
    tag_dir.mkdir()
    writer.begin("step00000002", tag_dir)
    tree = _tree()
    writer.save(tree, str(tag_dir / "model.pt"))
    ((held, _),) = writer.job.files
    assert held["module"]["bias"] is tree["module"]["bias"]  # the live tensor, not a copy
    assert writer.snapshot.bytes == 12 * 4 + 3 * 4 + 4 * 8 + 8  # counted as the copy will be
    writer.submit()
    copying.wait()
    assert not writer.staging.is_set()  # the writer is copying: the optimizer step would wait here
    release.set()
    writer.wait_staged()
    tree["module"]["bias"].fill_(-1)  # the optimizer step
    writer.wait()
    loaded = torch.load(tag_dir / "model.pt", weights_only=False)
    assert torch.equal(loaded["module"]["bias"], torch.arange(6.0, 12.0))
    assert writer.staging is None


def test_a_failed_deferred_copy_does_not_leave_the_update_waiting(tmp_path: Path):
    writer = BackgroundCheckpointEngine(rank=0, pin=False, defer_copy=True)

    def broken_copy(*args, **kwargs):
        raise MemoryError("no room for the host copy")

    writer.snapshot.copy = broken_copy
    writer.begin("step00000001", tmp_path)
    writer.save({"x": torch.ones(2)}, str(tmp_path / "model.pt"))
    writer.submit()
    with pytest.raises(RuntimeError, match="no room for the host copy"):
        writer.wait_staged()
        writer.wait()
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    "module, zero_stage, expected",
    [
        (torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)), 2, True),
        (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)), 2, False),  # forward updates stats
        (torch.nn.Linear(2, 2), 3, False),  # ZeRO-3 gathers and releases parameters in the forward
    ],
    ids=["layernorm", "batchnorm", "zero3"],
)
def test_the_copy_is_deferred_only_when_the_forward_changes_no_saved_state(module, zero_stage, expected):
    from pipeline.train.background import can_defer_copy

    assert can_defer_copy(module, zero_stage) is expected
