"""Live settings of a job (the outer learning rate and momentum), changed while it runs.

An operator asks for a change (``POST /v1/settings``); the lighthouse decides,
once, from which step it applies -- the step after the one of the next quorum
it forms -- and from then on hands every quorum the changes that matter to it:
the one in effect at its step and any decided after it.  Every group of a
quorum computes the same values for the same step from the same list, so the
change takes effect at one outer step on every group (I1), a group that joins
late included.  Pure: no I/O, no clock; the server calls it.

Soft state, like the rest of the lighthouse: a restarted lighthouse has no
changes, and groups keep the values they hold (set them again after a restart).
"""

from __future__ import annotations

from typing import Any

from ftwire.history import reference
from ftwire.messages import SETTINGS, Quorum, SettingsChange
from ftwire.protocol import MAX_SETTINGS_CHANGES, settings_at


def quorum_step(quorum: Quorum) -> int:
    """The step a quorum's outer step is taken at (the state it continues from)."""
    ref = reference(quorum.members)
    if ref is not None:
        return ref.step
    return max((m.step for m in quorum.members), default=0)


class LiveSettings:
    def __init__(self) -> None:
        # Decided changes, by increasing from_step (bounded).
        self.changes: list[SettingsChange] = []
        # Asked for, not yet given a step: complete values.
        self.pending: dict[str, float] | None = None

    def latest(self) -> dict[str, float]:
        """The newest values asked for (pending or decided), setting by setting."""
        if self.pending is not None:
            return dict(self.pending)
        if not self.changes:
            return {}
        last = self.changes[-1]
        return {n: getattr(last, n) for n in SETTINGS if getattr(last, n) is not None}

    def request(self, values: dict[str, float]) -> dict[str, float]:
        """Record a change (only the settings given change); returns the values pending."""
        self.pending = {**self.latest(), **values}
        return dict(self.pending)

    def for_quorum(self, step: int) -> tuple[SettingsChange, ...]:
        """The changes to hand out with a quorum at ``step``; decides a pending change."""
        if self.pending is not None:
            start = step + 1
            # A newer decision replaces what an older one said about these steps
            # (only possible after the job went back to an earlier step).
            kept = [c for c in self.changes if c.from_step < start]
            self.changes = [*kept, SettingsChange(start, **self.pending)][-MAX_SETTINGS_CHANGES:]
            self.pending = None
        now = settings_at(self.changes, step)
        return tuple(c for c in self.changes if c is now or c.from_step > step)

    def status(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "changes": [c.encode() for c in self.changes],
        }
