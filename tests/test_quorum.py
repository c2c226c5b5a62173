"""The quorum rules of DESIGN.md ("The lighthouse"), driven through QuorumCore with a fake clock.

Every event carries its own ``now``, so nothing here sleeps, opens a port or
starts a thread.  The first half pins each rule and edge with a hand-written
scenario; the second half is a Hypothesis state machine that fires random
join/heartbeat/withdraw/lost/tick sequences (with random clock steps, some of
them backwards) at the core and checks every Update against a small,
stateless model of the rules written independently of the core.
"""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ftwire.messages import Member, Quorum
from lighthouse.quorum import Eviction, EvictionCause, QuorumConfig, QuorumCore, Update

# -- helpers ----------------------------------------------------------------------------------


def make_core(
    min_replicas: int = 1,
    join_timeout: float = 10.0,
    heartbeat_timeout: float = 5.0,
    first_quorum_id: int = 0,
) -> QuorumCore:
    config = QuorumConfig(
        min_replicas=min_replicas, join_timeout=join_timeout, heartbeat_timeout=heartbeat_timeout
    )
    return QuorumCore(config, first_quorum_id=first_quorum_id)


def join(core: QuorumCore, replica_id: str, now: float, **fields: object) -> Update:
    return core.join(Member(replica_id=replica_id, **fields), now)  # type: ignore[arg-type]


def formed(update: Update) -> Quorum:
    assert update.formed is not None, f"expected a quorum, core says: {update.reason}"
    return update.formed


def not_formed(update: Update) -> Update:
    assert update.formed is None, f"unexpected quorum {update.formed}: {update.reason}"
    return update


def form(core: QuorumCore, replica_ids: list[str], now: float) -> Quorum:
    """Everyone in ``replica_ids`` is seen alive, then joins in that order at ``now``; only
    the last join may release the quorum."""
    for rid in replica_ids:
        core.heartbeat(rid, now)
    for rid in replica_ids[:-1]:
        not_formed(join(core, rid, now))
    quorum = formed(join(core, replica_ids[-1], now))
    assert quorum.replica_ids == tuple(sorted(replica_ids))
    return quorum


def evicted(update: Update) -> dict[str, Eviction]:
    return {e.replica_id: e for e in update.evicted}


# -- rule 1: only replicas seen within heartbeat_timeout count -----------------------------------


def test_silent_replica_is_evicted_for_heartbeat_timeout_by_tick_exactly_at_expiry() -> None:
    core = make_core(heartbeat_timeout=5.0)
    update = core.heartbeat("a", 0.0)
    assert update.deadline == 5.0
    assert not_formed(core.tick(4.999)).evicted == ()
    update = core.tick(5.0)
    assert update.evicted == (Eviction("a", EvictionCause.HEARTBEAT_TIMEOUT, in_quorum=False),)
    assert core.last_seen() == {}
    assert update.deadline is None


def test_expired_replica_is_evicted_by_the_next_event_from_anyone() -> None:
    core = make_core(heartbeat_timeout=5.0)
    core.heartbeat("a", 0.0)
    update = core.heartbeat("b", 7.0)
    assert list(evicted(update)) == ["a"]
    assert evicted(update)["a"].cause is EvictionCause.HEARTBEAT_TIMEOUT
    assert set(core.last_seen()) == {"b"}


def test_deadline_points_at_the_oldest_heartbeat_expiry() -> None:
    core = make_core(heartbeat_timeout=5.0, join_timeout=60.0)
    core.heartbeat("a", 0.0)
    assert core.heartbeat("b", 2.0).deadline == 5.0
    # a refreshes: b is now the oldest.
    assert core.heartbeat("a", 3.0).deadline == 7.0
    update = core.tick(7.0)
    assert list(evicted(update)) == ["b"]
    assert update.deadline == 8.0


def test_expired_replicas_stop_counting_so_the_survivor_forms_alone() -> None:
    core = make_core(heartbeat_timeout=5.0, join_timeout=60.0)
    for rid in ("a", "b", "c"):
        core.heartbeat(rid, 0.0)
    # 1 joined of 3 alive: the split-brain guard holds a back ...
    update = not_formed(join(core, "a", 4.0))
    assert "split-brain" in update.reason
    # ... until b and c go silent for heartbeat_timeout; the deadline says when.
    assert update.deadline == 5.0
    update = core.tick(5.0)
    assert set(evicted(update)) == {"b", "c"}
    assert {e.cause for e in update.evicted} == {EvictionCause.HEARTBEAT_TIMEOUT}
    assert formed(update).replica_ids == ("a",)


