"""One history (DESIGN.md I7), in the pure quorum core: no sleeps, no ports.

The scenarios are the ones long fault-injection runs found (issue: forked
history, a restart re-forming the old quorum id, a frozen peer committing
alone); the last test drives random sequences of joins, commits, pauses,
kills and restarts through the core and checks that no step number ever
carries two states unless the core recorded the older one as abandoned.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftdiloco.coordination.plan import plan_quorum
from ftwire.history import GENESIS, next_history, reference
from ftwire.messages import Member, Quorum
from lighthouse.quorum import EvictionCause, QuorumConfig, QuorumCore, Update
from tests.test_quorum import formed, join, not_formed


def core_of(
    min_replicas: int = 1, join_timeout: float = 5.0, heartbeat: float = 10.0
) -> QuorumCore:
    return QuorumCore(QuorumConfig(min_replicas, join_timeout, heartbeat))


def commit(core: QuorumCore, quorum_id: int, members: list[Member], now: float) -> str:
    """Every member fences and commits; returns the history they all reach."""
    ref = reference(members)
    assert ref is not None
    for m in members:
        assert core.fence(m.replica_id, quorum_id, ref.step, now).commit
    return next_history(ref.history, quorum_id, ref.step + 1)


def test_a_group_that_trained_alone_is_waited_for_not_forked() -> None:
    """Variant 1: A commits alone while B and C start, then pauses between syncs."""
    core = core_of()
    q1 = formed(join(core, "A", 0.0))  # B and C are still importing torch
    h1 = commit(core, q1.quorum_id, list(q1.members), 0.1)
    q2 = formed(join(core, "A", 0.2, step=1, history=h1))
    h2 = commit(core, q2.quorum_id, list(q2.members), 0.3)
    core.heartbeat("A", 0.4, committed=(2, h2))  # A pauses: alive, not joining
    not_formed(join(core, "B", 1.0))
    not_formed(join(core, "C", 1.0))
    # Past the join timeout, still no fork while A lives.
    for t in (6.5, 7.5, 8.5):
        core.heartbeat("A", t)
        update = not_formed(core.tick(t))
        assert "A holds committed step 2" in update.reason
    q3 = formed(join(core, "A", 9.0, step=2, history=h2))
    assert q3.replica_ids == ("A", "B", "C")
    info = Quorum(q3.quorum_id, q3.members, 0.0)
    assert {rid: plan_quorum(info, rid, 0).heal for rid in "ABC"} == {
        "A": False,
        "B": True,
        "C": True,
    }


def test_a_quorum_superseded_before_its_commit_commits_nowhere() -> None:
    """Variant 2: A's outer step outlasts the join timeout; {B, C} forms meanwhile."""
    core = core_of()
    q1 = formed(join(core, "A", 0.0))
    core.heartbeat("B", 1.0)
    core.heartbeat("C", 1.0)
    join(core, "B", 1.0)
    not_formed(join(core, "C", 1.0))  # A is alive and has not joined: stragglers wait
    core.heartbeat("A", 5.0)
    q2 = formed(core.tick(6.1))
    assert q2.replica_ids == ("B", "C")
    late = core.fence("A", q1.quorum_id, 0, 6.5)
    assert not late.commit and "not the current quorum" in late.reason
    assert core.fence("B", q2.quorum_id, 0, 6.6).commit


def test_a_new_job_waits_for_the_groups_it_expects() -> None:
    core = core_of(join_timeout=5.0)
    update = not_formed(join(core, "A", 0.0, expected_groups=3))
    assert "NUM_REPLICA_GROUPS" in update.reason
    not_formed(join(core, "B", 1.0, expected_groups=3))
    assert formed(join(core, "C", 2.0, expected_groups=3)).replica_ids == ("A", "B", "C")
    # ...but no longer than the join timeout.
    late = core_of(join_timeout=5.0)
    join(late, "A", 0.0, expected_groups=3)
    assert formed(late.tick(5.0)).replica_ids == ("A",)


