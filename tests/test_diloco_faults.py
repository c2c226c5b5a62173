"""Replica groups as real processes on loopback, hit by real signals.

Every fault is injected for real: SIGKILL of a group blocked inside the gloo
collective (proven by its own "IN_COLLECTIVE" line with no "COLLECTIVE_DONE"
after it), SIGKILL + same-id restart, SIGSTOP beyond the deadlines, and
SIGKILL of the lighthouse.  Every test checks I1 (one state per committed step
over every process, restarts included) and I2 (rolled back exactly to the
backup, a committed step never undone) with ``tests.chaos_support``, and the
time bounds the product promises.
"""

from __future__ import annotations

from collections import defaultdict
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

__all__ = ["assert_consistent", "records", "start_group"]  # used by test_heal, test_streaming

pytestmark = pytest.mark.integration

# Survivors abandon the collective within 100 ms of an eviction (issue 10),
# plus scheduling slack: log lines of 4 processes on a loaded 2-core machine.
RELEASE_S = 0.1 + 0.25


def assert_consistent(logs: list[Path]) -> dict[int, set[str]]:
    """I1 and I2 over every record; the committed hashes per step."""
    return assert_one_history(logs).by_step


def test_a_kill_inside_the_gloo_collective_rolls_survivors_back_to_the_backup(
    tmp_path: Path,
) -> None:
    """Group 1 is SIGKILLed while blocked in all_reduce (group 2 enters it late)."""
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    at = 4
    with process_pool(tmp_path / "out") as procs:
        lighthouse, url = start_lighthouse(
            procs, "--min-replicas", "2", "--join-timeout-ms", "5000"
        )
        common = {"WORKER_STEPS": "8", "FTDILOCO_TIMEOUT": "15", "NUM_REPLICA_GROUPS": "3"}
        survivor = start_group(procs, url, 0, logs[0], **common)
        victim = start_group(procs, url, 1, logs[1], **common)
        late = start_group(procs, url, 2, logs[2], WORKER_ENTER_LATE_AT=f"{at}:5", **common)
        late.wait_for(f"ENTERING_LATE step={at}", timeout=60)
        victim.wait_for(f"IN_COLLECTIVE step={at}", timeout=30)
        survivor.wait_for(f"IN_COLLECTIVE step={at}", timeout=30)
        assert blocked_in_collective(victim, at)
        victim.kill()
        # Its own last words: inside the collective, never out of it.
        assert blocked_in_collective(victim, at), victim.tail()
        for proc in (survivor, late):
            proc.wait_for("DONE", timeout=60)
            assert proc.wait(timeout=30) == 0, proc.tail()

    for log in (logs[0], logs[2]):
        recs = records(log)
        failed = [i for i, r in enumerate(recs) if not r["committed"] and r["step"] == at]
        assert failed, f"the step the kill interrupted was not rolled back: {recs}"
        rolled_back = recs[failed[0]]
        assert rolled_back["rolled_back_to_backup"]
        committed_at = [r["hash"] for r in recs if r["committed"] and r["step"] == at]
        assert committed_at == [rolled_back["hash"]]  # exactly the backup of step `at`
        after = recs[failed[-1] + 1]
        assert after["committed"] and after["step"] == at + 1 and after["participants"] == 2
        assert [r["step"] for r in recs if r["committed"]][-1] == 8
    # The survivor waiting inside the collective (on the late group too) let go
    # within 100 ms of the eviction, without waiting for any peer.
    evicted = log_events(lighthouse, "replica evicted", replica="group1")[0][0]
    rollbacks = log_events(survivor, "outer step rolled back")
    rolled_back_at = min((t for t, _ in rollbacks if t >= evicted), default=float("inf"))
    assert rolled_back_at - evicted <= RELEASE_S, (
        f"the survivor rolled back {rolled_back_at - evicted:.3f}s after the eviction"
    )
    history = assert_one_history(logs)
    assert history.steps[-1] == 8 and not history.forks


def test_two_rank_groups_take_part(tmp_path: Path) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(2)]
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2")
        workers = []
        for group in range(2):
            port = free_port()
            for rank in range(2):
                workers.append(
                    start_group(
                        procs,
                        url,
                        group,
                        logs[group],
                        rank=rank,
                        world_size=2,
                        master_port=port,
                        WORKER_STEPS="3",
                    )
                )
        for w in workers:
            w.wait_for("DONE", timeout=90)
            assert w.wait(timeout=30) == 0, w.tail()
    for log in logs:
        recs = records(log)
        # Both ranks of the group committed the same steps with both groups taking part.
        for rank in (0, 1):
            mine = [r for r in recs if r["rank"] == rank and r["committed"]]
            assert [r["step"] for r in mine] == [1, 2, 3]
            assert all(r["participants"] == 2 for r in mine)
    for rank in (0, 1):
        hashes = defaultdict(set)
        for log in logs:
            for r in records(log):
                if r["rank"] == rank and r["committed"]:
                    hashes[r["step"]].add(r["hash"])
        assert all(len(h) == 1 for h in hashes.values()), hashes


def test_lighthouse_restart_costs_at_most_one_outer_step(tmp_path: Path) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(2)]
    port = free_port()
    with process_pool() as procs:
        lighthouse, url = start_lighthouse(procs, "--min-replicas", "2", port=port)
        groups = [
            start_group(
                procs,
                url,
                g,
                logs[g],
                WORKER_STEPS="6",
                **({"WORKER_PAUSE_AT": "2"} if g == 0 else {}),
            )
            for g in range(2)
        ]
        groups[0].wait_for("PAUSED", timeout=60)
        lighthouse.kill()
        start_lighthouse(procs, "--min-replicas", "2", port=port)
        groups[0].send("go")
        for g in groups:
            g.wait_for("DONE", timeout=90)
            assert g.wait(timeout=30) == 0, g.tail()
    for log in logs:
        recs = records(log)
        assert [r["step"] for r in recs if r["committed"]] == list(range(1, 7))
        assert sum(not r["committed"] for r in recs) <= 1
    assert_consistent(logs)