def test_expired_joiner_is_dropped_from_the_joiners_and_never_released() -> None:
    core = make_core(min_replicas=2, heartbeat_timeout=5.0)
    not_formed(join(core, "a", 0.0))
    update = not_formed(join(core, "b", 5.0))
    assert list(evicted(update)) == ["a"]
    assert set(core.joiners()) == {"b"}
    assert "min_replicas is 2" in update.reason
    # a comes back and joins again: now both are alive and joined.
    assert formed(join(core, "a", 6.0)).replica_ids == ("a", "b")


# -- rule 2: the fast path --------------------------------------------------------------------


def test_fast_quorum_forms_at_once_when_every_previous_member_rejoins() -> None:
    core = make_core(min_replicas=2, join_timeout=60.0)
    first = form(core, ["a", "b"], 0.0)
    core.heartbeat("c", 1.0)  # alive, never joins
    assert "min_replicas is 2" in not_formed(join(core, "a", 2.0)).reason
    update = join(core, "b", 2.0)
    # No waiting for the straggler c, no split-brain check (2 of 3 would pass anyway).
    again = formed(update)
    assert again.replica_ids == ("a", "b")
    assert again.quorum_id == first.quorum_id
    assert update.reason.startswith("fast quorum")


def test_fast_quorum_skips_the_split_brain_guard() -> None:
    core = make_core(join_timeout=60.0)
    form(core, ["a"], 0.0)
    core.heartbeat("b", 1.0)
    core.heartbeat("c", 1.0)
    # 1 joined of 3 alive would never pass the guard, but a is the whole previous quorum.
    update = join(core, "a", 2.0)
    assert formed(update).replica_ids == ("a",)
    assert update.reason.startswith("fast quorum")


def test_fast_quorum_includes_new_joiners_and_bumps_the_id() -> None:
    core = make_core(min_replicas=2, join_timeout=60.0)
    first = form(core, ["a", "b"], 0.0)
    not_formed(join(core, "c", 1.0))
    not_formed(join(core, "a", 1.0))
    update = join(core, "b", 1.0)
    quorum = formed(update)
    assert quorum.replica_ids == ("a", "b", "c")
    assert quorum.quorum_id == first.quorum_id + 1
    assert update.reason.startswith("fast quorum")


def test_fast_quorum_does_not_recheck_min_replicas() -> None:
    core = make_core(min_replicas=2, join_timeout=60.0)
    first = form(core, ["a", "b"], 0.0)
    # An operator raises min_replicas while a and b train: the running quorum re-forms.
    core.config = QuorumConfig(min_replicas=3, join_timeout=60.0, heartbeat_timeout=5.0)
    not_formed(join(core, "a", 1.0))
    update = join(core, "b", 1.0)
    assert formed(update).replica_ids == ("a", "b")
    assert formed(update).quorum_id == first.quorum_id
    assert update.reason.startswith("fast quorum")
    # Once a member is gone the normal rules, and the new minimum, apply again.
    core.lost("b", 2.0, EvictionCause.CONNECTION_CLOSED)
    assert "min_replicas is 3" in not_formed(join(core, "a", 2.0)).reason


def test_no_fast_path_while_a_previous_member_has_withdrawn() -> None:
    core = make_core(min_replicas=1, join_timeout=60.0)
    form(core, ["a", "b"], 0.0)
    not_formed(join(core, "b", 1.0))
    core.withdraw("b", 1.5)
    # a rejoins, but b no longer waits: 1 of 2 alive, so the guard holds.
    update = not_formed(join(core, "a", 2.0))
    assert "split-brain" in update.reason


# -- shrink_only ------------------------------------------------------------------------------


def test_shrink_only_admits_only_previous_members_and_new_joiner_waits_for_a_later_quorum() -> None:
    core = make_core(join_timeout=60.0)
    first = form(core, ["a", "b", "c"], 0.0)
    core.lost("c", 1.0, EvictionCause.CONNECTION_CLOSED)
    not_formed(join(core, "d", 2.0))
    not_formed(join(core, "a", 2.0, shrink_only=True))
    update = join(core, "b", 2.0)
    shrunk = formed(update)
    assert shrunk.replica_ids == ("a", "b")
    assert shrunk.quorum_id == first.quorum_id + 1
    # d is still waiting, not dropped.
    assert set(core.joiners()) == {"d"}
    # a and b come back without shrink_only: fast path, d is in.
    not_formed(join(core, "a", 3.0))
    grown = formed(join(core, "b", 3.0))
    assert grown.replica_ids == ("a", "b", "d")
    assert grown.quorum_id == shrunk.quorum_id + 1
    assert [m.replica_id for m in grown.members] == ["a", "b", "d"]


