"""One history (I7): no committed step number ever carries two states.

The sequences that forked real jobs (issue 10), with real processes:
``--min-replicas 1`` and three groups started a few seconds apart, so group A
trains alone while B and C are still importing torch.  Then either A pauses
between syncs (alive, heartbeating, not joining) while B and C join, or A's
outer step outlasts the join timeout.  Either way a quorum of {B, C} must not
commit from step 0 while A, alive, holds a newer committed step: whatever the
product does (wait for A, or make one side heal), every committed step of
every process has exactly one hash.  The groups are not started together
(no WORKER_WAIT_START): that is the situation to survive.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests.chaos_support import assert_one_history, records, start_group
from tests.procs import Proc, process_pool, start_lighthouse

pytestmark = pytest.mark.integration

JOIN_TIMEOUT_MS = 3000
STEPS = 8
COMMON = {"NUM_REPLICA_GROUPS": "3", "WORKER_STEPS": str(STEPS), "FTDILOCO_TIMEOUT": "15"}


def _run_to_the_end(groups: list[Proc], started: float) -> None:
    for proc in groups:
        proc.wait_for("DONE", timeout=max(5.0, 75 - (time.monotonic() - started)))
        assert proc.wait(timeout=30) == 0, proc.tail()


def _assert_one_history(logs: list[Path]) -> None:
    """I1-I4 (chaos_support), and every group ran to the end on the same state."""
    history = assert_one_history(logs)
    finals = {records(log)[-1]["hash"] for log in logs}
    assert len(finals) == 1, finals
    assert history.steps[-1] == STEPS


def test_a_group_paused_between_syncs_while_the_others_start_is_not_forked(
    tmp_path: Path,
) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    started = time.monotonic()
    with process_pool(tmp_path / "out") as procs:
        _, url = start_lighthouse(
            procs, "--min-replicas", "1", "--join-timeout-ms", str(JOIN_TIMEOUT_MS)
        )
        a = start_group(procs, url, 0, logs[0], WORKER_PAUSE_AT="2", **COMMON)
        a.wait_for("STEP 1 committed", timeout=60)  # A trains alone...
        a.wait_for("PAUSED", timeout=30)  # ...then pauses between syncs at step 2
        others = [start_group(procs, url, g, logs[g], **COMMON) for g in (1, 2)]
        for proc in others:
            proc.wait_for("manager ready", timeout=60)  # connected; it joins next
        # A stays paused well past the join timeout after B and C joined: long
        # enough for {B, C} to form without it and commit its own step 2.
        # If they wait for A instead (one history kept), this times out.
        with contextlib.suppress(TimeoutError):
            others[0].wait_for("STEP 2 committed", timeout=JOIN_TIMEOUT_MS / 1000 + 4)
        a.send("go")
        _run_to_the_end([a, *others], started)
    _assert_one_history(logs)


def test_an_outer_step_that_outlasts_the_join_timeout_is_not_forked(tmp_path: Path) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    started = time.monotonic()
    with process_pool(tmp_path / "out") as procs:
        _, url = start_lighthouse(
            procs, "--min-replicas", "1", "--join-timeout-ms", str(JOIN_TIMEOUT_MS)
        )
        # A's second outer step (from committed step 1) takes 12 s before its
        # vote: longer than B's and C's start plus the join timeout.
        a = start_group(procs, url, 0, logs[0], WORKER_SLOW_VOTE_AT="1:12", **COMMON)
        a.wait_for("STEP 1 committed", timeout=60)
        a.wait_for("SLOW_VOTE step=1", timeout=30)
        others = [start_group(procs, url, g, logs[g], **COMMON) for g in (1, 2)]
        _run_to_the_end([a, *others], started)
    _assert_one_history(logs)
