"""The VITPIPE_FAULT test hook the fault and Slurm tests drive: which rank and attempt it fires in."""

import pytest

from pipeline.train.signals import Fault


@pytest.mark.parametrize(
    ("spec", "rank", "attempt", "fires"),
    [
        ("rank=1,step=3", 1, 0, True),
        ("rank=1,step=3", 1, 2, True),  # no attempt given: every attempt (a deterministic bug)
        ("rank=1,step=3", 0, 0, False),
        ("rank=0,step=4,action=hang,attempt=0", 0, 0, True),
        ("rank=0,step=4,action=hang,attempt=0", 0, 1, False),  # a resumed attempt trains through step 4 freely
        ("", 0, 0, False),
    ],
)
def test_the_hook_fires_on_its_rank_and_attempt_only(monkeypatch, spec, rank, attempt, fires):
    monkeypatch.setenv("VITPIPE_FAULT", spec)
    assert (Fault.from_environ(rank, attempt) is not None) is fires


@pytest.mark.parametrize("spec", ["rank=0", "rank=0,step=2,action=explode", "rank=0,step=2,attempt=first"])
def test_a_malformed_hook_says_what_is_expected(monkeypatch, spec):
    monkeypatch.setenv("VITPIPE_FAULT", spec)
    with pytest.raises(ValueError, match=r"attempt=A"):
        Fault.from_environ(0)
