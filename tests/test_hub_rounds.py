"""The hub's round rules (ftdiloco.hub.rounds), without sockets or sleeping.

Each test walks one path of the state machine with an explicit clock; the
last one drives random event sequences and checks the promises that hold
after every event: a step commits only with every member's submission, a
submission is counted once, and the step only ever moves by one commit.
"""

from __future__ import annotations

import random

import pytest

from ftdiloco.hub.rounds import Commit, Joined, Outcome, Rounds, Submission

EPOCH = 7


def rounds(**kw: float) -> Rounds:
    options = {"join_timeout": 5.0, "round_timeout": 20.0, "liveness": 3.0}
    options.update(kw)
    return Rounds(step=0, epoch=EPOCH, **options)  # type: ignore[arg-type]


def formed(r: Rounds, groups: list[str], now: float = 0.0) -> int:
    """Every group is seen, then joins; the round forms with the last join; its id."""
    for g in groups:
        r.seen(g, f"{g}-1", now)
    answers = [r.join(g, f"{g}-1", r.step, now) for g in groups]
    assert answers[-1].status is Joined.FORMED
    assert answers[-1].round is not None
    return answers[-1].round.id


def submit_all(r: Rounds, groups: list[str], round_id: int) -> None:
    for g in groups:
        assert r.submit(g, round_id) is Submission.ACCEPT
        r.submitted(g, round_id, ok=True)


def test_forms_when_every_live_group_joined() -> None:
    r = rounds()
    r.seen("b", "b-1", 0.0)
    assert r.join("a", "a-1", 0, 0.0).status is Joined.WAIT
    answer = r.join("b", "b-1", 0, 0.5)
    assert answer.status is Joined.FORMED and answer.round is not None
    assert answer.round.members == ("a", "b")
    # A retried join of a member gets the same round.
    again = r.join("a", "a-1", 0, 0.6)
    assert again.round is answer.round


def test_a_new_job_waits_for_the_groups_it_expects() -> None:
    """At a job's start the other groups may not have been seen yet."""
    r = rounds()
    assert r.join("a", "a-1", 0, 0.0, expected=2).status is Joined.WAIT
    assert r.join("b", "b-1", 0, 0.1, expected=2).status is Joined.FORMED
    lone = rounds()
    assert lone.join("a", "a-1", 0, 0.0, expected=2).status is Joined.WAIT
    lone.seen("a", "a-1", 5.0)
    lone.tick(5.0)  # the join timeout: on without the missing group
    assert lone.round is not None and lone.round.members == ("a",)


def test_forms_without_a_straggler_after_the_join_timeout() -> None:
    r = rounds(min_groups=1)
    r.seen("late", "late-1", 0.0)
    assert r.join("a", "a-1", 0, 0.0).status is Joined.WAIT
    r.seen("late", "late-1", 4.0)  # alive, but does not join
    r.seen("a", "a-1", 4.0)  # its heartbeats
    r.tick(4.9)
    assert r.round is not None and r.round.members is None
    r.tick(5.0)
    assert r.round.members == ("a",)
    # The straggler waits for the next round.
    assert r.join("late", "late-1", 0, 5.1).status is Joined.WAIT


def test_min_groups_holds_a_round_back() -> None:
    r = rounds(min_groups=2, liveness=10.0)
    r.join("a", "a-1", 0, 0.0)
    r.tick(5.5)  # past the join timeout, but one group is not enough
    assert r.round is not None and r.round.members is None
    r.tick(100.0)  # a went silent: dropped, and the empty round with it
    assert r.round is None and not r.groups


def test_commit_needs_every_submission_and_is_answered_after_it() -> None:
    r = rounds()
    rid = formed(r, ["a", "b"])
    assert r.submit("a", rid) is Submission.ACCEPT
    assert r.submitted("a", rid, ok=True) is False
    assert r.outcome("a", rid) is Outcome.PENDING
    assert r.submit("b", rid) is Submission.ACCEPT
    assert r.submitted("b", rid, ok=True) is True  # complete: the hub applies and saves
    assert r.outcome("a", rid) is Outcome.PENDING  # not before committed()
    commit = r.committed(rid)
    assert commit == Commit(rid, 1, ("a", "b")) and r.step == 1
    assert r.outcome("a", rid) is Outcome.COMMITTED
    assert r.outcome("stranger", rid) is Outcome.FAILED


def test_a_retried_submission_is_counted_once() -> None:
    r = rounds()
    rid = formed(r, ["a", "b"])
    assert r.submit("a", rid) is Submission.ACCEPT
    assert r.submit("a", rid) is Submission.STALE  # still streaming: not twice at once
    r.submitted("a", rid, ok=True)
    assert r.submit("a", rid) is Submission.DUPLICATE
    submit_all(r, ["b"], rid)
    r.committed(rid)
    assert r.submit("a", rid) is Submission.DUPLICATE  # after the commit too
    assert r.step == 1


def test_a_broken_submission_fails_the_round() -> None:
    r = rounds()
    rid = formed(r, ["a", "b"])
    r.submit("a", rid)
    assert r.submitted("a", rid, ok=False) is False
    assert r.outcome("a", rid) is Outcome.FAILED
    assert r.submit("b", rid) is Submission.STALE
    # The next join opens a new round for the same step.
    answer = r.join("a", "a-1", 0, 1.0)
    assert answer.status is Joined.WAIT and r.round is not None and r.round.id != rid
    assert r.step == 0


