"""The local launcher's ranks: real processes started by launch.local.run_local."""

import os
import sys

import pytest

from launch.local import run_local

REPORT = "import os, pathlib; pathlib.Path(os.environ['OUT'], os.environ['RANK']).write_text(os.environ.get('OMP_NUM_THREADS', '-'))"


def _threads_seen(tmp_path, nproc):
    run_local([sys.executable, "-c", REPORT], nproc, tmp_path / "logs")
    return [(tmp_path / str(rank)).read_text() for rank in range(nproc)]


@pytest.mark.parametrize("nproc", [1, 2])
def test_each_rank_gets_its_share_of_the_cpus_as_torch_threads(tmp_path, monkeypatch, nproc):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OUT", str(tmp_path))
    share = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    # one rank keeps torch's own default (all cores)
    assert _threads_seen(tmp_path, nproc) == (["-"] if nproc == 1 else [share] * nproc)


def test_threads_the_user_set_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert _threads_seen(tmp_path, 2) == ["3", "3"]
