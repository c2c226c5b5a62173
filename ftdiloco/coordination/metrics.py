"""Prometheus metrics of one training process, served at ``GET /metrics`` on its manager port.

What an operator watches per group: steps committed and rolled back, the
step, the last loss the script reported, how long syncs take and how much of
them the inner loop did not wait for, bytes sent, heals, how many groups
took part, and (groups of unequal speed) the group's H, rate and staleness.
The registry is per process (never the global one), so several managers in
one test process do not collide.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# "_created" series double every counter's output and tell an operator nothing here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GroupMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.committed = Counter("ftdiloco_steps_committed", "Outer steps committed.", registry=r)
        self.rolled_back = Counter(
            "ftdiloco_steps_rolled_back", "Outer steps rolled back to the backup.", registry=r
        )
        self.step = Gauge(
            "ftdiloco_step", "Outer steps committed so far (the job's step).", registry=r
        )
        self.loss = Gauge("ftdiloco_loss", "Last training loss the script reported.", registry=r)
        self.eval_loss = Gauge(
            "ftdiloco_eval_loss", "Last held-out loss the script reported.", registry=r
        )
        self.sync_seconds = Histogram(
            "ftdiloco_sync_seconds",
            "From the start of an outer step to its commit or rollback.",
            buckets=_SYNC_BUCKETS,
            registry=r,
        )
        self.hidden = Gauge(
            "ftdiloco_hidden_fraction",
            "Share of the last sync the inner loop did not wait for.",
            registry=r,
        )
        self.sent = Counter(
            "ftdiloco_sent_bytes", "Pseudo-gradient payload bytes this group sent.", registry=r
        )
        self.heals = Counter("ftdiloco_heals", "Heals from a peer.", registry=r)
        self.heal_seconds = Counter(
            "ftdiloco_heal_seconds", "Seconds spent copying state from peers.", registry=r
        )
        self.heal_bytes = Counter(
            "ftdiloco_heal_bytes", "Bytes of state received from peers.", registry=r
        )
        self.participants = Gauge(
            "ftdiloco_quorum_participants", "Groups in the current outer step.", registry=r
        )
        # Groups of unequal speed (DyLU, async): how this group is paced, and
        # how late its work arrives.
        self.local_steps = Gauge(
            "ftdiloco_inner_steps_per_outer_step",
            "Inner steps this group takes per outer period (DyLU: H_w; else sync_every).",
            registry=r,
        )
        self.inner_rate = Gauge(
            "ftdiloco_inner_step_rate",
            "Inner steps per second of this group's own work, outer steps left out.",
            registry=r,
        )
        self.staleness = Gauge(
            "ftdiloco_staleness",
            "Outer steps the global state moved since the last pseudo-gradient this group"
            " contributed was taken (async).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