def test_shrink_only_on_the_fast_path_leaves_new_joiners_out() -> None:
    core = make_core(join_timeout=60.0)
    first = form(core, ["a", "b"], 0.0)
    not_formed(join(core, "c", 1.0))
    not_formed(join(core, "a", 1.0, shrink_only=True))
    update = join(core, "b", 1.0)
    assert update.reason.startswith("fast quorum")
    assert formed(update).replica_ids == ("a", "b")
    assert formed(update).quorum_id == first.quorum_id
    assert set(core.joiners()) == {"c"}


def test_shrink_only_waits_when_too_few_previous_members_remain_for_min_replicas() -> None:
    core = make_core(min_replicas=2, join_timeout=0.0)
    form(core, ["a", "b"], 0.0)
    core.lost("b", 1.0, EvictionCause.CONNECTION_CLOSED)
    not_formed(join(core, "c", 2.0))
    update = not_formed(join(core, "a", 2.0, shrink_only=True))
    assert "shrink_only" in update.reason
    assert "min_replicas is 2" in update.reason


def test_shrink_only_before_any_quorum_is_ignored() -> None:
    core = make_core(join_timeout=0.0)
    core.heartbeat("b", 0.0)
    not_formed(join(core, "a", 0.0, shrink_only=True))
    assert formed(join(core, "b", 0.0, shrink_only=True)).replica_ids == ("a", "b")


# -- rule 3: min_replicas and the split-brain guard ---------------------------------------------


def test_min_replicas_holds_the_quorum_until_enough_replicas_joined() -> None:
    core = make_core(min_replicas=3, join_timeout=1.0)
    not_formed(join(core, "a", 0.0))
    update = not_formed(join(core, "b", 0.0))
    assert "min_replicas is 3" in update.reason
    # The join timeout passing changes nothing.
    assert "min_replicas is 3" in not_formed(core.tick(4.0)).reason
    assert formed(join(core, "c", 4.0)).replica_ids == ("a", "b", "c")


def test_split_brain_guard_two_of_four_waits_three_of_four_forms() -> None:
    core = make_core(join_timeout=0.0, heartbeat_timeout=100.0)
    for rid in ("a", "b", "c", "d"):
        core.heartbeat(rid, 0.0)
    not_formed(join(core, "a", 1.0))
    update = not_formed(join(core, "b", 1.0))
    assert "2 joined of 4 alive" in update.reason
    assert "split-brain" in update.reason
    # However long it waits, half is not enough.
    assert "split-brain" in not_formed(core.tick(50.0)).reason
    update = join(core, "c", 50.0)
    assert formed(update).replica_ids == ("a", "b", "c")
    assert "d" not in formed(update).replica_ids


def test_split_brain_guard_two_of_three_is_a_majority() -> None:
    core = make_core(join_timeout=0.0)
    for rid in ("a", "b", "c"):
        core.heartbeat(rid, 0.0)
    not_formed(join(core, "a", 1.0))
    assert formed(join(core, "b", 1.0)).replica_ids == ("a", "b")


# -- rule 4: the join timeout -----------------------------------------------------------------


def test_join_timeout_waits_for_alive_stragglers_then_forms_without_them() -> None:
    core = make_core(join_timeout=2.0, heartbeat_timeout=5.0)
    for rid in ("a", "b", "c"):
        core.heartbeat(rid, 0.0)
    not_formed(join(core, "a", 1.0))
    update = not_formed(join(core, "b", 2.0))
    assert "join timeout" in update.reason
    assert "c" in update.reason.split(":")[-1]
    # Counted from the FIRST join (1.0), not the latest (2.0).
    assert update.deadline == 3.0
    assert not_formed(core.tick(2.999)).evicted == ()
    update = core.tick(3.0)
    assert formed(update).replica_ids == ("a", "b")
    assert update.evicted == ()
    assert "join timeout" in update.reason
    assert "c" in core.last_seen()


def test_straggler_joining_before_the_timeout_releases_everyone_at_once() -> None:
    core = make_core(join_timeout=60.0)
    for rid in ("a", "b", "c"):
        core.heartbeat(rid, 0.0)
    not_formed(join(core, "a", 1.0))
    not_formed(join(core, "b", 1.0))
    update = join(core, "c", 1.5)
    assert formed(update).replica_ids == ("a", "b", "c")
    assert formed(update).created == 1.5


def test_retried_join_keeps_the_original_join_time_and_the_latest_member_details() -> None:
    core = make_core(join_timeout=2.0, heartbeat_timeout=5.0)
    for rid in ("a", "b", "c"):
        core.heartbeat(rid, 0.0)
    not_formed(join(core, "a", 1.0, step=3))
    not_formed(join(core, "b", 1.5))
    # a's request is retried at 2.5: the timeout still counts from 1.0.
    update = not_formed(join(core, "a", 2.5, step=4))
    assert core.joiners()["a"][1] == 1.0
    assert update.deadline == 3.0
    quorum = formed(core.tick(3.0))
    assert quorum.replica_ids == ("a", "b")
    assert quorum.members[0].step == 4


