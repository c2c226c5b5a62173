"""The hub's rules for one outer step: who takes part, when it commits, what a retry means.

Pure: joins, submissions, liveness and the clock go in, decisions come out;
no sockets, no tensors, no sleeping (``tests/test_hub_rounds.py`` drives it
through every path).  :mod:`ftdiloco.hub.server` only carries the decisions out.

One *round* per outer step, in sync mode:

- A group joins with its committed step.  Behind the hub: it must heal first
  (fetch the global weights), then join again.  Ahead of the hub: refused,
  the hub has lost steps it committed (never happens while every commit is
  saved before it is answered, see ``HubServer``).
- The round *forms* (its members are fixed) once every live group has joined
  and at least as many as a joiner expects (its ``NUM_REPLICA_GROUPS``: at
  a job's start the others may not have been seen yet), or, after
  ``join_timeout`` since its first join (in async mode: the joiners' grace),
  with whoever joined, if they are at least ``min_groups``.  A group that
  joins a formed round it is not in waits for the next one; if that is a
  later step, it heals first and brings its stale pseudo-gradient (weighed,
  discounted, by DiLoCo in async mode).
- Each member submits its pseudo-gradient once.  A submission is keyed by
  (group, round): a retry of one already counted is acknowledged and not
  added again, so nothing is applied twice.  A submission that broke off
  half-way has already been added in part, so it fails the round.
- The round commits when every member's submission is in: the hub applies the
  outer step, saves, and only then calls :meth:`Rounds.committed` -- a member
  asking afterwards learns ``committed`` even across a hub restart, since
  the last commit is saved with the state.
- It fails when a member that has not submitted is lost (silent for
  ``liveness`` seconds, kicked, left, or restarted with a new incarnation) or
  when submissions take longer than ``round_timeout``.  Every member then
  rolls back, and the next round retries the same step.

Round ids carry the hub process's epoch (random per start), so a round of a
hub that crashed is never mistaken for one of the restarted hub.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Commit", "JoinAnswer", "Joined", "Outcome", "Round", "Rounds", "Submission"]

# Join info a group sends for DyLU (rate, h, tokens, step, staleness).
Info = Mapping[str, int | float | str | bool]


@dataclass(frozen=True)
class Commit:
    """The last committed round: saved with the hub's state, so answers survive a restart."""

    round_id: int
    step: int  # the step it produced
    members: tuple[str, ...]


@dataclass
class _Member:
    incarnation: str
    seen: float
    info: dict[str, int | float | str | bool] = field(default_factory=dict)
    submitted_steps: int = 0


@dataclass
class Round:
    """One attempt at the outer step from ``step``."""

    id: int
    step: int
    first_join: float
    joined: dict[str, str] = field(default_factory=dict)  # group -> incarnation, in join order
    expected: int = 0  # the most groups a joiner said the job has
    grace: float | None = None  # async: the shortest wait for stragglers a joiner allows
    members: tuple[str, ...] | None = None  # fixed when it forms
    formed_at: float = 0.0
    receiving: set[str] = field(default_factory=set)
    submitted: set[str] = field(default_factory=set)
    failed: str | None = None  # why, once it failed

    @property
    def complete(self) -> bool:
        return self.members is not None and self.submitted == set(self.members)


class Joined(enum.Enum):
    HEAL = "heal"  # behind the hub: fetch the global weights, then join again
    AHEAD = "ahead"  # the hub lost committed steps: refused
    WAIT = "wait"  # not formed yet, or formed without this group: ask again later
    FORMED = "formed"


@dataclass(frozen=True)
class JoinAnswer:
    status: Joined
    round: Round | None = None


class Submission(enum.Enum):
    ACCEPT = "accept"  # stream it in, then call submitted()
    DUPLICATE = "duplicate"  # already counted: acknowledge, add nothing
    STALE = "stale"  # no such round (failed, unknown, or this group is not a member)


class Outcome(enum.Enum):
    COMMITTED = "committed"
    FAILED = "failed"
    PENDING = "pending"