def test_a_restarted_lighthouse_lets_replicas_reconnect_before_forming() -> None:
    core = QuorumCore(QuorumConfig(1, 5.0, 2.0), started=100.0)
    update = not_formed(join(core, "B", 100.1, step=7, history="h"))
    assert "reconnect" in update.reason and update.deadline == pytest.approx(102.0)
    assert formed(core.tick(102.0)).replica_ids == ("B",)
    # With every group the job expects already back, nothing waits.
    core = QuorumCore(QuorumConfig(1, 5.0, 2.0), started=100.0)
    join(core, "A", 100.1, step=7, history="h", expected_groups=2)
    assert formed(join(core, "B", 100.2, step=7, history="h", expected_groups=2))


def test_a_restart_gets_a_new_quorum_id_and_evicts_the_old_process() -> None:
    core = core_of(min_replicas=2)
    join(core, "a", 0.0, incarnation="1-a")
    q1 = formed(join(core, "b", 0.0, incarnation="1-b"))
    join(core, "a", 1.0, incarnation="1-a")
    same = formed(join(core, "b", 1.0, incarnation="1-b"))
    assert same.quorum_id == q1.quorum_id  # same processes: the fast path keeps the id
    # b is SIGKILLed and restarted before a can form without it.
    join(core, "a", 2.0, incarnation="1-a")
    restarted = core.heartbeat("b", 2.5, incarnation="2-b")
    assert [(e.replica_id, e.cause, e.in_quorum) for e in restarted.evicted] == [
        ("b", EvictionCause.RESTARTED, True)
    ]
    q2 = formed(join(core, "b", 3.0, incarnation="2-b"))
    assert q2.replica_ids == q1.replica_ids and q2.quorum_id > q1.quorum_id
    # The old process, thawed, is a leftover: refused, and it evicts nobody.
    assert core.is_stale("b", "1-b") and not core.is_stale("b", "2-b")


def test_the_fence_seals_a_quorum_or_refuses_it_everywhere() -> None:
    core = core_of(min_replicas=2)
    join(core, "a", 0.0)
    q = formed(join(core, "b", 0.0))
    # Sealed by a's fence: b still commits after a died, so the step is on both.
    assert core.fence("a", q.quorum_id, 0, 0.1).commit
    core.lost("a", 0.2, EvictionCause.CONNECTION_CLOSED)
    assert core.fence("b", q.quorum_id, 0, 0.3).commit

    core = core_of(min_replicas=2)
    join(core, "a", 0.0)
    q = formed(join(core, "b", 0.0))
    # a dies before anyone fenced: nobody commits this step.
    core.lost("a", 0.2, EvictionCause.CONNECTION_CLOSED)
    refused = core.fence("b", q.quorum_id, 0, 0.3)
    assert not refused.commit and "member a was evicted" in refused.reason


def test_a_frozen_group_evicted_mid_step_never_commits_it() -> None:
    core = core_of(min_replicas=1, heartbeat=2.0)
    for rid in "abc":
        join(core, rid, 0.0, expected_groups=3)
    q = core.previous
    assert q is not None and q.replica_ids == ("a", "b", "c")
    core.heartbeat("a", 1.5)
    core.heartbeat("b", 1.5)
    update = core.tick(2.0)  # c was SIGSTOPped at 0.0
    assert [(e.replica_id, e.cause) for e in update.evicted] == [
        ("c", EvictionCause.HEARTBEAT_TIMEOUT)
    ]
    core.heartbeat("c", 6.0)  # SIGCONT: c is back and tries to commit
    assert not core.fence("c", q.quorum_id, 0, 6.0).commit
    assert not core.fence("a", q.quorum_id, 0, 6.0).commit


