"""``make gpu-check`` on a machine without CUDA: one line, exit code 2, nothing run or written."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, even on a machine that has one
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a loaded machine imports torch slowly
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: make gpu-check needs a CUDA GPU, and torch sees none on this machine (nothing was run)"
    ]
    assert not out.exists()
