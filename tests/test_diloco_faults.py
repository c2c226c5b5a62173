"""Replica groups as real processes on loopback, killed with SIGKILL.

What users rely on: survivors keep committing within the timeout, a failed
outer step is rolled back to the backup, and at every committed step all
groups hold bitwise-identical global weights and outer optimizer state (I1).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.procs import Proc, free_port, process_pool, start_lighthouse

pytestmark = pytest.mark.integration

WORKER = "tests/workers/diloco_worker.py"


def start_group(
    procs: list[Proc],
    url: str,
    group: int,
    log: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    master_port: int = 0,
    **env: str,
) -> Proc:
    proc = Proc(
        f"group{group}.{rank}",
        [sys.executable, WORKER],
        env={
            "FTDILOCO_LIGHTHOUSE": url,
            "REPLICA_GROUP_ID": str(group),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port or free_port()),
            "FTDILOCO_TIMEOUT": "20",
            "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
            "WORKER_LOG": str(log),
            **env,
        },
    )
    procs.append(proc)
    return proc


def records(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_consistent(logs: list[Path]) -> dict[int, set[str]]:
    """I1: at every committed step every group that reports it holds the same state."""
    by_step: dict[int, set[str]] = defaultdict(set)
    for log in logs:
        for r in records(log):
            if r["committed"]:
                by_step[int(r["step"])].add(str(r["hash"]))
    for step, hashes in by_step.items():
        assert len(hashes) == 1, f"groups diverged at committed step {step}: {hashes}"
    return by_step


def test_survivors_commit_after_kills_between_syncs_and_mid_allreduce(tmp_path: Path) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "1", "--join-timeout-ms", "5000")
        together = {"WORKER_STEPS": "8", "WORKER_WAIT_START": "1"}
        between = start_group(procs, url, 0, logs[0], WORKER_PAUSE_AT="2", **together)
        mid = start_group(procs, url, 1, logs[1], WORKER_HANG_AT="4", **together)
        survivor = start_group(procs, url, 2, logs[2], **together)
        # All three alive before any joins: no group makes progress alone that
        # a later quorum of the others would not know about.
        for proc in (between, mid, survivor):
            proc.wait_for("READY", timeout=60)
        for proc in (between, mid, survivor):
            proc.send("go")

        between.wait_for("PAUSED", timeout=60)
        between.kill()  # between syncs: its connection closes, the lighthouse drops it at once
        mid.wait_for("HANGING", timeout=60)
        mid.kill()  # the survivor is inside the allreduce with it right now
        survivor.wait_for("DONE", timeout=60)
        assert survivor.wait(timeout=30) == 0, survivor.tail()

    survivor_records = records(logs[2])
    committed = [r["step"] for r in survivor_records if r["committed"]]
    # Every step from its first (it may have healed in late) to the last, no gaps.
    assert committed == list(range(committed[0], 9))
    rolled_back = [r for r in survivor_records if not r["committed"]]
    # The allreduce the dead group was part of failed and was rolled back to the backup.
    assert rolled_back, "the step interrupted by the kill should have been rolled back"
    assert all(r["rolled_back_to_backup"] for r in rolled_back)
    # After the mid-allreduce kill the survivor's next step committed within the timeout.
    after = [r for r in survivor_records if r["time"] > rolled_back[-1]["time"]]
    assert after and after[0]["committed"] and after[0]["seconds"] < 20  # FTDILOCO_TIMEOUT
    assert after[0]["participants"] == 1
    steps = assert_consistent(logs)
    assert 2 in steps and all(len(h) == 1 for h in steps.values())


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
