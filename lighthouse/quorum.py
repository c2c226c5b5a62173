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
first join -- or less, if a joiner asked for a shorter grace
(``Member.join_grace``: asynchronous DiLoCo does not wait for a slow group).

On top of them, the rules that keep one history (DESIGN.md, I7; see
:mod:`ftwire.history` for what a history is):

* **no fork while the newest history lives**: the core knows the newest
  committed step of every live replica (from its joins, its heartbeats and
  the commits it fenced); no quorum forms unless one of its members holds
  that step -- it waits for the holder to join, or to die.  A history whose
  holders all died is abandoned explicitly: the quorum that continues from
  an older state records the discarded steps (:class:`Discard`);
* **startup**: a fresh job's first quorum waits, up to the join timeout, for
  the number of groups the members expect (``NUM_REPLICA_GROUPS``); a
  restarted lighthouse waits one heartbeat timeout before its first quorum,
  so every live replica has reconnected and told its step;
* **incarnations**: every process start has its own incarnation; a replica
  seen with a new one was restarted, so its old incarnation is evicted, and a
  quorum whose members' incarnations differ from the previous quorum's gets
  a new id (no process group is reused across a restart);
* **commit fence**: a group commits only after :meth:`QuorumCore.fence` says
  so.  The first fence of a quorum seals it (every later fence of it says
  yes); a quorum that lost a member, or was superseded, before it was sealed
  can no longer commit.  So an outer step commits on all of the groups that
  finish it or on none, and an evicted (frozen) group never commits.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from enum import Enum

from ftwire.history import (
    DIRTY,
    GENESIS,
    Reference,
    is_clean,
    is_older,
    next_history,
    reference,
)
from ftwire.messages import Fence, Member, Quorum

# Sealed quorum ids remembered for late fences; a group fences within one
# outer step of its quorum, so a few hundred covers any realistic lag.
_SEALED_KEPT = 256
_DISCARDS_KEPT = 100
# Histories whose parent the core remembers, to tell where two branches part.
_LINEAGE_KEPT = 1 << 16


class EvictionCause(str, Enum):
    """Why the lighthouse stopped counting a replica as alive."""

    CONNECTION_CLOSED = "connection_closed"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    KILLED = "killed"
    # The same replica id came back with a new incarnation: the old process is gone.
    RESTARTED = "restarted"
    # It closed its connection cleanly (its Manager was closed): it finished or left.
    LEFT = "left"


@dataclass(frozen=True)
class Eviction:
    replica_id: str
    cause: EvictionCause
    # True when the replica was in the last quorum formed, so the survivors'
    # in-flight collectives with it are doomed and should be abandoned.
    in_quorum: bool


@dataclass(frozen=True)
class Discard:
    """Committed steps abandoned because every group holding them died (or was killed)."""

    replica_ids: tuple[str, ...]
    first_step: int
    last_step: int
    # The history abandoned, and the state the job continued from instead.
    history: str
    continued_from_step: int
    quorum_id: int

    def describe(self) -> str:
        who = ", ".join(self.replica_ids)
        steps = (
            f"step {self.first_step}"
            if self.first_step == self.last_step
            else f"steps {self.first_step}-{self.last_step}"
        )
        return (
            f"{who}'s {steps} discarded: no live group held them when quorum"
            f" {self.quorum_id} formed from step {self.continued_from_step}"
        )