def test_joiners_left_out_of_a_shrink_count_their_timeout_from_that_quorum() -> None:
    core = make_core(join_timeout=2.0, heartbeat_timeout=100.0)
    form(core, ["a"], 0.0)
    not_formed(join(core, "b", 1.0))
    not_formed(join(core, "c", 1.0))
    update = join(core, "a", 5.0, shrink_only=True)
    assert formed(update).replica_ids == ("a",)
    assert core.joiners() == {
        "b": (Member("b"), 5.0),
        "c": (Member("c"), 5.0),
    }
    # b and c are 2 of 3 alive; a is a straggler for them now, until 5.0 + 2.0.
    assert update.deadline == 7.0
    not_formed(core.tick(6.0))
    assert formed(core.tick(7.0)).replica_ids == ("b", "c")


def test_joiners_left_out_of_a_shrink_form_at_once_with_zero_join_timeout() -> None:
    core = make_core(min_replicas=2, join_timeout=0.0, heartbeat_timeout=100.0)
    first = form(core, ["a", "b"], 0.0)
    for rid in ("c", "d", "e"):
        core.heartbeat(rid, 1.0)
    not_formed(join(core, "a", 1.0, shrink_only=True))
    not_formed(join(core, "c", 1.0))
    not_formed(join(core, "d", 1.0))
    # 4 of 5 joined, but shrink_only leaves only a, below min_replicas.
    assert "shrink_only" in not_formed(join(core, "e", 1.0)).reason
    update = join(core, "b", 1.0)
    assert formed(update).replica_ids == ("a", "b")
    # c, d and e can form right away: the core must ask for a tick now, not in 100 s.
    assert update.deadline == 1.0
    later = formed(core.tick(1.0))
    assert later.replica_ids == ("c", "d", "e")
    assert later.quorum_id == first.quorum_id + 1


# -- join_grace: asynchronous DiLoCo's straggler window ------------------------------------------


def test_join_grace_cuts_the_wait_for_a_straggler() -> None:
    core = make_core(join_timeout=60.0, heartbeat_timeout=100.0)
    first = form(core, ["a", "b", "c"], 0.0)
    not_formed(join(core, "a", 1.0, join_grace=0.5))
    update = not_formed(join(core, "b", 1.2, join_grace=0.5))
    # Counted from the first join, like the join timeout it replaces.
    assert update.deadline == 1.5
    assert "0.5s" in update.reason
    not_formed(core.tick(1.499))
    update = core.tick(1.5)
    assert formed(update).replica_ids == ("a", "b")
    assert formed(update).quorum_id == first.quorum_id + 1
    # The straggler is not evicted: it joins a later quorum.
    assert "c" in core.last_seen()


def test_the_smallest_grace_among_the_joiners_wins_and_none_means_the_join_timeout() -> None:
    core = make_core(join_timeout=10.0, heartbeat_timeout=100.0)
    form(core, ["a", "b", "c", "d"], 0.0)
    not_formed(join(core, "a", 1.0))
    assert not_formed(join(core, "b", 1.0, join_grace=3.0)).deadline == 4.0
    assert not_formed(join(core, "c", 1.0, join_grace=2.0)).deadline == 3.0
    assert formed(core.tick(3.0)).replica_ids == ("a", "b", "c")


def test_a_grace_longer_than_the_join_timeout_changes_nothing() -> None:
    core = make_core(join_timeout=2.0, heartbeat_timeout=100.0)
    form(core, ["a", "b", "c"], 0.0)
    not_formed(join(core, "a", 1.0, join_grace=30.0))
    assert not_formed(join(core, "b", 1.0, join_grace=30.0)).deadline == 3.0


def test_the_grace_of_one_formation_does_not_carry_into_the_next() -> None:
    core = make_core(join_timeout=10.0, heartbeat_timeout=100.0)
    form(core, ["a", "b", "c"], 0.0)
    not_formed(join(core, "a", 1.0, join_grace=0.5))
    not_formed(join(core, "b", 1.0))
    formed(core.tick(1.5))
    # The next formation's joiners ask for no grace: the join timeout applies again.
    not_formed(join(core, "a", 2.0))
    not_formed(join(core, "c", 2.0))
    assert core.tick(2.0).deadline == 12.0


def test_a_zero_grace_forms_with_whoever_joined_at_once() -> None:
    core = make_core(min_replicas=2, join_timeout=60.0, heartbeat_timeout=100.0)
    form(core, ["a", "b", "c"], 0.0)
    not_formed(join(core, "a", 1.0, join_grace=0.0))
    # min_replicas and the split-brain guard still hold: 2 of 3 is the first that may form.
    assert formed(join(core, "b", 1.0, join_grace=0.0)).replica_ids == ("a", "b")