def test_a_history_whose_holders_died_is_abandoned_explicitly() -> None:
    core = core_of(min_replicas=1)
    join(core, "a", 0.0, expected_groups=2)
    q = formed(join(core, "b", 0.0, expected_groups=2))
    assert core.fence("a", q.quorum_id, 0, 0.1).commit  # a commits step 1...
    core.heartbeat("b", 0.2, committed=(0, GENESIS))  # ...b's allreduce failed
    core.lost("a", 0.3, EvictionCause.CONNECTION_CLOSED)  # a dies with step 1
    q2 = formed(join(core, "b", 0.4, step=0))
    assert q2.replica_ids == ("b",)
    (discard,) = core.discards()
    assert (discard.replica_ids, discard.first_step, discard.last_step) == (("a", "b"), 1, 1)
    assert "a, b's step 1 discarded" in discard.describe()
    assert core.discarded_steps == 1


# -- random fault sequences ------------------------------------------------------------------

GROUPS = ("g0", "g1", "g2")


class Job:
    """Groups driven through the core as real ones are: join, heal, fence, commit."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.core = QuorumCore(QuorumConfig(1, 3.0, 2.0))
        self.now = 0.0
        self.state = {g: (0, GENESIS) for g in GROUPS}
        self.incarnation = {g: 1 for g in GROUPS}
        self.frozen: set[str] = set()
        self.quorum: dict[str, tuple[int, int]] = {}  # group -> (quorum id, step) to commit
        # Every (step, history) any group ever committed, and each one's parent.
        self.committed: dict[int, set[str]] = {}
        self.parent: dict[str, str] = {}

    def member(self, g: str) -> Member:
        step, history = self.state[g]
        return Member(g, step=step, history=history, incarnation=f"{self.incarnation[g]:x}-{g}")

    def handle(self, update: Update) -> None:
        if update.formed is None:
            return
        ref = reference(update.formed.members)
        assert ref is not None
        for m in update.formed.members:
            self.state[m.replica_id] = (ref.step, ref.history)  # heal if behind
            self.quorum[m.replica_id] = (update.formed.quorum_id, ref.step)

    def act(self) -> None:
        self.now += self.rng.choice((0.0, 0.1, 0.5, 1.0, 2.5))
        g = self.rng.choice(GROUPS)
        action = self.rng.choice(("join", "join", "commit", "commit", "beat", "freeze", "kill"))
        if g in self.frozen:
            if action in ("freeze", "kill"):
                self.frozen.discard(g)  # thawed
            return
        core = self.core
        if action == "join":
            self.handle(core.join(self.member(g), self.now))
        elif action == "beat":
            self.handle(
                core.heartbeat(
                    g,
                    self.now,
                    incarnation=self.member(g).incarnation,
                    committed=self.state[g],
                )
            )
        elif action == "commit" and g in self.quorum:
            quorum_id, step = self.quorum.pop(g)
            if core.fence(g, quorum_id, step, self.now).commit:
                history = next_history(self.state[g][1], quorum_id, step + 1)
                self.parent[history] = self.state[g][1]
                self.state[g] = (step + 1, history)
                self.committed.setdefault(step + 1, set()).add(history)
        elif action == "freeze":
            self.frozen.add(g)
        elif action == "kill":
            self.handle(core.lost(g, self.now, EvictionCause.CONNECTION_CLOSED))
            self.quorum.pop(g, None)
            self.incarnation[g] += 1
            self.state[g] = (0, GENESIS)  # no checkpoint: progress comes from peers
        self.handle(core.tick(self.now))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(20, 200))
def test_random_faults_never_fork_a_step_that_was_not_abandoned(seed: int, steps: int) -> None:
    job = Job(seed)
    for _ in range(steps):
        job.act()
    abandoned = set()
    for d in job.core.discards():
        history = d.history
        for step in range(d.last_step, d.first_step - 1, -1):  # and its ancestors
            abandoned.add((step, history))
            history = job.parent.get(history, GENESIS)
    for step, histories in job.committed.items():
        if len(histories) > 1:
            # Every state but one at this step was explicitly discarded.
            assert len(histories - {h for s, h in abandoned if s == step}) <= 1, (
                step,
                histories,
                job.core.discards(),
            )
