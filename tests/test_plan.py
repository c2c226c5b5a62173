"""Table tests for ftdiloco.coordination.plan: what every member derives from one quorum."""

from __future__ import annotations

from collections import Counter

import pytest

from ftdiloco.coordination.plan import QuorumPlan, members_by_id, plan_quorum
from ftwire.messages import Member, Quorum

QUORUM_ID = 3


def make_quorum(steps: dict[str, int], *, world_size: int = 1) -> Quorum:
    """Members in the dict's order (the join order), each with its own addresses."""
    members = tuple(
        Member(
            replica_id=rid,
            address=f"http://{rid}:8000",
            store_address=f"{rid}:29500",
            step=step,
            world_size=world_size,
        )
        for rid, step in steps.items()
    )
    return Quorum(quorum_id=QUORUM_ID, members=members, created=0.0)


@pytest.mark.parametrize(
    ("steps", "replica_id", "rank"),
    [
        ({"a": 0}, "a", 0),
        ({"c": 1, "a": 1, "b": 1}, "a", 0),
        ({"c": 1, "a": 1, "b": 1}, "b", 1),
        ({"c": 1, "a": 1, "b": 1}, "c", 2),
        # Ranks follow the replica id, not the step or the join order.
        ({"group10": 0, "group2": 9, "group1": 4}, "group10", 1),
        ({"group10": 0, "group2": 9, "group1": 4}, "group2", 2),
    ],
)
def test_replica_rank_is_position_in_sorted_participants(
    steps: dict[str, int], replica_id: str, rank: int
) -> None:
    plan = plan_quorum(make_quorum(steps), replica_id, 0)
    assert plan.replica_rank == rank
    assert plan.replica_world_size == len(steps)
    assert plan.participants == tuple(sorted(steps))
    assert plan.quorum_id == QUORUM_ID
    assert plan.replica_id == replica_id


@pytest.mark.parametrize(
    ("steps", "init_sync", "max_step", "up_to_date", "recovering"),
    [
        pytest.param({"a": 0}, True, 0, ("a",), (), id="one member at step 0"),
        pytest.param({"a": 4}, True, 4, ("a",), (), id="one member"),
        pytest.param({"b": 5, "a": 5, "c": 5}, True, 5, ("a", "b", "c"), (), id="all level"),
        pytest.param({"a": 5, "b": 3, "c": 5}, True, 5, ("a", "c"), ("b",), id="one behind"),
        pytest.param(
            {"d": 1, "c": 2, "b": 0, "a": 2}, True, 2, ("a", "c"), ("b", "d"), id="several behind"
        ),
        pytest.param({"a": 0, "b": 7}, True, 7, ("b",), ("a",), id="restarted group behind"),
        pytest.param(
            {"c": 0, "b": 0, "a": 0}, True, 0, ("a",), ("b", "c"), id="init_sync from primary"
        ),
        pytest.param(
            {"c": 0, "b": 0, "a": 0}, False, 0, ("a", "b", "c"), (), id="no init_sync at step 0"
        ),
        pytest.param({"a": 1, "b": 0}, False, 1, ("a",), ("b",), id="no init_sync, behind"),
    ],
)
def test_who_is_up_to_date_and_who_heals(
    steps: dict[str, int],
    init_sync: bool,
    max_step: int,
    up_to_date: tuple[str, ...],
    recovering: tuple[str, ...],
) -> None:
    quorum = make_quorum(steps)
    for rid in steps:
        plan = plan_quorum(quorum, rid, 0, init_sync=init_sync)
        assert plan.max_step == max_step
        assert plan.up_to_date == up_to_date
        assert plan.recovering == recovering
        assert plan.heal == (rid in recovering)
        assert (plan.donor is None) == (not plan.heal)