# -- the two-group straggler ----------------------------------------------------------------------


def test_two_groups_one_joined_one_alive_waits_on_the_split_brain_guard_until_lost() -> None:
    core = make_core(join_timeout=1.0, heartbeat_timeout=5.0)
    core.heartbeat("b", 0.0)
    update = not_formed(join(core, "a", 0.0))
    assert "1 joined of 2 alive" in update.reason
    assert "split-brain" in update.reason
    # The join timeout does not release a: 1 of 2 is not a majority.
    for t in (1.0, 2.0, 3.0, 4.0):
        core.heartbeat("b", t)
        core.heartbeat("a", t)
        assert "split-brain" in not_formed(core.tick(t)).reason
    # b's connection closes: a is the only alive replica and forms alone.
    update = core.lost("b", 4.5, EvictionCause.CONNECTION_CLOSED)
    assert update.evicted == (Eviction("b", EvictionCause.CONNECTION_CLOSED, in_quorum=False),)
    assert formed(update).replica_ids == ("a",)


def test_two_groups_one_joined_one_alive_is_released_when_the_straggler_goes_silent() -> None:
    core = make_core(join_timeout=1.0, heartbeat_timeout=5.0)
    core.heartbeat("b", 0.0)
    not_formed(join(core, "a", 0.0))
    core.heartbeat("a", 3.0)
    update = not_formed(core.tick(3.0))
    assert update.deadline == 5.0
    update = core.tick(5.0)
    assert list(evicted(update)) == ["b"]
    assert formed(update).replica_ids == ("a",)


def test_two_groups_one_joined_one_alive_forms_with_both_when_the_straggler_joins() -> None:
    core = make_core(join_timeout=1.0, heartbeat_timeout=5.0)
    core.heartbeat("b", 0.0)
    not_formed(join(core, "a", 0.0))
    not_formed(core.tick(3.0))
    assert formed(join(core, "b", 4.0)).replica_ids == ("a", "b")


def test_deadline_never_stays_in_the_past_when_the_join_timeout_cannot_help() -> None:
    # A deadline at or before `now` tells the server to tick again at once; if that
    # tick changes nothing the server spins.  Here the join timeout has passed but
    # the split-brain guard still holds, so only the heartbeat expiry is a deadline.
    core = make_core(join_timeout=1.0, heartbeat_timeout=5.0)
    core.heartbeat("b", 0.0)
    assert not_formed(join(core, "a", 0.0)).deadline == 1.0
    update = not_formed(core.tick(1.0))
    assert update.evicted == ()
    assert update.deadline == 5.0


# -- quorum ids -----------------------------------------------------------------------------


def test_same_members_keep_the_quorum_id() -> None:
    core = make_core(join_timeout=0.0)
    first = form(core, ["a", "b"], 0.0)
    second = form(core, ["b", "a"], 1.0)
    assert second.quorum_id == first.quorum_id
    assert second.created == 1.0
    assert core.quorum_id == first.quorum_id


def test_member_list_change_bumps_the_quorum_id() -> None:
    core = make_core(join_timeout=0.0)
    first = form(core, ["a", "b"], 0.0)
    core.lost("b", 1.0, EvictionCause.CONNECTION_CLOSED)
    smaller = formed(join(core, "a", 1.0))
    assert smaller.replica_ids == ("a",)
    assert smaller.quorum_id == first.quorum_id + 1


def test_commit_failures_bump_the_quorum_id_even_with_the_same_members() -> None:
    core = make_core(join_timeout=0.0)
    first = form(core, ["a", "b"], 0.0)
    not_formed(join(core, "a", 1.0, commit_failures=1))
    again = formed(join(core, "b", 1.0))
    assert again.replica_ids == ("a", "b")
    assert again.quorum_id == first.quorum_id + 1
    # Failures cleared: the id stays.
    assert form(core, ["a", "b"], 2.0).quorum_id == again.quorum_id


def test_first_quorum_id_is_continued_not_reused() -> None:
    core = make_core(join_timeout=0.0, first_quorum_id=41)
    assert core.quorum_id == 41
    assert form(core, ["a"], 0.0).quorum_id == 42
    # b joins first: a joining first would re-form {a} on the fast path.
    assert form(core, ["b", "a"], 1.0).quorum_id == 43


# -- lost and withdraw ----------------------------------------------------------------------