class Rounds:
    """The round state machine of one hub process."""

    def __init__(
        self,
        *,
        step: int,
        epoch: int,
        last_commit: Commit | None = None,
        min_groups: int = 1,
        join_timeout: float = 60.0,
        round_timeout: float = 60.0,
        liveness: float = 10.0,
    ) -> None:
        if not 0 <= epoch < 1 << 31:
            raise ValueError(f"epoch must be in [0, 2**31), got {epoch}")
        self.step = step
        self.last_commit = last_commit
        self.min_groups = min_groups
        self.join_timeout = join_timeout
        self.round_timeout = round_timeout
        self.liveness = liveness
        self.round: Round | None = None
        self.groups: dict[str, _Member] = {}
        self._ids = (epoch << 32 | n for n in itertools.count(1))
        self.failures = 0

    # -- liveness ------------------------------------------------------------------------

    def seen(self, group: str, incarnation: str, now: float) -> None:
        """Any request from a group: it is alive; a new incarnation replaces the old one."""
        member = self.groups.get(group)
        if member is not None and member.incarnation != incarnation:
            self._lose(group, "restarted")
            member = None
        if member is None:
            self.groups[group] = _Member(incarnation, now)
        else:
            member.seen = now

    def live(self, now: float) -> list[str]:
        return [g for g, m in self.groups.items() if now - m.seen < self.liveness]

    def kick(self, group: str) -> bool:
        """The operator's kick: forget the group now (it may come back by joining again)."""
        if group not in self.groups:
            return False
        self._lose(group, "kicked")
        return True

    def leave(self, group: str, incarnation: str) -> None:
        """A group that finished says goodbye, so nobody waits for it."""
        member = self.groups.get(group)
        if member is not None and member.incarnation == incarnation:
            self._lose(group, "left")

    def _lose(self, group: str, why: str) -> None:
        del self.groups[group]
        r = self.round
        if r is None or r.failed is not None:
            return
        if r.members is None:
            r.joined.pop(group, None)
            if not r.joined:
                self.round = None
        elif group in r.members and group not in r.submitted:
            self._fail(f"{group} {why} before submitting")

    def _fail(self, why: str) -> None:
        assert self.round is not None
        self.round.failed = why
        self.failures += 1

    # -- a round ---------------------------------------------------------------------------

    def join(
        self,
        group: str,
        incarnation: str,
        step: int,
        now: float,
        info: Info | None = None,
        expected: int = 0,
        grace: float | None = None,
    ) -> JoinAnswer:
        self.seen(group, incarnation, now)
        if info is not None:
            self.groups[group].info = dict(info)
        if step < self.step:
            return JoinAnswer(Joined.HEAL)
        if step > self.step:
            return JoinAnswer(Joined.AHEAD)
        r = self.round
        if r is not None and r.failed is not None and not r.receiving:
            r = self.round = None
        if r is None:
            r = self.round = Round(next(self._ids), self.step, now)
        if r.members is not None or r.failed is not None:
            formed = r.members is not None and group in r.members and r.failed is None
            return JoinAnswer(Joined.FORMED, r) if formed else JoinAnswer(Joined.WAIT)
        r.joined[group] = incarnation
        r.expected = max(r.expected, expected)
        if grace is not None:
            r.grace = grace if r.grace is None else min(r.grace, grace)
        self.tick(now)
        return JoinAnswer(Joined.FORMED, r) if r.members is not None else JoinAnswer(Joined.WAIT)

    def peer_info(self, r: Round) -> dict[str, dict[str, int | float | str | bool]]:
        """What each member said with its join (empty for one the hub no longer knows)."""
        assert r.members is not None
        return {g: dict(self.groups[g].info) if g in self.groups else {} for g in r.members}

    def submit(self, group: str, round_id: int) -> Submission:
        """A member starts sending its pseudo-gradient for ``round_id``."""
        c = self.last_commit
        if c is not None and c.round_id == round_id and group in c.members:
            return Submission.DUPLICATE
        r = self.round
        if (
            r is None
            or r.id != round_id
            or r.failed is not None
            or r.members is None
            or group not in r.members
            or group in r.receiving
        ):
            return Submission.STALE
        if group in r.submitted:
            return Submission.DUPLICATE
        r.receiving.add(group)
        return Submission.ACCEPT

    def submitted(self, group: str, round_id: int, ok: bool) -> bool:
        """A submission ended; returns whether the round is now complete (apply it).

        A broken one was added in part, so the round cannot commit.
        """
        r = self.round
        assert r is not None and r.id == round_id and group in r.receiving
        r.receiving.discard(group)
        if r.failed is not None:
            return False
        if not ok:
            self._fail(f"{group}'s submission broke off")
            return False
        r.submitted.add(group)
        if group in self.groups:
            self.groups[group].submitted_steps += 1
        return r.complete

    def committed(self, round_id: int) -> Commit:
        """The hub applied and saved the complete round ``round_id``."""
        r = self.round
        assert r is not None and r.id == round_id and r.complete and r.members is not None
        self.step += 1
        self.last_commit = Commit(r.id, self.step, r.members)
        self.round = None
        return self.last_commit

    def outcome(self, group: str, round_id: int) -> Outcome:
        """What a member learns when it votes: did its round commit?"""
        c = self.last_commit
        if c is not None and c.round_id == round_id:
            return Outcome.COMMITTED if group in c.members else Outcome.FAILED
        r = self.round
        if r is not None and r.id == round_id and r.failed is None and r.members is not None:
            return Outcome.PENDING if group in r.members else Outcome.FAILED
        return Outcome.FAILED

    def tick(self, now: float) -> None:
        """Time passed: drop silent groups, form a round, fail a round past its deadline."""
        for group in [g for g, m in self.groups.items() if now - m.seen >= self.liveness]:
            self._lose(group, "went silent")
        r = self.round
        if r is None or r.failed is not None:
            return
        if r.members is None:
            everyone = set(self.live(now)) <= set(r.joined) and len(r.joined) >= r.expected
            late = now - r.first_join >= self._form_within(r)
            if len(r.joined) >= self.min_groups and (everyone or late):
                r.members = tuple(r.joined)
                r.formed_at = now
        elif not r.complete and now - r.formed_at >= self.round_timeout:
            missing = sorted(set(r.members) - r.submitted)
            self._fail(f"no submission from {', '.join(missing)} in {self.round_timeout:g}s")

    def _form_within(self, r: Round) -> float:
        """How long a round waits for live groups that have not joined."""
        return self.join_timeout if r.grace is None else min(self.join_timeout, r.grace)

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`tick` may next change something (None: only events will)."""
        times = [m.seen + self.liveness for m in self.groups.values()]
        r = self.round
        if r is not None and r.failed is None:
            if r.members is None:
                times.append(r.first_join + self._form_within(r))
            elif not r.complete:
                times.append(r.formed_at + self.round_timeout)
        return min(times, default=None)
