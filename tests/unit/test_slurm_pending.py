"""Which pending reasons clear by themselves: the verdict on squeue lines (``-o "%T|%r|%D|%P"``) as the project's
test cluster (Slurm 22.05) printed them, with the partition's usable node count that sinfo gave at the time."""

from __future__ import annotations

import pytest

from launch.slurm.status import classify_pending

DRAINED = "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"


@pytest.mark.parametrize(
    "line, usable, verdict",
    [
        ("RUNNING|None|2|debug", None, "running"),
        ("COMPLETING|None|2|debug", None, "running"),
        ("||", None, "running"),  # squeue no longer lists it: started and gone
        ("PENDING|None|2|debug", None, "unknown"),  # just submitted, not looked at yet
        ("PENDING|Priority|2|debug", None, "queued"),
        ("PENDING|Resources|2|debug", None, "queued"),  # both nodes busy
        ("PENDING|BeginTime|2|debug", None, "queued"),  # requeued: held for a few seconds
        ("PENDING|Dependency|2|debug", None, "queued"),
        ("PENDING|PartitionConfig|2|debug", None, "never"),  # 8 CPUs per task on 4-CPU nodes
        ("PENDING|PartitionTimeLimit|1|debug", None, "never"),  # --time=10 in a partition with MaxTime=5
        ("PENDING|AssocMaxCpuPerJobLimit|2|debug", None, "never"),
        # submitted while node2 was down
        ("PENDING|ReqNodeNotAvail, UnavailableNodes:node2|2|debug", 1, "blocked"),
        ("PENDING|ReqNodeNotAvail, UnavailableNodes:node2|2|debug", None, "blocked"),
        # queued behind a job on both nodes, then node2 drained: the reason stays Resources with this text
        (f"PENDING|{DRAINED}|2|debug", 1, "blocked"),
        (f"PENDING|{DRAINED}|2|debug", 0, "blocked"),
        (f"PENDING|{DRAINED}|2|debug", 2, "queued"),  # only reserved for others: that ends
        (f"PENDING|{DRAINED}|2|debug", None, "queued"),  # sinfo did not answer: not called blocked on a guess
        ("PENDING|ReqNodeNotAvail, Reserved for maintenance|2|debug", 2, "queued"),
        ("PENDING|ReqNodeNotAvail, May be reserved for other job|1|debug", 1, "queued"),
    ],
)
def test_pending_reasons_that_never_clear_are_told_from_those_that_do(line, usable, verdict):
    state, reason, nodes, _ = (line.split("|") + [""] * 4)[:4]
    needed = int(nodes) if nodes.isdigit() else None
    assert classify_pending(state, reason, needed, usable) == verdict
