"""One history per job: the identity of a group's committed steps, and which one wins.

A step number alone cannot tell two states apart: two quorums that never met
may both commit "step 2" (a forked history).  So every group carries, with its
step, a digest chained over the commits that produced its state::

    history(0)     = GENESIS
    history(n + 1) = H(history(n), quorum id that committed it, n + 1)

Every member of a quorum that commits step n+1 computes the same digest, a
healed group takes its donor's, and two quorums that committed the same step
number apart (different quorum ids) end up with different digests.

The *reference* of a quorum -- the state every participant holds once healing
is done -- is chosen by one deterministic rule that every member and the
lighthouse compute alike from the members' reports (:func:`reference`):

1. only *clean* members count (a group whose heal failed half-way holds torn
   state at an old step);
2. the highest committed step wins;
3. among histories at that step, the one held by the most members wins;
4. a tie goes to the history held by the smallest replica id.

Members at the reference step with another history are behind like any
other group: they heal.  Nothing here does I/O; it is imported by the daemon
(which must stay torch-free) and by the training side's planner.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# The history of every group before its first commit.
GENESIS = ""
# Member.data key a group sets while its own state is torn by a failed heal.
DIRTY = "dirty"
# Length of a history digest in hex characters.
HISTORY_CHARS = 32


class _Reported(Protocol):
    """What a member reports of its state (duck-typed so both sides can use it)."""

    @property
    def replica_id(self) -> str: ...
    @property
    def step(self) -> int: ...
    @property
    def history(self) -> str: ...
    @property
    def data(self) -> Mapping[str, Any]: ...


def next_history(history: str, quorum_id: int, step: int) -> str:
    """The history after quorum ``quorum_id`` committed ``step`` on top of ``history``."""
    digest = hashlib.blake2b(digest_size=HISTORY_CHARS // 2)
    digest.update(f"{history}|{quorum_id}|{step}".encode())
    return digest.hexdigest()


def is_clean(member: _Reported) -> bool:
    return not member.data.get(DIRTY)


@dataclass(frozen=True)
class Reference:
    """The committed state a quorum continues from."""

    step: int
    history: str
    # Sorted replica ids of the members that hold it (the possible donors).
    holders: tuple[str, ...]


def reference(members: Iterable[_Reported]) -> Reference | None:
    """The state a quorum continues from, by the rule in this module's docstring.

    None if no member is clean.
    """
    clean = [m for m in members if is_clean(m)]
    if not clean:
        return None
    step = max(m.step for m in clean)
    by_history: dict[str, list[str]] = {}
    for m in clean:
        if m.step == step:
            by_history.setdefault(m.history, []).append(m.replica_id)
    history, holders = min(by_history.items(), key=lambda item: (-len(item[1]), min(item[1])))
    return Reference(step, history, tuple(sorted(holders)))


@dataclass(frozen=True)
class Healing:
    """Who serves the reference state and who must copy it, in a quorum."""

    reference: Reference
    # Sorted: the members that serve heals.
    donors: tuple[str, ...]
    # Sorted: the members that must heal before the allreduce.
    recovering: tuple[str, ...]


def healing(members: Iterable[_Reported], *, init_sync: bool = True) -> Healing | None:
    """Who heals in a quorum of ``members``; None if no member is clean.

    The donors are the reference's holders.  ``init_sync``: while no step has
    been committed (reference step 0) the groups may have started from
    different random weights, so only the *primary* (the smallest holder)
    serves and every other member heals from it.  The groups' planner and the
    lighthouse's /status both use this, so they cannot disagree.
    """
    members = list(members)
    ref = reference(members)
    if ref is None:
        return None
    donors = ref.holders[:1] if init_sync and ref.step == 0 else ref.holders
    recovering = tuple(sorted(m.replica_id for m in members if m.replica_id not in donors))
    return Healing(ref, donors, recovering)


# -- incarnations: one per process start --------------------------------------------


def new_incarnation() -> str:
    """A fresh incarnation: start time in nanoseconds (hex), then random bits.

    The time makes incarnations of one replica id comparable, so a stale
    process (frozen while its replacement started) can be told from the new one.
    """
    return f"{time.time_ns():x}-{secrets.token_hex(4)}"


def started_ns(incarnation: str) -> int | None:
    """When an incarnation's process started, if it says (None for foreign formats)."""
    head, sep, _ = incarnation.partition("-")
    try:
        return int(head, 16) if sep else None
    except ValueError:
        return None


def is_older(incarnation: str, than: str) -> bool:
    """Did ``incarnation`` start before ``than`` (both of one replica id)?"""
    a, b = started_ns(incarnation), started_ns(than)
    return a is not None and b is not None and a < b