@pytest.mark.parametrize(
    ("steps", "replica_id", "group_rank", "donor"),
    [
        pytest.param({"a": 2, "b": 2}, "a", 0, None, id="up to date: no donor"),
        pytest.param({"a": 2, "b": 0}, "b", 0, "a", id="single donor"),
        # Two donors, two recovering groups: at every group rank the two
        # groups copy from different donors ...
        pytest.param({"a": 5, "b": 5, "c": 1, "d": 1}, "c", 0, "a", id="2x2 c r0"),
        pytest.param({"a": 5, "b": 5, "c": 1, "d": 1}, "d", 0, "b", id="2x2 d r0"),
        pytest.param({"a": 5, "b": 5, "c": 1, "d": 1}, "c", 1, "b", id="2x2 c r1"),
        pytest.param({"a": 5, "b": 5, "c": 1, "d": 1}, "d", 1, "a", id="2x2 d r1"),
        # ... and the ranks of one group fan out over the donors.
        pytest.param({"a": 3, "b": 3, "c": 3, "z": 0}, "z", 0, "a", id="3 donors r0"),
        pytest.param({"a": 3, "b": 3, "c": 3, "z": 0}, "z", 1, "b", id="3 donors r1"),
        pytest.param({"a": 3, "b": 3, "c": 3, "z": 0}, "z", 2, "c", id="3 donors r2"),
        pytest.param({"a": 3, "b": 3, "c": 3, "z": 0}, "z", 3, "a", id="3 donors r3 wraps"),
        pytest.param({"a": 0, "b": 0, "c": 0}, "c", 1, "a", id="init_sync: primary only"),
    ],
)
def test_donor_assignment(
    steps: dict[str, int], replica_id: str, group_rank: int, donor: str | None
) -> None:
    plan = plan_quorum(make_quorum(steps, world_size=4), replica_id, group_rank)
    if donor is None:
        assert plan.donor is None
    else:
        assert plan.donor is not None
        assert plan.donor.replica_id == donor
        assert plan.donor.address == f"http://{donor}:8000"


@pytest.mark.parametrize(
    ("n_donors", "n_recovering", "world_size"), [(2, 2, 2), (3, 7, 3), (4, 2, 5), (1, 5, 2)]
)
def test_heals_are_balanced_over_donors_at_every_group_rank(
    n_donors: int, n_recovering: int, world_size: int
) -> None:
    steps = {f"up{i}": 9 for i in range(n_donors)} | {f"re{i}": 1 for i in range(n_recovering)}
    quorum = make_quorum(steps, world_size=world_size)
    for group_rank in range(world_size):
        load = Counter(
            plan.donor.replica_id
            for i in range(n_recovering)
            if (plan := plan_quorum(quorum, f"re{i}", group_rank)).donor is not None
        )
        assert sum(load.values()) == n_recovering
        assert max(load.values()) - min(load.values()) <= 1
        assert len(load) == min(n_donors, n_recovering)


@pytest.mark.parametrize(
    ("steps", "world_size", "init_sync"),
    [
        ({"a": 0}, 1, True),
        ({"c": 0, "a": 0, "b": 0}, 2, True),
        ({"c": 0, "a": 0, "b": 0}, 2, False),
        ({"d": 1, "c": 2, "b": 0, "a": 2}, 3, True),
    ],
)
def test_every_member_agrees(steps: dict[str, int], world_size: int, init_sync: bool) -> None:
    quorum = make_quorum(steps, world_size=world_size)
    for group_rank in range(world_size):
        plans = [plan_quorum(quorum, rid, group_rank, init_sync=init_sync) for rid in steps]
        shared = {
            (
                p.quorum_id,
                p.participants,
                p.replica_world_size,
                p.max_step,
                p.up_to_date,
                p.recovering,
                p.store_address,
                p.store_prefix,
            )
            for p in plans
        }
        assert len(shared) == 1
        assert sorted(p.replica_rank for p in plans) == list(range(len(steps)))
    prefixes = {plan_quorum(quorum, "a", r).store_prefix for r in range(world_size)}
    assert len(prefixes) == world_size


@pytest.mark.parametrize(
    ("steps", "group_rank", "store_address", "store_prefix"),
    [
        ({"a": 0}, 0, "a:29500", "ftdiloco/q3/g0"),
        ({"a": 1, "c": 3, "b": 3}, 0, "b:29500", "ftdiloco/q3/g0"),
        ({"a": 1, "c": 3, "b": 3}, 2, "b:29500", "ftdiloco/q3/g2"),
        ({"c": 0, "b": 0}, 1, "b:29500", "ftdiloco/q3/g1"),
    ],
)
def test_store_is_first_up_to_date_members(
    steps: dict[str, int], group_rank: int, store_address: str, store_prefix: str
) -> None:
    plan = plan_quorum(make_quorum(steps, world_size=3), next(iter(steps)), group_rank)
    assert (plan.store_address, plan.store_prefix) == (store_address, store_prefix)


