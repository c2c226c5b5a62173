"""What the dashboard shows of a job's past: its event timeline and each quorum's members.

Bounded (the oldest go first), kept by the server as quorums form and
replicas come and go, and read whole by ``/status``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from ftwire.messages import DATA_INFO, DATA_LOSS, Member, Quorum

# The latest events (evictions, restarts, heals, discarded history, operator
# actions) and each quorum's member steps, losses and paces.
_EVENTS = 200
_STEP_POINTS = 600


class Timeline:
    """The dashboard's timeline and step chart."""

    def __init__(self) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=_EVENTS)
        self.step_history: deque[dict[str, Any]] = deque(maxlen=_STEP_POINTS)
        # Each replica's incarnation as last seen in a quorum, to tell restarts.
        self._incarnations: dict[str, str] = {}

    def add(self, kind: str, text: str, **fields: Any) -> None:
        """One entry of the dashboard's timeline (bounded: the oldest go first)."""
        self.events.append({"time": time.time(), "kind": kind, "text": text, **fields})

    def quorum(self, quorum: Quorum, step: int, formed_unix: float) -> None:
        """Restarts and heals a quorum shows, and its members' steps for the chart."""
        for m in quorum.members:
            before = self._incarnations.get(m.replica_id)
            if before is not None and m.incarnation and before != m.incarnation:
                self.add(
                    "restart",
                    f"{m.replica_id} restarted and rejoined at step {m.step}",
                    replica_id=m.replica_id,
                )
            if m.incarnation:
                self._incarnations[m.replica_id] = m.incarnation
            if m.step < step:
                self.add(
                    "heal",
                    f"{m.replica_id} heals from step {m.step} to step {step}",
                    replica_id=m.replica_id,
                )
        losses = {
            m.replica_id: loss
            for m in quorum.members
            if type(loss := m.data.get(DATA_LOSS)) is float and math.isfinite(loss)
        }
        paces = {m.replica_id: pace for m in quorum.members if (pace := member_pace(m))}
        self.step_history.append(
            {
                "time": formed_unix,
                "steps": {m.replica_id: m.step for m in quorum.members},
                "losses": losses,
                "paces": paces,
            }
        )


# What a group of unequal speed says of its pace in its join info (DiLoCo's
# ``_tell_peers``), and the names /status and the step history give them.
PACE_KEYS = {"rate": "rate", "h": "local_steps", "staleness": "staleness"}


def member_pace(member: Member) -> dict[str, float]:
    """A member's inner-step rate, H and staleness, as far as its join info says (DyLU, async).

    Empty for a group that says nothing of its pace (plain DiLoCo, LocalSGD);
    values that are not finite numbers are left out: the info is free-form.
    """
    info = member.data.get(DATA_INFO)
    if not isinstance(info, dict):
        return {}
    pace = {}
    for key, name in PACE_KEYS.items():
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # a bool is an int to isinstance, but no rate
        if math.isfinite(value):
            pace[name] = float(value)
    return pace
