"""The messages the lighthouse and the replica groups exchange, as typed values.

:mod:`ftwire.protocol` encodes and checks them on the wire; the lighthouse's
core (:mod:`lighthouse.quorum`) and the groups' planner
(:mod:`ftdiloco.coordination.plan`) read them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ftwire.history import GENESIS

# Keys of ``Member.data`` that both sides read.
# Each group rank's heal address (a list, indexed by group rank).
DATA_HEAL = "heal"
# The training script's last reported loss, for the dashboard's chart.
DATA_LOSS = "loss"
# What a group tells its peers with its join (Manager.set_join_info).
DATA_INFO = "info"

# A job's settings an operator may change while it runs, with what each may be.
SETTINGS = ("outer_lr", "outer_momentum")


@dataclass(frozen=True)
class SettingsChange:
    """The settings in effect from ``from_step`` on: an outer step taken by a quorum
    at step ``from_step`` or later uses them (until a later change).

    Values are complete (every setting ever given, the newest value of each);
    None: never set, the training script's own value stands.
    """

    from_step: int
    outer_lr: float | None = None
    outer_momentum: float | None = None

    def encode(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"from_step": self.from_step}
        for name in SETTINGS:
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return fields


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
    # Unique per process start ("" from clients that do not say).
    incarnation: str = ""
    # Digest of the committed history that led to ``step`` (ftwire.history).
    history: str = GENESIS
    # NUM_REPLICA_GROUPS as the member knows it; 0: not known.
    expected_groups: int = 0
    # The longest the others should wait for stragglers once this member has
    # joined (async DiLoCo's grace window); None: the lighthouse's join timeout.
    join_grace: float | None = None


@dataclass(frozen=True)
class Quorum:
    """One quorum, identical for every member it is handed to.

    The lighthouse's core forms it and its server hands it out; every rank of
    every member decodes it once, as this same type.
    """

    quorum_id: int
    members: tuple[Member, ...]
    # When it formed: the core's monotonic clock inside the lighthouse, unix
    # time once encoded (the server converts).
    created: float
    # Live settings (set-outer-lr) in effect and decided since, ordered by
    # from_step; the server adds them to the answer.
    settings: tuple[SettingsChange, ...] = ()

    @functools.cached_property
    def replica_ids(self) -> tuple[str, ...]:
        """The members' ids, in the quorum's order (computed once: the core asks often)."""
        return tuple(m.replica_id for m in self.members)


@dataclass(frozen=True)
class Fence:
    """The answer to a group that asks whether it may commit its quorum's step."""

    commit: bool
    reason: str