def test_lost_quorum_member_is_evicted_with_in_quorum_true() -> None:
    core = make_core(join_timeout=0.0)
    form(core, ["a", "b"], 0.0)
    core.heartbeat("c", 0.5)
    update = core.lost("b", 1.0, EvictionCause.KILLED)
    assert update.evicted == (Eviction("b", EvictionCause.KILLED, in_quorum=True),)
    update = core.lost("c", 1.0, EvictionCause.CONNECTION_CLOSED)
    assert update.evicted == (Eviction("c", EvictionCause.CONNECTION_CLOSED, in_quorum=False),)
    assert set(core.last_seen()) == {"a"}


def test_lost_replica_that_is_not_known_evicts_nobody() -> None:
    core = make_core()
    update = not_formed(core.lost("ghost", 1.0, EvictionCause.CONNECTION_CLOSED))
    assert update.evicted == ()
    assert update.reason


def test_heartbeat_expiry_of_a_quorum_member_reports_in_quorum() -> None:
    core = make_core(join_timeout=0.0, heartbeat_timeout=5.0)
    form(core, ["a", "b"], 0.0)
    core.heartbeat("a", 4.0)
    update = core.tick(5.0)
    assert update.evicted == (Eviction("b", EvictionCause.HEARTBEAT_TIMEOUT, in_quorum=True),)


def test_withdraw_removes_the_joiner_but_the_replica_stays_alive() -> None:
    core = make_core(join_timeout=0.0)
    core.heartbeat("b", 0.0)
    not_formed(join(core, "a", 0.0))
    update = not_formed(core.withdraw("a", 1.0))
    assert update.evicted == ()
    assert "a" not in core.joiners()
    assert "a" in core.last_seen()
    # a still counts as alive: b alone is 1 of 2 and must wait.
    assert "split-brain" in not_formed(join(core, "b", 1.0)).reason
    # A later join from a is a fresh join and completes the quorum.
    assert formed(join(core, "a", 2.0)).replica_ids == ("a", "b")


def test_withdraw_of_a_replica_that_did_not_join_changes_nothing() -> None:
    core = make_core()
    core.heartbeat("a", 0.0)
    update = not_formed(core.withdraw("a", 0.0))
    assert update.evicted == ()
    assert core.last_seen() == {"a": 0.0}


# -- clock and config -----------------------------------------------------------------------


def test_clock_stepping_backwards_is_treated_as_no_time_passing() -> None:
    core = make_core(join_timeout=2.0, heartbeat_timeout=5.0)
    core.heartbeat("c", 10.0)
    not_formed(join(core, "a", 10.0))
    # An earlier timestamp neither expires anyone nor rewinds anything.
    update = not_formed(join(core, "b", 3.0))
    assert update.evicted == ()
    assert core.joiners()["b"][1] == 10.0
    assert core.last_seen()["b"] == 10.0
    assert update.deadline == 12.0
    assert not_formed(core.tick(0.0)).evicted == ()
    quorum = formed(core.tick(12.0))
    assert quorum.replica_ids == ("a", "b")
    assert quorum.created == 12.0


