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

import itertools
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.chaos_support import (
    assert_one_history,
    blocked_in_collective,
    first_to_print,
    log_events,
    records,
    start_group,
)
from tests.procs import free_port, process_pool, start_lighthouse

pytestmark = pytest.mark.integration

# Survivors abandon the collective within 100 ms of an eviction (issue 10),
# plus scheduling slack: log lines of 4 processes on a loaded 2-core machine.
RELEASE_S = 0.1 + 0.25


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
        committed = [r["step"] for r in recs if r["committed"]]
        # Every step from its first to the last, no gaps: the survivors went on.
        assert committed == list(range(committed[0], 9)), committed
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
    assert_one_history(logs)


def _committed(line: str) -> bool:
    return line.startswith("STEP ") and line.split()[2:3] == ["committed"]


def _joint(rec: dict[str, object], n: int) -> bool:
    return bool(rec["committed"]) and rec["participants"] == n


def test_d_same_id_restart_of_one_of_two_groups_costs_no_timeout(tmp_path: Path) -> None:
    """Group 0 SIGKILLed and restarted at once, three times; the survivor waits for it."""
    timeout = 10.0
    common = {"WORKER_STEPS": "1000000", "FTDILOCO_TIMEOUT": str(int(timeout))}
    logs = [tmp_path / "survivor.jsonl"]
    restarts: list[tuple[float, float, Path]] = []  # (spawned, manager ready, log)
    with process_pool(tmp_path / "out") as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2")
        start_group(procs, url, 1, logs[0], **common)  # the survivor
        logs.append(tmp_path / "g0-0.jsonl")
        group0 = start_group(procs, url, 0, logs[-1], **common)
        for n in range(3):
            for _ in range(4):  # a few joint steps, then the kill right after a commit
                group0.wait_line(_committed, timeout=60)
            group0.kill()
            logs.append(tmp_path / f"g0-{n + 1}.jsonl")
            spawned = time.time()
            group0 = start_group(procs, url, 0, logs[-1], **common)
            group0.wait_for("manager ready", timeout=60)
            ready = time.time()
            restarts.append((spawned, ready, logs[-1]))
        for _ in range(3):
            group0.wait_line(_committed, timeout=60)

    mine = records(logs[0])
    before_first_kill = [r for r in mine if r["time"] < restarts[0][0] and _joint(r, 2)]
    commit_times = [float(r["time"]) for r in before_first_kill]
    gaps = sorted(b - a for a, b in itertools.pairwise(commit_times))
    period = gaps[len(gaps) // 2] if gaps else 0.5
    for spawned, ready, log in restarts:
        joint = [r for r in records(log) if _joint(r, 2)]
        assert joint, f"the restarted group never committed with the survivor: {records(log)}"
        took = float(joint[0]["time"]) - spawned
        imports = ready - spawned
        # Its own start (imports, connect) + one outer period + a margin for
        # the heal and the load; today a restart costs a whole FTDILOCO_TIMEOUT.
        bound = imports + period + 2.0
        assert took <= bound, (
            f"restart to first joint commit took {took:.2f}s (imports {imports:.2f}s, "
            f"outer period {period:.3f}s, bound {bound:.2f}s, FTDILOCO_TIMEOUT {timeout:g}s)"
        )
        # The survivor retried at most one outer step for this restart.
        window = [r for r in mine if spawned - 1.0 <= r["time"] <= joint[0]["time"]]
        lost = [r["step"] for r in window if not r["committed"]]
        assert len(lost) <= 1, f"the survivor rolled back steps {lost} for one restart"
    assert sum(not r["committed"] for r in mine) <= len(restarts)
    assert_one_history(logs)


def test_e_a_group_frozen_in_the_collective_is_cut_loose_and_never_commits_that_step(
    tmp_path: Path,
) -> None:
    """SIGSTOP beyond the collective deadline and the heartbeat timeout, then SIGCONT."""
    heartbeat_timeout = 1.5
    at = 4
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    common = {"WORKER_STEPS": "1000000", "FTDILOCO_TIMEOUT": "5", "NUM_REPLICA_GROUPS": "3"}
    with process_pool(tmp_path / "out") as procs:
        lighthouse, url = start_lighthouse(
            procs,
            "--min-replicas",
            "2",
            "--join-timeout-ms",
            "3000",
            "--heartbeat-timeout-ms",
            str(int(heartbeat_timeout * 1000)),
        )
        survivors = [start_group(procs, url, 0, logs[0], **common)]
        frozen = start_group(procs, url, 1, logs[1], **common)
        # Group 2 enters the step's collective 1 s late: the frozen group is
        # blocked in it when stopped, and both survivors are in it at the eviction.
        survivors.append(
            start_group(procs, url, 2, logs[2], WORKER_ENTER_LATE_AT=f"{at}:1", **common)
        )
        frozen.wait_for(f"IN_COLLECTIVE step={at}", timeout=60)
        frozen.freeze()
        stopped = time.time()
        survivors[1].wait_for(f"IN_COLLECTIVE step={at}", timeout=10)
        assert blocked_in_collective(frozen, at), frozen.tail()
        # The survivors go on without it: two joint commits after the eviction.
        for proc in survivors:
            for _ in range(2):
                proc.wait_line(_committed, timeout=3 * heartbeat_timeout + 5)
        # Frozen beyond the collective deadline (5 s) too, then thawed.
        time.sleep(max(0.0, stopped + 6.0 - time.time()))
        frozen.thaw()
        # It rejoins: healed and committing with the others again.
        for _ in range(3):
            frozen.wait_line(_committed, timeout=30)

    evictions = log_events(lighthouse, "replica evicted", replica="group1")
    assert evictions, "the frozen group was never evicted"
    evicted = evictions[0][0]
    assert evicted - stopped <= heartbeat_timeout + 1.0, evicted - stopped
    for proc, log in zip(survivors, (logs[0], logs[2]), strict=True):
        rollbacks = [t for t, _ in log_events(proc, "outer step rolled back") if t >= stopped]
        assert rollbacks, f"{proc.name} never rolled back the step the frozen group was in"
        assert rollbacks[0] - evicted <= RELEASE_S, (
            f"{proc.name} rolled back {rollbacks[0] - evicted:.3f}s after the eviction "
            f"(frozen for {rollbacks[0] - stopped:.3f}s)"
        )
        recs = records(log)
        assert any(not r["committed"] and r["step"] == at for r in recs)
    thawed = records(logs[1])
    after = [r for r in thawed if r["time"] >= stopped]
    assert after and not after[0]["committed"] and after[0]["step"] == at, after[:2]
    assert not any(r["committed"] and r["step"] == at + 1 and r["participants"] == 1 for r in after)
    rejoined = [r for r in after if r["committed"]]
    assert rejoined and rejoined[0]["step"] > at + 1 and rejoined[0]["participants"] == 3
    assert any(r["healed"] for r in after[: after.index(rejoined[0]) + 1])
    assert_one_history(logs)


def _lighthouse_flags() -> tuple[str, ...]:
    return ("--min-replicas", "2", "--join-timeout-ms", "3000", "--heartbeat-timeout-ms", "1500")


def test_f1_lighthouse_killed_during_a_heal(tmp_path: Path) -> None:
    """The lighthouse dies while a late group heals (slowly); it restarts on its port."""
    port = free_port()
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    common = {"WORKER_STEPS": "1000000", "FTDILOCO_TIMEOUT": "15", "NUM_REPLICA_GROUPS": "3"}
    slow = {"WORKER_SLOW_SERVE": "3", "WORKER_SLOW_SERVE_SECONDS": "3"}
    with process_pool(tmp_path / "out") as procs:
        lighthouse, url = start_lighthouse(procs, *_lighthouse_flags(), port=port)
        donors = [start_group(procs, url, g, logs[g], **slow, **common) for g in (0, 1)]
        donors[1].wait_for("STEP 3 committed", timeout=60)
        late = start_group(procs, url, 2, logs[2], **common)
        first_to_print(donors, "SERVING", timeout=60)  # a donor is sending the heal, slowly
        lighthouse.kill()
        restarted_at = time.time()
        start_lighthouse(procs, *_lighthouse_flags(), port=port)
        # The job goes on: the healed group and both donors commit three more steps.
        for proc in (late, *donors):
            for _ in range(3):
                proc.wait_line(_committed, timeout=40)
    for log in logs[:2]:
        recs = records(log)
        retried = [r["step"] for r in recs if not r["committed"] and r["time"] >= restarted_at - 5]
        assert len(retried) <= 1, f"{log.name}: steps {retried} retried for one lighthouse restart"
    # It healed to the donors' step (that step may be the one retried), and
    # committed on from there: its progress came from its peers, not from 0.
    late_recs = records(logs[2])
    assert late_recs[0]["healed"] and late_recs[0]["step"] > 3, late_recs[0]
    first = next(r for r in late_recs if r["committed"])
    assert first["step"] > late_recs[0]["step"] or first["healed"]
    assert_one_history(logs)


def test_f2_lighthouse_killed_while_a_group_is_frozen(tmp_path: Path) -> None:
    """SIGSTOP a group, SIGKILL the lighthouse, restart it on its port, then SIGCONT the group."""
    port = free_port()
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    common = {"WORKER_STEPS": "1000000", "FTDILOCO_TIMEOUT": "10", "NUM_REPLICA_GROUPS": "3"}
    with process_pool(tmp_path / "out") as procs:
        lighthouse, url = start_lighthouse(procs, *_lighthouse_flags(), port=port)
        groups = [start_group(procs, url, g, logs[g], **common) for g in range(3)]
        for proc in groups:
            proc.wait_for("STEP 3 committed", timeout=60)
        frozen, survivors = groups[1], (groups[0], groups[2])
        frozen.freeze()
        stopped = time.time()
        lighthouse.kill()
        start_lighthouse(procs, *_lighthouse_flags(), port=port)
        # The survivors commit without the frozen group, well within the timeout.
        for proc in survivors:
            for _ in range(3):
                proc.wait_line(_committed, timeout=15)
        frozen.thaw()
        for _ in range(3):
            frozen.wait_line(_committed, timeout=30)
    for log in (logs[0], logs[2]):
        recs = records(log)
        retried = [r["step"] for r in recs if not r["committed"] and r["time"] >= stopped]
        # One for the lighthouse restart, one more if the freeze caught the
        # group inside an outer step.
        assert len(retried) <= 2, f"{log.name}: steps {retried} retried"
    after = [r for r in records(logs[1]) if r["time"] >= stopped]
    rejoined = [r for r in after if r["committed"] and r["participants"] == 3]
    assert rejoined, after
    assert_one_history(logs)
