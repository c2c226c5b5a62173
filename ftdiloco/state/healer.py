"""Healing a group from a live peer, and serving its own state to peers that heal.

Between ``start_quorum`` and the commit a clean group's registered state does
not change, so it is published on the group's StateServer for peers to copy.
A group that must heal copies its donor's committed state into its own
tensors (no second copy of the state in memory); until that succeeds it is
*dirty*: it serves nothing, never counts as a donor, and heals again at the
next quorum.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import torch

from ftdiloco.config import Config
from ftdiloco.coordination.metrics import GroupMetrics
from ftdiloco.coordination.plan import QuorumPlan
from ftdiloco.state.heal import HealError, StateServer, fetch_state
from ftdiloco.state.registry import StateRegistry
from ftwire.background import BackgroundLoop
from ftwire.messages import DATA_HEAL


class Healer:
    """Publishes this rank's committed state, and replaces it with a donor's."""

    def __init__(
        self,
        config: Config,
        group_rank: int,
        states: StateRegistry,
        metrics: GroupMetrics,
        log: Any,
    ) -> None:
        self._config = config
        self._group_rank = group_rank
        self._states = states
        self._metrics = metrics
        self._log = log
        self.server = StateServer(config.token)
        # True from the start of a heal until one succeeds: the state is torn.
        self.dirty = False

    def publish(self, step: int) -> None:
        """Offer the committed state of ``step`` to peers (until :meth:`retract`)."""
        if not self.dirty and self._states:
            self.server.publish(step, self._states.tensors())

    def retract(self) -> None:
        """The caller is about to change the published state."""
        self.server.retract()

    def heal(self, plan: QuorumPlan, loop: BackgroundLoop, session: aiohttp.ClientSession) -> None:
        """Copy the committed state of ``plan.donor`` (this group rank's peer) into ours."""
        donor = plan.donor
        assert donor is not None
        addresses = donor.data.get(DATA_HEAL)
        if not isinstance(addresses, list) or len(addresses) <= self._group_rank:
            raise HealError(f"donor {donor.replica_id} sent no heal address", "protocol")
        self.server.retract()
        self.dirty = True
        local = self._states.tensors()

        def destination(
            layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        ) -> dict[str, torch.Tensor]:
            out = {}
            for name, dtype, shape in layout:
                mine = local.get(name)
                fits = mine is not None and (mine.dtype, tuple(mine.shape)) == (dtype, shape)
                if mine is None or not fits or not mine.is_contiguous():
                    mine = torch.empty(shape, dtype=dtype)  # e.g. optimizer state not made yet
                out[name] = mine
            return out

        timeout = self._config.heal_timeout
        started = time.perf_counter()
        received = loop.run(
            fetch_state(
                addresses[self._group_rank],
                plan.max_step,
                destination,
                token=self._config.token,
                timeout=timeout,
                session=session,
            ),
            timeout=timeout + 5,
        )
        self._states.load(received)
        self.dirty = False
        seconds = time.perf_counter() - started
        self._metrics.heals.inc()
        self._metrics.heal_seconds.inc(seconds)
        self._metrics.heal_bytes.inc(sum(t.numel() * t.element_size() for t in received.values()))
        self._log.info(
            "healed",
            donor=donor.replica_id,
            step=plan.max_step,
            tensors=len(received),
            seconds=round(seconds, 3),
        )