@pytest.mark.parametrize(
    "fields",
    [
        {"min_replicas": 0},
        {"min_replicas": -1},
        {"join_timeout": -0.001},
        {"join_timeout": math.nan},
        {"heartbeat_timeout": 0.0},
        {"heartbeat_timeout": -1.0},
        {"heartbeat_timeout": math.nan},
    ],
    ids=repr,
)
def test_config_rejects_invalid_values(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        QuorumConfig(**fields)  # type: ignore[arg-type]


def test_config_accepts_boundary_values() -> None:
    config = QuorumConfig(min_replicas=1, join_timeout=0.0, heartbeat_timeout=0.001)
    assert config.join_timeout == 0.0


def test_every_update_says_why_in_words() -> None:
    core = make_core(min_replicas=2, join_timeout=1.0)
    updates = [
        core.tick(0.0),
        core.heartbeat("a", 0.0),
        join(core, "a", 0.0),
        core.withdraw("a", 0.5),
        join(core, "a", 0.5),
        join(core, "b", 0.5),
        core.lost("b", 1.0, EvictionCause.KILLED),
        core.tick(100.0),
    ]
    for update in updates:
        assert len(update.reason) > 10 and " " in update.reason, update
    assert core.reason == updates[-1].reason


# -- Hypothesis: random event sequences against an independent model ----------------------------

REPLICAS = ("r0", "r1", "r2", "r3")
# Multiples of 0.5 keep every sum and difference exact, so the model and the core can
# never disagree by a rounding error.
half_seconds = st.integers(min_value=0, max_value=16).map(lambda n: n / 2)
# Mostly small steps forward (so that several replicas stay alive together), sometimes
# none, sometimes a long silence, sometimes backwards.
clock_steps = st.sampled_from([0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 4.0, 7.0, -0.5, -2.0])
replica_ids = st.sampled_from(REPLICAS)


class QuorumMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core: QuorumCore
        self.seen: dict[str, float] = {}
        self.pending: dict[str, tuple[Member, float]] = {}
        # Alive replicas' committed step, as their latest join said.
        self.known: dict[str, int] = {}
        self.previous: Quorum | None = None
        self.now = -math.inf
        self.last_id = 0

    @initialize(
        min_replicas=st.integers(min_value=1, max_value=4),
        join_timeout=st.integers(min_value=0, max_value=8).map(lambda n: n / 2),
        heartbeat_timeout=st.integers(min_value=1, max_value=12).map(lambda n: n / 2),
        first_quorum_id=st.integers(min_value=0, max_value=10**6),
        start=half_seconds,
    )
    def configure(
        self,
        min_replicas: int,
        join_timeout: float,
        heartbeat_timeout: float,
        first_quorum_id: int,
        start: float,
    ) -> None:
        self.config = QuorumConfig(min_replicas, join_timeout, heartbeat_timeout)
        self.core = QuorumCore(self.config, first_quorum_id=first_quorum_id)
        self.last_id = first_quorum_id
        self.clock = start

    # -- the model ----------------------------------------------------------------------------

    def alive(self, rid: str, t: float) -> bool:
        return rid in self.seen and t - self.seen[rid] < self.config.heartbeat_timeout

    def expected_quorum(self, t: float) -> tuple[tuple[str, ...] | None, bool]:
        """(member ids the rules release at time t, or None; whether via the fast path)."""
        cfg = self.config
        joined = set(self.pending)
        alive = set(self.seen)
        if not joined:
            return None, False
        has_prev = self.previous is not None
        prev = set(self.previous.replica_ids) if self.previous is not None else set()
        shrinking = has_prev and any(m.shrink_only for m, _ in self.pending.values())
        eligible = tuple(sorted(r for r in joined if not shrinking or r in prev))
        if has_prev and prev <= joined:
            formed = self.one_history(eligible)
            return formed, formed is not None
        if len(joined) < cfg.min_replicas:
            return None, False
        if not len(joined) > len(alive) / 2:
            return None, False
        first_join = min(time for _, time in self.pending.values())
        if joined != alive and t - first_join < cfg.join_timeout:
            return None, False
        if len(eligible) < cfg.min_replicas:
            return None, False
        return self.one_history(eligible), False

    def one_history(self, eligible: tuple[str, ...]) -> tuple[str, ...] | None:
        """No quorum continues from an older step than a live replica holds."""
        newest = max((s for r, s in self.known.items() if r in self.seen), default=0)
        reached = max((self.pending[r][0].step for r in eligible), default=0)
        return eligible if reached >= newest else None

    # -- one event ------------------------------------------------------------------------------

    def apply(
        self,
        call: str,
        dt: float,
        rid: str | None = None,
        member: Member | None = None,
        cause: EvictionCause | None = None,
    ) -> None:
        self.clock += dt
        sent = self.clock
        t = max(self.now, sent)
        in_previous = set(self.previous.replica_ids) if self.previous else set()
        expected_evictions: dict[str, EvictionCause] = {}

        if call == "join":
            assert member is not None
            rid = member.replica_id
            self.seen[rid] = t
            first = self.pending[rid][1] if rid in self.pending else t
            self.pending[rid] = (member, first)
            self.known[rid] = member.step
            update = self.core.join(member, sent)
        elif call == "heartbeat":
            assert rid is not None
            self.seen[rid] = t
            update = self.core.heartbeat(rid, sent)
        elif call == "withdraw":
            assert rid is not None
            self.pending.pop(rid, None)
            update = self.core.withdraw(rid, sent)
        elif call == "lost":
            assert rid is not None and cause is not None
            if rid in self.seen:
                expected_evictions[rid] = cause
                del self.seen[rid]
            self.pending.pop(rid, None)
            self.known.pop(rid, None)
            update = self.core.lost(rid, sent, cause)
        else:
            update = self.core.tick(sent)
        self.now = t

        for r in list(self.seen):
            if not self.alive(r, t):
                expected_evictions[r] = EvictionCause.HEARTBEAT_TIMEOUT
                del self.seen[r]
                self.pending.pop(r, None)
                self.known.pop(r, None)

        # Evictions: exactly the lost replica (if known) and the silent ones, each once.
        got = [(e.replica_id, e.cause) for e in update.evicted]
        assert len(got) == len({r for r, _ in got}), update.evicted
        assert dict(got) == expected_evictions, (update, expected_evictions)
        for e in update.evicted:
            assert e.in_quorum == (e.replica_id in in_previous), e

        assert update.reason.strip(), "every update must say why"

        expected, fast = self.expected_quorum(t)
        if expected is None:
            assert update.formed is None, (update, self.pending, self.seen)
        else:
            quorum = update.formed
            assert quorum is not None, (update.reason, expected, self.pending, self.seen)
            self.check_formed(quorum, update, expected, fast, t)

        self.check_deadline(update, t)

    def check_formed(
        self,
        quorum: Quorum,
        update: Update,
        expected: tuple[str, ...],
        fast: bool,
        t: float,
    ) -> None:
        ids = quorum.replica_ids
        assert ids == expected, (ids, expected, update.reason)
        # (1) members are sorted, unique, and each had a pending join at that moment,
        # with the details from its latest join.
        assert list(ids) == sorted(set(ids))
        for m in quorum.members:
            assert m.replica_id in self.pending, m
            assert m is self.pending[m.replica_id][0]
        # (2) no member that is not alive.
        for rid in ids:
            assert self.alive(rid, t), (rid, self.seen, t)
        # (4) min_replicas unless the fast path.
        assert update.reason.startswith("fast quorum") == fast, update.reason
        if not fast:
            assert len(ids) >= self.config.min_replicas, update.reason
        # (3) ids never decrease; they change exactly when members change or
        # a member reports commit failures.
        previous_ids = self.previous.replica_ids if self.previous is not None else None
        changed = previous_ids != ids or any(m.commit_failures > 0 for m in quorum.members)
        assert quorum.quorum_id == self.last_id + (1 if changed else 0), (
            quorum.quorum_id,
            self.last_id,
            previous_ids,
            ids,
        )
        assert quorum.created == t
        assert self.core.previous is quorum
        assert self.core.quorum_id == quorum.quorum_id

        self.last_id = quorum.quorum_id
        self.previous = quorum
        for rid in ids:
            del self.pending[rid]
        # Joiners left out wait for the next quorum, their timeout restarting now.
        self.pending = {rid: (m, t) for rid, (m, _) in self.pending.items()}

    def check_deadline(self, update: Update, t: float) -> None:
        """(5) Ticks strictly before the deadline change nothing; a deadline is never stale."""
        deadline = update.deadline
        probe = copy.deepcopy(self.core)
        if deadline is None:
            later = probe.tick(t + 10_000.0)
            assert later.formed is None and later.evicted == (), later
            return
        if deadline <= t:
            # "tick now": that tick must do something, or the server would spin.
            now_tick = probe.tick(t)
            assert now_tick.formed is not None or now_tick.evicted, (
                f"stale deadline {deadline} at {t}: {now_tick}"
            )
            return
        for when in sorted({t, (t + deadline) / 2, deadline - 0.25}):
            if t <= when < deadline:
                quiet = probe.tick(when)
                assert quiet.formed is None and quiet.evicted == (), (when, deadline, quiet)

    # -- rules ----------------------------------------------------------------------------------

    @rule(
        rid=replica_ids,
        dt=clock_steps,
        shrink_only=st.booleans(),
        commit_failures=st.sampled_from([0, 0, 0, 1, 2]),
        step=st.integers(min_value=0, max_value=3),
    )
    def join(self, rid: str, dt: float, shrink_only: bool, commit_failures: int, step: int) -> None:
        member = Member(
            replica_id=rid, step=step, shrink_only=shrink_only, commit_failures=commit_failures
        )
        self.apply("join", dt, member=member)

    @rule(dt=clock_steps, shrink_only=st.booleans())
    def every_alive_replica_joins(self, dt: float, shrink_only: bool) -> None:
        """The usual outer step: all groups ask for the next quorum at about the same time."""
        first = True
        for rid in sorted(self.seen):
            member = Member(replica_id=rid, shrink_only=shrink_only)
            self.apply("join", dt if first else 0.0, member=member)
            first = False

    @rule(rid=replica_ids, dt=clock_steps)
    def heartbeat(self, rid: str, dt: float) -> None:
        self.apply("heartbeat", dt, rid=rid)

    @rule(rid=replica_ids, dt=clock_steps)
    def withdraw(self, rid: str, dt: float) -> None:
        self.apply("withdraw", dt, rid=rid)

    @rule(rid=replica_ids, dt=clock_steps, cause=st.sampled_from(EvictionCause))
    def lost(self, rid: str, dt: float, cause: EvictionCause) -> None:
        self.apply("lost", dt, rid=rid, cause=cause)

    @rule(dt=clock_steps)
    def tick(self, dt: float) -> None:
        self.apply("tick", dt)

    @invariant()
    def views_match_the_model(self) -> None:
        assert self.core.last_seen() == self.seen
        assert {rid: time for rid, (_, time) in self.core.joiners().items()} == {
            rid: time for rid, (_, time) in self.pending.items()
        }
        assert set(self.pending) <= set(self.seen)
        assert self.core.quorum_id == self.last_id


QuorumMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestQuorumRulesOnRandomEventSequences = QuorumMachine.TestCase
