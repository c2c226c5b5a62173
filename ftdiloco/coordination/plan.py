"""What every member of a quorum works out from it, identically and without talking.

The lighthouse hands the same :class:`~ftwire.messages.Quorum` to every
replica group.  Each rank of each group turns it into a :class:`QuorumPlan`
with :func:`plan_quorum`: its rank among the participants, the step everyone
will be at after healing, who must heal and from whom, and where to
rendezvous for the cross-group collectives.  Because the function is pure and
depends only on the quorum (plus the caller's own identity), no further
coordination is needed for all ranks to agree -- which is what lets a group
heal and rebuild its process group without a second round trip.

Nothing here does I/O or imports torch, so every rule is table-tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ftwire.history import DIRTY, healing
from ftwire.messages import DATA_INFO, Member, Quorum, SettingsChange
from ftwire.protocol import settings_at

__all__ = ["DIRTY", "QuorumPlan", "members_by_id", "plan_quorum"]


@dataclass(frozen=True)
class QuorumPlan:
    """One group rank's view of a quorum; fields marked *shared* are equal for every member."""

    quorum_id: int
    replica_id: str
    # Index of this group among ``participants``: its rank in the cross-group
    # process group of every group rank.
    replica_rank: int
    # Shared: how many groups take part in this outer step.
    replica_world_size: int
    # Shared: replica ids, sorted, so the ranks do not depend on join order.
    participants: tuple[str, ...]
    # Shared: the step every participant holds once healing is done.
    max_step: int
    # Shared: the history of that state (ftwire.history): a group at
    # max_step with another history is behind like any other.
    history: str
    # Shared: the groups whose committed state is the reference, sorted; they
    # serve heals.  With ``init_sync`` at step 0 this is only the primary.
    up_to_date: tuple[str, ...]
    # Shared: the groups that must copy state before the allreduce, sorted.
    recovering: tuple[str, ...]
    # This group must heal before the allreduce.
    heal: bool
    # Whom this group rank copies its state from; None when not healing.
    donor: Member | None
    # Shared: the rendezvous store every group's rank ``group_rank`` meets on.
    store_address: str
    # Unique per quorum id and group rank, so process groups of different
    # quorums or group ranks never read each other's keys on the shared store.
    store_prefix: str
    # Shared: the live settings (outer lr, momentum) in effect for this outer
    # step, as the lighthouse handed them out; None: the script's own stand.
    outer_settings: SettingsChange | None = None
    # Shared: what each participant told the others with its join
    # (Manager.set_join_info), by replica id; groups that said nothing are absent.
    peer_info: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def members_by_id(quorum: Quorum) -> dict[str, Member]:
    """Index the quorum's members by replica id; a duplicate id is a broken quorum."""
    members: dict[str, Member] = {}
    for member in quorum.members:
        if member.replica_id in members:
            raise ValueError(
                f"quorum {quorum.quorum_id} lists replica {member.replica_id!r} more than once"
            )
        members[member.replica_id] = member
    return members


def plan_quorum(
    quorum: Quorum, replica_id: str, group_rank: int, *, init_sync: bool = True
) -> QuorumPlan:
    """Compute this group rank's plan for one outer step.

    ``init_sync``: while no step has been committed (max step 0), groups may
    have started from different random weights, so every group except the
    *primary* (the first participant by replica id) heals from it; step 0's
    allreduce then averages pseudo-gradients of one set of global weights.

    Heals are spread two ways so that no single donor serves everything: the
    i-th recovering group (sorted) at group rank r copies from
    ``up_to_date[(i + r) % len(up_to_date)]`` -- different recovering groups
    start on different donors, and the ranks of one group fan out over donors.

    Raises ValueError if ``replica_id`` is not a member, ``group_rank`` is not
    a rank of this group, or the groups disagree on their world size (rank r
    of the larger group would wait for peers that do not exist until its
    collective deadline).
    """
    if group_rank < 0:
        raise ValueError(f"group_rank must be >= 0, got {group_rank}")
    members = members_by_id(quorum)
    me = members.get(replica_id)
    if me is None:
        raise ValueError(
            f"replica {replica_id!r} is not in quorum {quorum.quorum_id} "
            f"(members: {', '.join(sorted(members)) or 'none'})"
        )
    if group_rank >= me.world_size:
        raise ValueError(
            f"group_rank {group_rank} is outside replica {replica_id!r}'s world size "
            f"{me.world_size} as reported to the lighthouse"
        )
    world_sizes = {m.world_size for m in members.values()}
    if len(world_sizes) > 1:
        sizes = ", ".join(f"{rid}={members[rid].world_size}" for rid in sorted(members))
        raise ValueError(
            f"quorum {quorum.quorum_id} mixes groups of different world sizes ({sizes}); "
            "every group must have the same number of ranks"
        )

    participants = tuple(sorted(members))
    # The state the quorum continues from, by the one rule of
    # ftwire.history: highest step, then the most common history.  A
    # group whose heal failed half-way holds torn state at its old step: it
    # must heal, and must never be a donor, even if no one else is left.
    heals = healing(members.values(), init_sync=init_sync)
    if heals is None:
        raise ValueError(
            f"no member of quorum {quorum.quorum_id} holds committed state: every one "
            "is recovering from a failed heal; restart from a checkpoint"
        )
    ref, up_to_date, recovering = heals.reference, heals.donors, heals.recovering
    max_step = ref.step

    heal = replica_id in recovering
    donor = None
    if heal:
        index = recovering.index(replica_id)
        donor = members[up_to_date[(index + group_rank) % len(up_to_date)]]

    return QuorumPlan(
        quorum_id=quorum.quorum_id,
        replica_id=replica_id,
        replica_rank=participants.index(replica_id),
        replica_world_size=len(participants),
        participants=participants,
        max_step=max_step,
        history=ref.history,
        up_to_date=up_to_date,
        recovering=recovering,
        heal=heal,
        donor=donor,
        # Chosen from the quorum alone so that every group agrees on it.  An
        # up-to-date group has been running, whereas a recovering one may have
        # just (re)started, so its store is the likelier one to be serving.
        store_address=members[up_to_date[0]].store_address,
        store_prefix=f"ftdiloco/q{quorum.quorum_id}/g{group_rank}",
        outer_settings=settings_at(quorum.settings, max_step),
        peer_info={
            rid: info
            for rid in participants
            if isinstance(info := members[rid].data.get(DATA_INFO), dict)
        },
    )