def test_prefix_changes_with_quorum_id() -> None:
    quorum = make_quorum({"a": 0, "b": 0})
    later = Quorum(quorum_id=4, members=quorum.members, created=1.0)
    assert plan_quorum(quorum, "a", 0).store_prefix != plan_quorum(later, "a", 0).store_prefix


@pytest.mark.parametrize(
    ("quorum", "replica_id", "group_rank", "match"),
    [
        (make_quorum({"a": 0, "b": 0}), "zz", 0, "'zz' is not in quorum 3 \\(members: a, b\\)"),
        (Quorum(1, (), 0.0), "a", 0, "members: none"),
        (make_quorum({"a": 0}), "a", -1, "group_rank must be >= 0"),
        (make_quorum({"a": 0}, world_size=2), "a", 2, "outside replica 'a'.s world size 2"),
        (
            Quorum(1, (Member("a"), Member("a")), 0.0),
            "a",
            0,
            "lists replica 'a' more than once",
        ),
        (
            Quorum(1, (Member("a", world_size=2), Member("b", world_size=1)), 0.0),
            "a",
            0,
            "different world sizes \\(a=2, b=1\\)",
        ),
    ],
)
def test_bad_input_raises(quorum: Quorum, replica_id: str, group_rank: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_quorum(quorum, replica_id, group_rank)


def test_members_by_id() -> None:
    quorum = make_quorum({"b": 1, "a": 2})
    assert {rid: m.step for rid, m in members_by_id(quorum).items()} == {"b": 1, "a": 2}


def test_one_member_quorum() -> None:
    plan = plan_quorum(make_quorum({"solo": 12}), "solo", 0)
    assert plan == QuorumPlan(
        quorum_id=QUORUM_ID,
        replica_id="solo",
        replica_rank=0,
        replica_world_size=1,
        participants=("solo",),
        max_step=12,
        history="",
        up_to_date=("solo",),
        recovering=(),
        heal=False,
        donor=None,
        store_address="solo:29500",
        store_prefix="ftdiloco/q3/g0",
    )


def history_quorum(reports: dict[str, tuple[int, str]]) -> Quorum:
    members = tuple(
        Member(replica_id=rid, step=step, history=history, store_address=f"{rid}:1")
        for rid, (step, history) in reports.items()
    )
    return Quorum(quorum_id=QUORUM_ID, members=members, created=0.0)


@pytest.mark.parametrize(
    ("reports", "history", "up_to_date"),
    [
        # Two groups at one step with different histories: neither is up to
        # date with the other; the history more groups hold wins.
        pytest.param({"a": (2, "x"), "b": (2, "y"), "c": (2, "y")}, "y", ("b", "c"), id="majority"),
        # A tie goes to the history of the smallest replica id, whatever the join order.
        pytest.param({"b": (2, "y"), "a": (2, "x")}, "x", ("a",), id="tie: smallest id"),
        pytest.param({"b": (2, "x"), "a": (2, "y")}, "y", ("a",), id="tie: other order"),
        # The step comes first: a newer step beats any number of older holders.
        pytest.param({"a": (1, "x"), "b": (1, "x"), "c": (3, "z")}, "z", ("c",), id="step first"),
    ],
)
def test_same_step_different_history_heals_by_one_rule(
    reports: dict[str, tuple[int, str]], history: str, up_to_date: tuple[str, ...]
) -> None:
    quorum = history_quorum(reports)
    plans = {rid: plan_quorum(quorum, rid, 0) for rid in reports}
    for rid, plan in plans.items():
        assert plan.history == history
        assert plan.up_to_date == up_to_date
        # Every member works out the same answer; the others heal from a holder.
        assert plan.heal == (rid not in up_to_date)
        if plan.heal:
            assert plan.donor is not None and plan.donor.replica_id in up_to_date