@pytest.mark.parametrize("loss", ["kick", "leave", "silent", "restart"])
def test_losing_a_member_before_it_submitted_fails_the_round(loss: str) -> None:
    r = rounds()
    rid = formed(r, ["a", "b"])
    submit_all(r, ["a"], rid)
    if loss == "kick":
        assert r.kick("b")
    elif loss == "leave":
        r.leave("b", "b-1")
    elif loss == "silent":
        r.seen("a", "a-1", 2.9)
        r.tick(3.0)
    else:
        r.seen("b", "b-2", 1.0)
    assert r.outcome("a", rid) is Outcome.FAILED
    assert r.round is not None and r.round.failed is not None
    assert r.failures == 1


def test_losing_a_member_after_it_submitted_does_not() -> None:
    r = rounds()
    rid = formed(r, ["a", "b"])
    submit_all(r, ["b"], rid)
    assert r.kick("b")
    assert r.submit("a", rid) is Submission.ACCEPT
    assert r.submitted("a", rid, ok=True) is True
    r.committed(rid)
    assert r.outcome("a", rid) is Outcome.COMMITTED


def test_round_timeout_fails_a_round_missing_submissions() -> None:
    r = rounds(liveness=100.0)
    rid = formed(r, ["a", "b"])
    submit_all(r, ["a"], rid)
    assert r.next_deadline(0.0) == 20.0
    r.tick(19.9)
    assert r.outcome("a", rid) is Outcome.PENDING
    r.tick(20.0)
    assert r.outcome("a", rid) is Outcome.FAILED
    assert r.round is not None and "b" in (r.round.failed or "")


def test_behind_heals_and_ahead_is_refused() -> None:
    r = rounds()
    rid = formed(r, ["a"])
    submit_all(r, ["a"], rid)
    r.committed(rid)
    assert r.join("b", "b-1", 0, 1.0).status is Joined.HEAL
    assert r.join("b", "b-1", 2, 1.0).status is Joined.AHEAD
    assert r.join("b", "b-1", 1, 1.0).status is Joined.WAIT  # a is alive and has not joined


def test_a_restarted_hub_answers_the_saved_commit_and_fails_the_rest() -> None:
    """After a restart: the last commit (saved with the state) is still 'committed';
    a round of the old process is unknown, so failed, and never collides with a new id."""
    r = rounds()
    rid = formed(r, ["a", "b"])
    submit_all(r, ["a", "b"], rid)
    saved = r.committed(rid)
    open_round = formed(r, ["a", "b"])
    restarted = Rounds(step=saved.step, epoch=EPOCH + 1, last_commit=saved)
    assert restarted.outcome("a", rid) is Outcome.COMMITTED
    assert restarted.submit("a", rid) is Submission.DUPLICATE
    assert restarted.outcome("a", open_round) is Outcome.FAILED
    assert restarted.submit("a", open_round) is Submission.STALE
    new = formed(restarted, ["a", "b"])
    assert new != open_round and new >> 32 == EPOCH + 1


def test_peer_info_comes_with_the_round() -> None:
    r = rounds()
    r.seen("b", "b-1", 0.0)
    r.join("a", "a-1", 0, 0.0, {"rate": 2.0})
    answer = r.join("b", "b-1", 0, 0.0, {"rate": 1.0})
    assert answer.round is not None
    assert r.peer_info(answer.round) == {"a": {"rate": 2.0}, "b": {"rate": 1.0}}


def test_random_event_sequences_keep_the_promises() -> None:
    """Joins, submissions (whole or broken), losses and time in random order.

    After every event: the step moved by at most one, and only through a
    commit whose members all submitted exactly once; a commit's outcome is
    committed for its members only.
    """
    groups = ["a", "b", "c"]
    for seed in range(300):
        rng = random.Random(seed)
        r = rounds(min_groups=rng.choice([1, 2]))
        now = 0.0
        incarnations = dict.fromkeys(groups, 1)
        counted: dict[int, list[str]] = {}
        commits: list[Commit] = []
        for _ in range(80):
            now += rng.choice([0.0, 0.1, 1.0, 4.0])
            g = rng.choice(groups)
            inc = f"{g}-{incarnations[g]}"
            event = rng.randrange(6)
            before = r.step
            if event == 0:
                r.join(g, inc, r.step, now)
            elif event == 1 and r.round is not None:
                rid = r.round.id
                if r.submit(g, rid) is Submission.ACCEPT:
                    ok = rng.random() < 0.9
                    if ok:
                        counted.setdefault(rid, []).append(g)
                    if r.submitted(g, rid, ok) and rng.random() < 0.8:
                        commits.append(r.committed(rid))
            elif event == 2:
                r.kick(g)
            elif event == 3:
                incarnations[g] += 1
                r.seen(g, f"{g}-{incarnations[g]}", now)
            elif event == 4:
                r.seen(g, inc, now)
            else:
                r.tick(now)
            assert r.step - before in (0, 1)
            if r.step != before:
                c = commits[-1]
                assert sorted(counted[c.round_id]) == sorted(c.members), seed
                assert len(set(counted[c.round_id])) == len(counted[c.round_id])
                for member in groups:
                    expected = Outcome.COMMITTED if member in c.members else Outcome.FAILED
                    assert r.outcome(member, c.round_id) is expected
        assert r.step == len(commits)


def test_async_forms_without_a_straggler_after_the_shortest_grace() -> None:
    r = rounds(liveness=100.0)
    r.seen("slow", "slow-1", 0.0)
    assert r.join("a", "a-1", 0, 0.0, grace=2.0).status is Joined.WAIT
    assert r.join("b", "b-1", 0, 0.5, grace=1.0).status is Joined.WAIT
    assert r.next_deadline(0.5) == 1.0  # the first join plus the shortest grace
    r.tick(0.99)
    assert r.round is not None and r.round.members is None
    r.tick(1.0)
    assert r.round.members == ("a", "b")
