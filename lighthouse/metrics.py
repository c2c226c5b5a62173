"""The lighthouse's Prometheus metrics (``GET /metrics``), on a registry of its own.

A registry per server, never the global one: several lighthouses (a test's,
a lease's standby, the rooms of one daemon) live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lighthouse.quorum import EvictionCause

# "_created" series double every counter's output and tell an operator nothing here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class LighthouseMetrics:
    """Quorums, joins, evictions, fences and discarded steps, as an operator watches them."""

    def __init__(self, alive: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.quorums = Counter(
            "lighthouse_quorums_formed", "Quorums formed.", registry=self.registry
        )
        self.latency = Histogram(
            "lighthouse_quorum_latency_seconds",
            "From the arrival of the last member's join to the release of every waiter.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.alive = Gauge(
            "lighthouse_members_alive", "Replicas currently seen alive.", registry=self.registry
        )
        self.alive.set_function(alive)
        self.evictions = Counter(
            "lighthouse_evictions", "Replicas evicted.", ["cause"], registry=self.registry
        )
        for cause in EvictionCause:
            self.evictions.labels(cause.value)
        self.joins = Counter(
            "lighthouse_join_requests", "Join requests received.", registry=self.registry
        )
        self.quorum_size = Gauge(
            "lighthouse_quorum_size",
            "Members of the quorum formed last (0 before the first).",
            registry=self.registry,
        )
        self.joins_refused = Counter(
            "lighthouse_joins_refused",
            "Join requests refused, by reason (the error code of the answer).",
            ["reason"],
            registry=self.registry,
        )
        for reason in _JOIN_REFUSALS:
            self.joins_refused.labels(reason)
        self.joins_timed_out = Counter(
            "lighthouse_joins_timed_out",
            "Join requests answered with a timeout: no quorum formed in the time they gave.",
            registry=self.registry,
        )
        self.discarded = Counter(
            "lighthouse_steps_discarded",
            "Committed steps abandoned because every group holding them died.",
            registry=self.registry,
        )
        self.fences = Counter(
            "lighthouse_fences", "Commit fences answered.", ["commit"], registry=self.registry
        )
        for answer in ("true", "false"):
            self.fences.labels(answer)


# Refusals of a join an operator may want to see at zero before the first one.
_JOIN_REFUSALS = (
    "unauthorized",
    "bad_request",
    "too_large",
    "standby",
    "overloaded",
    "shutting_down",
    "stale_incarnation",
    "superseded",
    "evicted",
)