@dataclass(frozen=True)
class Update:
    """The effects of one event, for the I/O layer to carry out."""

    formed: Quorum | None
    evicted: tuple[Eviction, ...]
    reason: str
    # Monotonic time at which ``tick`` may change the outcome, if any.
    deadline: float | None
    # Set when the quorum formed abandons a history whose holders died.
    discarded: Discard | None = None


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
    so expiry pops from the front and the next deadline is the front entry;
    the newest committed step of the live replicas is kept as counts per
    step.  Only forming a quorum walks the members.

    ``first_quorum_id`` lets the daemon start a new epoch after a restart so a
    quorum id it handed out before is never handed out again.  ``started``:
    when the daemon started (on the events' clock); a job already under way
    waits one heartbeat timeout from then before its first quorum here.
    """

    def __init__(
        self, config: QuorumConfig, first_quorum_id: int = 0, started: float = float("-inf")
    ) -> None:
        self.config = config
        self._quorum_id = first_quorum_id
        self._started = started
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
        # Alive replicas: their incarnation, and their newest committed step
        # as last reported (or as fenced), with counts per step for the max.
        self._incarnations: dict[str, str] = {}
        self._committed: dict[str, tuple[int, str]] = {}
        self._step_counts: dict[int, int] = {}
        self._newest = 0
        # For the first quorum (see _startup_wait), kept as joins arrive so
        # that no event scans the joiners: the most NUM_REPLICA_GROUPS any
        # joiner declared, and whether one joined past step 0.
        self._expected_groups = 0
        self._joined_past_zero = False
        # The newest committed state the job ever reached, and who held it.
        self._high = Reference(0, GENESIS, ())
        # Fencing: quorum ids whose commit was decided, and why the previous
        # quorum may no longer commit (None: it still may).
        self._sealed: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._broken: str | None = None
        # The state the previous quorum continues from (its reference).
        self._formed_from: Reference | None = None
        self._discards: deque[Discard] = deque(maxlen=_DISCARDS_KEPT)
        # history -> (its step, the history it was committed on), for fenced commits.
        self._lineage: OrderedDict[str, tuple[int, str]] = OrderedDict()
        # Histories abandoned: they never come back as a reference while any
        # member holds something else (a thawed holder heals instead).
        self._abandoned: OrderedDict[str, None] = OrderedDict()
        self.discarded_steps = 0
        # The shortest straggler grace (Member.join_grace) any joiner asked for
        # since the last quorum formed; inf: none did.  A running minimum, so
        # that no event scans the joiners for it.
        self._grace = math.inf

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

    def committed(self) -> dict[str, tuple[int, str]]:
        """Alive replicas' newest committed (step, history), as far as the core knows."""
        return dict(self._committed)

    def is_stale(self, replica_id: str, incarnation: str) -> bool:
        """Is this an older process of a replica that has since restarted?

        Its joins and heartbeats must be refused: counting them would evict
        the newer process (ping-pong), and it holds nothing the job needs.
        """
        known = self._incarnations.get(replica_id)
        return bool(incarnation and known) and is_older(incarnation, known or "")

    def discards(self) -> list[Discard]:
        """The most recent abandoned histories, oldest first."""
        return list(self._discards)

    # -- events ----------------------------------------------------------------

    def join(self, member: Member, now: float) -> Update:
        """A replica asks to be in the next quorum; joining also proves it alive.

        A second join from the same replica replaces the first (a retried
        request) but keeps the original join time, so retries cannot postpone
        the join timeout for everyone else.  The step a join reports is the
        replica's committed step, authoritatively.
        """
        now = self._advance(now)
        rid = member.replica_id
        evicted = self._see(rid, now, member.incarnation)
        earlier = self._joiners.get(rid)
        self._joiners[rid] = (member, earlier[1] if earlier is not None else now)
        if member.join_grace is not None:
            self._grace = min(self._grace, member.join_grace)
        self._expected_groups = max(self._expected_groups, member.expected_groups)
        self._joined_past_zero = self._joined_past_zero or member.step > 0
        self._prev_missing.discard(rid)
        if is_clean(member):
            self._know(rid, member.step, member.history)
        return self._evaluate(now, evicted)

    def heartbeat(
        self,
        replica_id: str,
        now: float,
        *,
        incarnation: str = "",
        committed: tuple[int, str] | None = None,
    ) -> Update:
        """Proof of life, optionally with the replica's incarnation and committed step.

        A heartbeat's step only ever raises what the core knows: it may have
        been sent before a commit the core has already fenced.
        """
        now = self._advance(now)
        evicted = self._see(replica_id, now, incarnation)
        if committed is not None and committed[0] > self._committed.get(replica_id, (-1, ""))[0]:
            self._know(replica_id, *committed)
        return self._evaluate(now, evicted)

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

    def fence(self, replica_id: str, quorum_id: int, step: int, now: float) -> Fence:
        """May ``replica_id`` commit, in quorum ``quorum_id``, the step after ``step``?

        The first yes seals that formation of the quorum: from then on every
        member gets yes, whatever happens to the others, so a step commits on
        every group that finishes it.  Before the seal, a formation that lost
        a member (evicted for any cause: dead, frozen past the heartbeat
        timeout, restarted, killed) or that a newer one superseded gets no --
        nor does a replica that is not alive -- so no group commits it.
        Sealing also tells the core that every member now holds the next step.
        """
        now = self._advance(now)
        self._expire_only(now)
        key = (quorum_id, step)
        if key in self._sealed:
            return Fence(True, f"quorum {quorum_id} is committing step {step + 1}")
        prev, ref = self._previous, self._formed_from
        if prev is None or ref is None or (quorum_id, step) != (prev.quorum_id, ref.step):
            current = f"{prev.quorum_id} at step {ref.step}" if prev and ref else "none"
            return Fence(
                False,
                f"quorum {quorum_id} at step {step} is not the current quorum ({current}):"
                " superseded, or formed by a lighthouse that has restarted since",
            )
        if self._broken is not None:
            return Fence(
                False, f"quorum {quorum_id} was broken before it committed: {self._broken}"
            )
        if replica_id not in prev.replica_ids:
            return Fence(False, f"replica {replica_id} is not a member of quorum {quorum_id}")
        if replica_id not in self._last_seen:
            return Fence(False, f"replica {replica_id} was evicted; it may not commit")
        self._sealed[key] = None
        if len(self._sealed) > _SEALED_KEPT:
            self._sealed.popitem(last=False)
        after = (step + 1, next_history(ref.history, quorum_id, step + 1))
        self._lineage[after[1]] = (after[0], ref.history)
        if len(self._lineage) > _LINEAGE_KEPT:
            self._lineage.popitem(last=False)
        for rid in prev.replica_ids:
            if rid in self._last_seen:
                self._know(rid, *after)
        return Fence(True, f"quorum {quorum_id} sealed by {replica_id} at step {step}")

    # -- bookkeeping -------------------------------------------------------------

    def _advance(self, now: float) -> float:
        # A clock that steps back would break the time order of the tables.
        self._now = max(self._now, now)
        return self._now

    def _see(self, replica_id: str, now: float, incarnation: str) -> tuple[Eviction, ...]:
        """Mark a replica alive; a new incarnation first evicts the one it replaced."""
        evicted: tuple[Eviction, ...] = ()
        known = self._incarnations.get(replica_id)
        if incarnation and known and known != incarnation and not is_older(incarnation, known):
            evicted = self._evict(replica_id, EvictionCause.RESTARTED)
        if incarnation and not self.is_stale(replica_id, incarnation):
            self._incarnations[replica_id] = incarnation
        self._last_seen.pop(replica_id, None)
        self._last_seen[replica_id] = now
        return evicted

    def _know(self, replica_id: str, step: int, history: str) -> None:
        """Record a live replica's newest committed step (and keep the max current).

        An abandoned history counts for nothing: its holder must heal.
        """
        old = self._committed.pop(replica_id, None)
        if old is not None:
            self._uncount(old[0])
        if history in self._abandoned:
            return
        self._committed[replica_id] = (step, history)
        self._step_counts[step] = self._step_counts.get(step, 0) + 1
        self._newest = max(self._newest, step)
        high = self._high
        if step > high.step or (step == high.step and history == high.history):
            holders = high.holders if step == high.step else ()
            if replica_id not in holders:
                self._high = Reference(step, history, tuple(sorted((*holders, replica_id))))

    def _uncount(self, step: int) -> None:
        left = self._step_counts[step] - 1
        if left:
            self._step_counts[step] = left
            return
        del self._step_counts[step]
        if step == self._newest:
            self._newest = max(self._step_counts, default=0)

    def _mark_missing(self, replica_id: str) -> None:
        if self._previous is not None and replica_id in self._previous.replica_ids:
            self._prev_missing.add(replica_id)

    def _evict(self, replica_id: str, cause: EvictionCause) -> tuple[Eviction, ...]:
        seen = self._last_seen.pop(replica_id, None)
        self._joiners.pop(replica_id, None)
        self._incarnations.pop(replica_id, None)
        committed = self._committed.pop(replica_id, None)
        if committed is not None:
            self._uncount(committed[0])
        if seen is None:
            return ()
        self._mark_missing(replica_id)
        prev = self._previous
        in_quorum = prev is not None and replica_id in prev.replica_ids
        ref = self._formed_from
        sealed = prev is not None and ref is not None and (prev.quorum_id, ref.step) in self._sealed
        if in_quorum and not sealed:
            self._broken = self._broken or f"member {replica_id} was evicted ({cause.value})"
        return (Eviction(replica_id, cause, in_quorum),)

    def _expire_only(self, now: float) -> tuple[Eviction, ...]:
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
        evicted += self._expire_only(now)
        members, reason = self._decide(now)
        self._reason = reason
        if members is None:
            return Update(None, evicted, reason, self._deadline(now))
        formed, discarded = self._form(members, now)
        return Update(formed, evicted, reason, self._deadline(now), discarded)

    def _candidates(self) -> list[Member]:
        """The joiners in replica-id order; with shrink_only, only previous members.

        A member holding an abandoned history is handed out as dirty, so every
        member's plan makes it heal -- unless no member holds anything else:
        then the job continues from the best state that is left (and the
        branch it leaves behind is recorded as abandoned when the quorum forms).
        """
        members = sorted((m for m, _ in self._joiners.values()), key=lambda m: m.replica_id)
        prev = self._previous
        if prev is not None and any(m.shrink_only for m in members):
            keep = set(prev.replica_ids)
            members = [m for m in members if m.replica_id in keep]
        if self._abandoned and any(m.history not in self._abandoned for m in members):
            members = [
                replace(m, data={**m.data, DIRTY: True}) if m.history in self._abandoned else m
                for m in members
            ]
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
            return self._one_history(self._candidates(), fast)
        if joined < cfg.min_replicas:
            return None, f"waiting: {summary}, min_replicas is {cfg.min_replicas}"
        if joined * 2 <= alive:
            return None, (
                f"waiting: {summary}, more than half of the alive replicas must join"
                " (split-brain guard)"
            )
        first_join = next(iter(self._joiners.values()))[1]
        waited = now - first_join
        if prev is None:
            startup = self._startup_wait(now, waited, summary)
            if startup is not None:
                return None, startup
        stragglers = joined < alive
        patience = self._straggler_wait()
        if stragglers and waited < patience:
            # Counted, not named: naming them costs O(replicas) on every
            # event, and /status lists who has not joined.
            return None, (
                f"waiting: {summary}, {alive - joined} alive replicas have not joined;"
                f" forming without them at the join timeout"
                f" ({waited:.1f}/{patience:g}s)"
            )
        candidates = self._candidates()
        if len(candidates) < cfg.min_replicas:
            return None, (
                f"waiting: {summary}, shrink_only leaves {len(candidates)} previous members,"
                f" min_replicas is {cfg.min_replicas}"
            )
        if stragglers:
            formed = f"formed after the join timeout without stragglers ({summary})"
        else:
            formed = f"formed: every alive replica joined ({summary})"
        return self._one_history(candidates, formed)

    def _startup_wait(self, now: float, waited: float, summary: str) -> str | None:
        """Why this lighthouse's first quorum must wait longer, if it must."""
        expected = self._expected_groups
        if self._newest > 0 or self._joined_past_zero:
            # A job under way: unless every group it has is back, give every
            # live replica one heartbeat timeout to reconnect and tell its
            # step before anything forms.
            grace = self._started + self.config.heartbeat_timeout - now
            if grace > 0 and not (expected and len(self._last_seen) >= expected):
                return (
                    f"waiting: {summary}, the lighthouse started"
                    f" {now - self._started:.1f}s ago; every live replica gets"
                    f" {self.config.heartbeat_timeout:g}s to reconnect first"
                )
            return None
        if len(self._joiners) < expected and waited < self.config.join_timeout:
            return (
                f"waiting: {summary}, a new job's first quorum waits for the"
                f" {expected} groups of NUM_REPLICA_GROUPS"
                f" ({waited:.1f}/{self.config.join_timeout:g}s)"
            )
        return None

    def _one_history(
        self, candidates: list[Member], formed: str
    ) -> tuple[list[Member] | None, str]:
        """Form only if no live replica outside holds a newer committed step.

        Nor continue from an abandoned history while a live replica outside
        holds one that is not (only abandoned histories are not counted in
        ``_committed``, so any entry past step 0 is such a replica).
        """
        ref = reference(candidates)
        if ref is None:
            return candidates, formed
        joined = {m.replica_id for m in candidates}
        if ref.history in self._abandoned:
            live = sorted(
                rid for rid, (step, _) in self._committed.items() if step > 0 and rid not in joined
            )
            if live:
                return None, (
                    f"waiting: every joiner holds an abandoned history; {', '.join(live)}"
                    " holds one that is not, so the quorum waits for it to join or to be lost"
                )
        if ref.step >= self._newest:
            return candidates, formed
        holders = sorted(
            rid
            for rid, (step, _) in self._committed.items()
            if step == self._newest and rid not in joined
        )
        return None, (
            f"waiting: {', '.join(holders)} holds committed step {self._newest}, newer than"
            f" every joiner's ({ref.step}); forming without it would fork the history,"
            " so the quorum waits for it to join or to be lost (POST /v1/kill abandons its steps)"
        )

    def _form(self, members: list[Member], now: float) -> tuple[Quorum, Discard | None]:
        ids = tuple(m.replica_id for m in members)
        prev = self._previous
        failures = any(m.commit_failures > 0 for m in members)
        if prev is None or prev.replica_ids != ids or failures or self._restarted(prev, members):
            self._quorum_id += 1
        quorum = Quorum(self._quorum_id, tuple(members), now)
        # A new formation: whatever of the previous one was not sealed can no
        # longer commit (its fences no longer match), and nothing broke this one yet.
        self._broken = None
        self._formed_from = reference(members)
        self._previous = quorum
        self._prev_missing = set(ids)
        for rid in ids:
            del self._joiners[rid]
        # Joiners left out (shrink_only) wait for the next quorum; its join
        # timeout counts from now, not from their first attempt.
        self._joiners = {rid: (m, now) for rid, (m, _) in self._joiners.items()}
        graces = (m.join_grace for m, _ in self._joiners.values() if m.join_grace is not None)
        self._grace = min(graces, default=math.inf)
        return quorum, self._abandon(quorum)

    @staticmethod
    def _restarted(prev: Quorum, members: list[Member]) -> bool:
        """Did any member restart since the previous quorum (a new incarnation)?"""
        before = {m.replica_id: m.incarnation for m in prev.members}
        return any(before.get(m.replica_id, m.incarnation) != m.incarnation for m in members)

    def _abandon(self, quorum: Quorum) -> Discard | None:
        """Record the newest history the job reached, if this quorum leaves it behind.

        The no-fork rule lets that happen only when no live replica holds it
        (or, at one step, by the reference rule between two histories).
        """
        ref, high = self._formed_from, self._high
        if ref is None or self._descends(ref, high):
            if ref is not None and ref.step > high.step:
                self._high = ref
            return None
        first = self._parting_step(high, ref)
        self._abandon_branch(high.history, first)
        if ref.history in self._abandoned:
            del self._abandoned[ref.history]  # nothing else was left: it lives again
        discard = Discard(high.holders, first, high.step, high.history, ref.step, quorum.quorum_id)
        self._discards.append(discard)
        self.discarded_steps += high.step - first + 1
        self._high = ref
        return discard

    def _descends(self, state: Reference, ancestor: Reference) -> bool:
        """Is ``ancestor`` on the path of commits that led to ``state``?

        Where the fenced lineage runs out, a newer step is taken to descend.
        """
        history, step = state.history, state.step
        while step > ancestor.step and history in self._lineage:
            step, history = self._lineage[history][0] - 1, self._lineage[history][1]
        if step > ancestor.step:
            return True
        return step == ancestor.step and history == ancestor.history

    def _parting_step(self, abandoned: Reference, kept: Reference) -> int:
        """The first step of the abandoned branch that the kept state does not share.

        Walks the fenced lineage back; where it runs out (commits fenced by a
        lighthouse that has restarted since), assumes the branches part just
        above the kept step.
        """
        shared = {kept.history}
        history = kept.history
        while history in self._lineage:
            history = self._lineage[history][1]
            shared.add(history)
        first = min(kept.step + 1, abandoned.step)
        history = abandoned.history
        while history not in shared and history in self._lineage:
            first, history = self._lineage[history]
        return min(first, abandoned.step)

    def _abandon_branch(self, history: str, first: int) -> None:
        """Mark ``history`` and its ancestors down to step ``first`` abandoned."""
        while history != GENESIS:
            self._abandoned[history] = None
            if len(self._abandoned) > _LINEAGE_KEPT:
                self._abandoned.popitem(last=False)
            if history not in self._lineage or self._lineage[history][0] <= first:
                return
            history = self._lineage[history][1]

    def _straggler_wait(self) -> float:
        """How long after the first join the core waits for live replicas that have not joined.

        The join timeout, cut to the shortest grace a joiner asked for: a
        group in asynchronous mode would rather commit without a straggler
        (whose pseudo-gradient joins a later step) than idle for it.  A
        joiner evicted before the quorum formed may still hold the minimum
        until then; that only forms the quorum sooner, never later.
        """
        return min(self.config.join_timeout, self._grace)

    def _deadline(self, now: float) -> float | None:
        """The earliest time at which a tick could change anything."""
        times = []
        if self._last_seen:
            times.append(next(iter(self._last_seen.values())) + self.config.heartbeat_timeout)
        if self._joiners:
            join_deadline = next(iter(self._joiners.values()))[1] + self._straggler_wait()
            grace = self._started + self.config.heartbeat_timeout
            if self._previous is None and grace > now:
                times.append(grace)
            if join_deadline > now:
                times.append(join_deadline)
            elif self._decide(now)[0] is not None:
                # Joiners left out of the quorum just formed can form the next one at once
                # (join_timeout 0).  Otherwise a passed join timeout is no reason to tick:
                # returning it would make the server re-arm a timer in the past and spin.
                times.append(now)
        return min(times) if times else None
