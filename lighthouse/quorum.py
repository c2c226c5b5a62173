"""The quorum rules as a pure state machine.

Nothing here touches a socket, a timer or the wall clock: every event carries
``now`` (seconds on a monotonic clock) and every call returns an :class:`Update`
that says what the caller must do -- release a quorum to its joiners, tell the
survivors that members were evicted, and when to call :meth:`QuorumCore.tick`
next.  The aiohttp server is a thin adapter that performs those effects, and
the tests drive this class through every rule with a fake clock.

The rules follow DESIGN.md (and the widely used reference, so that operators'
habits carry over): only live replicas count; a fast path re-forms the
previous quorum as soon as all of its members have joined again; otherwise
``min_replicas`` joiners and a strict majority of the live replicas are needed,
and stragglers are waited for until ``join_timeout`` has passed since the
first join.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class EvictionCause(str, Enum):
    """Why the lighthouse stopped counting a replica as alive."""

    CONNECTION_CLOSED = "connection_closed"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    KILLED = "killed"


@dataclass(frozen=True)
class Member:
    """What a replica group tells the lighthouse when it asks to join."""

    replica_id: str
    address: str = ""
    store_address: str = ""
    step: int = 0
    world_size: int = 1
    shrink_only: bool = False
    commit_failures: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Quorum:
    """One quorum, identical for every member it is handed to."""

    quorum_id: int
    members: tuple[Member, ...]
    created: float

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(m.replica_id for m in self.members)


@dataclass(frozen=True)
class Eviction:
    replica_id: str
    cause: EvictionCause
    # True when the replica was in the last quorum formed, so the survivors'
    # in-flight collectives with it are doomed and should be abandoned.
    in_quorum: bool


@dataclass(frozen=True)
class Update:
    """The effects of one event, for the I/O layer to carry out."""

    formed: Quorum | None
    evicted: tuple[Eviction, ...]
    reason: str
    # Monotonic time at which ``tick`` may change the outcome, if any.
    deadline: float | None


@dataclass(frozen=True)
class QuorumConfig:
    min_replicas: int = 1
    join_timeout: float = 60.0
    heartbeat_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas}")
        # Written as `not >=` / `not >` so that NaN is rejected too.
        if not self.join_timeout >= 0:
            raise ValueError(f"join_timeout must be >= 0, got {self.join_timeout}")
        if not self.heartbeat_timeout > 0:
            raise ValueError(f"heartbeat_timeout must be > 0, got {self.heartbeat_timeout}")


class QuorumCore:
    """Members, liveness and joins in; quorum decisions out.

    Every event costs O(1) amortised, however many replicas there are: both
    tables are kept in time order (a heartbeat moves its replica to the end),
    so expiry pops from the front and the next deadline is the front entry.
    Only forming a quorum walks the members.

    ``first_quorum_id`` lets the daemon start a new epoch after a restart so a
    quorum id it handed out before is never handed out again.
    """

    def __init__(self, config: QuorumConfig, first_quorum_id: int = 0) -> None:
        self.config = config
        self._quorum_id = first_quorum_id
        self._now = float("-inf")
        # replica id -> last time seen alive, oldest first.
        self._last_seen: dict[str, float] = {}
        # replica id -> (member, join time), earliest join first.  Always a
        # subset of the alive replicas: eviction removes from both.
        self._joiners: dict[str, tuple[Member, float]] = {}
        self._previous: Quorum | None = None
        # Members of the previous quorum that have not joined again yet.
        self._prev_missing: set[str] = set()
        self._reason = "waiting: no replica has joined"

    # -- read-only views for /status and metrics ------------------------------

    @property
    def previous(self) -> Quorum | None:
        """The last quorum formed (the one the members are training in)."""
        return self._previous

    @property
    def quorum_id(self) -> int:
        return self._quorum_id

    @property
    def reason(self) -> str:
        """Why the next quorum has not formed yet, or how the last one formed."""
        return self._reason

    def joiners(self) -> dict[str, tuple[Member, float]]:
        return dict(self._joiners)

    def last_seen(self) -> dict[str, float]:
        """Alive replicas and when each was last seen (expired ones are evicted)."""
        return dict(self._last_seen)

    # -- events ----------------------------------------------------------------

    def join(self, member: Member, now: float) -> Update:
        """A replica asks to be in the next quorum; joining also proves it alive.

        A second join from the same replica replaces the first (a retried
        request) but keeps the original join time, so retries cannot postpone
        the join timeout for everyone else.
        """
        now = self._advance(now)
        rid = member.replica_id
        self._touch(rid, now)
        earlier = self._joiners.get(rid)
        self._joiners[rid] = (member, earlier[1] if earlier is not None else now)
        self._prev_missing.discard(rid)
        return self._evaluate(now, ())

    def heartbeat(self, replica_id: str, now: float) -> Update:
        now = self._advance(now)
        self._touch(replica_id, now)
        return self._evaluate(now, ())

    def withdraw(self, replica_id: str, now: float) -> Update:
        """The replica gave up waiting (its request was cancelled); it stays alive."""
        now = self._advance(now)
        if self._joiners.pop(replica_id, None) is not None:
            self._mark_missing(replica_id)
        return self._evaluate(now, ())

    def lost(self, replica_id: str, now: float, cause: EvictionCause) -> Update:
        """The replica is known dead (its connection closed, or an operator killed it)."""
        now = self._advance(now)
        return self._evaluate(now, self._evict(replica_id, cause))

    def tick(self, now: float) -> Update:
        """Timer expiry: expire silent replicas and re-check the join timeout."""
        return self._evaluate(self._advance(now), ())

    # -- bookkeeping -------------------------------------------------------------

    def _advance(self, now: float) -> float:
        # A clock that steps back would break the time order of the tables.
        self._now = max(self._now, now)
        return self._now

    def _touch(self, replica_id: str, now: float) -> None:
        self._last_seen.pop(replica_id, None)
        self._last_seen[replica_id] = now

    def _mark_missing(self, replica_id: str) -> None:
        if self._previous is not None and replica_id in self._previous.replica_ids:
            self._prev_missing.add(replica_id)

    def _evict(self, replica_id: str, cause: EvictionCause) -> tuple[Eviction, ...]:
        seen = self._last_seen.pop(replica_id, None)
        self._joiners.pop(replica_id, None)
        if seen is None:
            return ()
        self._mark_missing(replica_id)
        prev = self._previous
        in_quorum = prev is not None and replica_id in prev.replica_ids
        return (Eviction(replica_id, cause, in_quorum),)

    def _expire(self, now: float) -> tuple[Eviction, ...]:
        limit = self.config.heartbeat_timeout
        evicted: tuple[Eviction, ...] = ()
        while self._last_seen:
            rid, seen = next(iter(self._last_seen.items()))
            if now - seen < limit:
                break
            evicted += self._evict(rid, EvictionCause.HEARTBEAT_TIMEOUT)
        return evicted

    # -- the rules ---------------------------------------------------------------

    def _evaluate(self, now: float, evicted: tuple[Eviction, ...]) -> Update:
        evicted += self._expire(now)
        members, reason = self._decide(now)
        self._reason = reason
        formed = self._form(members, now) if members is not None else None
        return Update(formed, evicted, reason, self._deadline(now))

    def _candidates(self) -> list[Member]:
        """The joiners in replica-id order; with shrink_only, only previous members."""
        members = sorted((m for m, _ in self._joiners.values()), key=lambda m: m.replica_id)
        prev = self._previous
        if prev is not None and any(m.shrink_only for m in members):
            keep = set(prev.replica_ids)
            members = [m for m in members if m.replica_id in keep]
        return members

    def _decide(self, now: float) -> tuple[list[Member] | None, str]:
        cfg = self.config
        joined, alive = len(self._joiners), len(self._last_seen)
        if not joined:
            return None, "waiting: no replica has joined"
        summary = f"{joined} joined of {alive} alive"
        prev = self._previous
        if prev is not None and not self._prev_missing:
            fast = f"fast quorum: every member of quorum {prev.quorum_id} joined again ({summary})"
            return self._candidates(), fast
        if joined < cfg.min_replicas:
            return None, f"waiting: {summary}, min_replicas is {cfg.min_replicas}"
        if joined * 2 <= alive:
            return None, (
                f"waiting: {summary}, more than half of the alive replicas must join"
                " (split-brain guard)"
            )
        stragglers = joined < alive
        if stragglers:
            first_join = next(iter(self._joiners.values()))[1]
            if now - first_join < cfg.join_timeout:
                # Counted, not named: naming them costs O(replicas) on every
                # event, and /status lists who has not joined.
                waited = now - first_join
                return None, (
                    f"waiting: {summary}, {alive - joined} alive replicas have not joined;"
                    f" forming without them at the join timeout"
                    f" ({waited:.1f}/{cfg.join_timeout:g}s)"
                )
        candidates = self._candidates()
        if len(candidates) < cfg.min_replicas:
            return None, (
                f"waiting: {summary}, shrink_only leaves {len(candidates)} previous members,"
                f" min_replicas is {cfg.min_replicas}"
            )
        if stragglers:
            return candidates, f"formed after the join timeout without stragglers ({summary})"
        return candidates, f"formed: every alive replica joined ({summary})"

    def _form(self, members: list[Member], now: float) -> Quorum:
        ids = tuple(m.replica_id for m in members)
        prev = self._previous
        failures = any(m.commit_failures > 0 for m in members)
        if prev is None or prev.replica_ids != ids or failures:
            self._quorum_id += 1
        quorum = Quorum(self._quorum_id, tuple(members), now)
        self._previous = quorum
        self._prev_missing = set(ids)
        for rid in ids:
            del self._joiners[rid]
        # Joiners left out (shrink_only) wait for the next quorum; its join
        # timeout counts from now, not from their first attempt.
        self._joiners = {rid: (m, now) for rid, (m, _) in self._joiners.items()}
        return quorum

    def _deadline(self, now: float) -> float | None:
        """The earliest time at which a tick could change anything."""
        times = []
        if self._last_seen:
            times.append(next(iter(self._last_seen.values())) + self.config.heartbeat_timeout)
        if self._joiners:
            join_deadline = next(iter(self._joiners.values()))[1] + self.config.join_timeout
            if join_deadline > now:
                times.append(join_deadline)
            elif self._decide(now)[0] is not None:
                # Joiners left out of the quorum just formed can form the next one at once
                # (join_timeout 0).  Otherwise a passed join timeout is no reason to tick:
                # returning it would make the server re-arm a timer in the past and spin.
                times.append(now)
        return min(times) if times else None
