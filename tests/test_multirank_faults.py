"""Groups of several ranks: a frozen peer releases every rank of the survivors, not only rank 0.

Only group rank 0 holds the liveness link to the lighthouse; ranks 1.. are
blocked in their own cross-group collectives with the frozen group's ranks.
They learn of the loss from rank 0 (a long-poll on its manager server), so
the survivors roll back at the eviction, not at the collective deadline.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos_support import (
    assert_one_history,
    blocked_in_collective,
    log_events,
    records,
    start_group,
)
from tests.procs import free_port, process_pool, start_lighthouse

pytestmark = pytest.mark.integration

# The collective deadline: what the survivors' ranks 1 would wait without the forwarding.
DEADLINE_S = 20.0
HEARTBEAT_TIMEOUT_S = 1.5
# Eviction -> the group's rollback (both ranks voted), with room for a loaded machine.
RELEASE_S = 1.0


def test_every_rank_of_the_survivors_rolls_back_at_the_eviction_of_a_frozen_group(
    tmp_path: Path,
) -> None:
    at = 3
    # One log per rank: rank r of every group forms its own cross-group collective
    # (and holds its own global state), so I1 holds rank by rank.
    logs = [[tmp_path / f"g{g}r{r}.jsonl" for r in range(2)] for g in range(2)]
    common = {
        "WORKER_STEPS": "1000000",
        "FTDILOCO_TIMEOUT": str(int(DEADLINE_S)),
        "NUM_REPLICA_GROUPS": "2",
    }
    with process_pool(tmp_path / "out") as procs:
        lighthouse, url = start_lighthouse(
            procs, "--heartbeat-timeout-ms", str(int(HEARTBEAT_TIMEOUT_S * 1000))
        )
        groups = []
        for group in range(2):
            port = free_port()
            # Group 0 enters the step's collective 1 s late, so group 1 is
            # blocked in it when frozen, and group 0 then blocks on the frozen one.
            late = {"WORKER_ENTER_LATE_AT": f"{at}:1"} if group == 0 else {}
            groups.append(
                [
                    start_group(
                        procs,
                        url,
                        group,
                        logs[group][rank],
                        rank=rank,
                        world_size=2,
                        master_port=port,
                        **common,
                        **late,
                    )
                    for rank in range(2)
                ]
            )
        survivors, frozen = groups
        for proc in frozen:
            proc.wait_for(f"IN_COLLECTIVE step={at}", timeout=90)
        for proc in frozen:
            proc.freeze()
        stopped = time.time()
        assert all(blocked_in_collective(p, at) for p in frozen)
        for proc in survivors:
            proc.wait_for(f"IN_COLLECTIVE step={at}", timeout=10)
        # Both survivor ranks roll the step back, then commit alone.
        for proc in survivors:
            proc.wait_for(f"STEP {at} rolled_back", timeout=DEADLINE_S)
            proc.wait_for(f"STEP {at + 1} committed", timeout=DEADLINE_S)
        for proc in frozen:
            proc.thaw()

    evictions = log_events(lighthouse, "replica evicted", replica="group1")
    assert evictions, "the frozen group was never evicted"
    evicted = evictions[0][0]
    told = log_events(survivors[1], "quorum member lost (told by group rank 0)")
    assert told and told[0][1]["member"] == "group1", survivors[1].tail()
    for proc in survivors:
        rollbacks = [t for t, _ in log_events(proc, "outer step rolled back") if t >= stopped]
        assert rollbacks, proc.tail()
        assert rollbacks[0] - evicted <= RELEASE_S, (
            f"{proc.name} rolled back {rollbacks[0] - evicted:.3f}s after the eviction"
        )
    for rank in (0, 1):
        recs = records(logs[0][rank])
        assert any(not r["committed"] and r["step"] == at for r in recs)
        assert_one_history([logs[0][rank], logs[1][rank]])
