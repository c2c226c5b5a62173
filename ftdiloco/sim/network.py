"""Simulated time: compute per inner step, links with bandwidth and latency.

The simulator trains for real but keeps time on paper: each worker has a
clock that an inner step advances by its compute time (measured, or given,
divided by the worker's speed factor) and a sync advances to when the
exchange is done.  From the clocks come what a user wants to know before
renting a cluster: wall-clock time, time waiting for the network, compute
utilization and bytes on the wire.

Collective costs (``n`` participants, each behind its own link; a ring is as
fast as its slowest link, and a step of the ring pays the link's latency):

- fp32 allreduce (ring reduce-scatter + allgather): ``2 (n-1)`` ring steps of
  ``B / n`` bytes;
- compressed exchange (allgather of payloads of ``P`` bytes, see
  :mod:`ftdiloco.training.compression`): ``n - 1`` ring steps of ``P`` bytes;
- a heal: the state's bytes over the slower of donor's and recipient's links;
- joining a quorum: one ``quorum_latency`` (a lighthouse round trip).

These are the textbook bandwidth-optimal costs; they ignore congestion,
protocol overhead and compute-communication interference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _per_worker(
    name: str, value: float | Sequence[float], n: int, *, positive: bool
) -> list[float]:
    values = [float(value)] * n if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} workers")
    for v in values:
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {v}")
    return values


@dataclass(frozen=True)
class NetworkModel:
    """Links and compute speeds of the simulated workers.

    ``bandwidth`` (bits/s) and ``latency`` (s): one value for every worker's
    link or one per worker.  ``step_time`` (s per inner step): None measures
    each worker's real inner step; a number (or one per worker) makes the
    simulated clock exactly reproducible.  ``speed``: per-worker speed factors
    (0.5 = a straggler taking twice as long per step).  ``quorum_latency``:
    seconds to join a quorum (default: twice the largest link latency).
    """

    bandwidth: float | Sequence[float] = 10e9
    latency: float | Sequence[float] = 1e-3
    step_time: float | Sequence[float] | None = None
    speed: float | Sequence[float] = 1.0
    quorum_latency: float | None = None

    def for_workers(self, n: int) -> Links:
        """This model resolved for ``n`` workers; raises ValueError naming a bad field."""
        if self.quorum_latency is not None and not (
            math.isfinite(self.quorum_latency) and self.quorum_latency >= 0
        ):
            raise ValueError(f"quorum_latency must be >= 0, got {self.quorum_latency}")
        latency = _per_worker("latency", self.latency, n, positive=False)
        return Links(
            bandwidth=_per_worker("bandwidth", self.bandwidth, n, positive=True),
            latency=latency,
            step_time=None
            if self.step_time is None
            else _per_worker("step_time", self.step_time, n, positive=False),
            speed=_per_worker("speed", self.speed, n, positive=True),
            quorum_latency=self.quorum_latency
            if self.quorum_latency is not None
            else 2 * max(latency, default=0.0),
        )


@dataclass(frozen=True)
class Links:
    """A :class:`NetworkModel` resolved per worker (index = worker)."""

    bandwidth: list[float]
    latency: list[float]
    step_time: list[float] | None
    speed: list[float]
    quorum_latency: float

    def compute_seconds(self, worker: int, measured: float) -> float:
        base = self.step_time[worker] if self.step_time is not None else measured
        return base / self.speed[worker]

    def _ring_step(self, workers: Sequence[int], nbytes: float) -> float:
        return max(self.latency[w] + 8 * nbytes / self.bandwidth[w] for w in workers)

    def allreduce_seconds(self, workers: Sequence[int], nbytes: int) -> float:
        n = len(workers)
        return 0.0 if n < 2 else 2 * (n - 1) * self._ring_step(workers, nbytes / n)

    def allgather_seconds(self, workers: Sequence[int], payload_bytes: int) -> float:
        n = len(workers)
        return 0.0 if n < 2 else (n - 1) * self._ring_step(workers, payload_bytes)

    def heal_seconds(self, donor: int, recipient: int, nbytes: int) -> float:
        return self._ring_step((donor, recipient), nbytes)


def wire_bytes(nbytes: int, workers: int, coded: bool) -> int:
    """Bytes one worker sends for one exchange (ring allreduce, or allgather of payloads)."""
    if workers < 2:
        return 0
    if coded:
        return (workers - 1) * nbytes
    return round(2 * (workers - 1) * nbytes / workers)


@dataclass(frozen=True)
class WhatIf:
    """One row of :func:`what_if`: an algorithm on a link."""

    algorithm: str
    bandwidth: float
    step_seconds: float
    comm_seconds: float  # communication per outer period
    exposed_seconds: float  # of it, what the inner loop waits for
    utilization: float  # compute / (compute + exposed), over an outer period


def what_if(
    *,
    params: int,
    step_seconds: float,
    workers: int,
    sync_every: int,
    bandwidth: float,
    latency: float = 1e-3,
    bytes_per_value: float = 4.0,
    fragments: int = 1,
    sync_delay: int = 0,
    coded: bool = False,
    data_parallel: bool = False,
) -> WhatIf:
    """Compute utilization of one configuration from the network model alone (no training).

    Data parallel allreduces fp32 gradients after every inner step, without
    overlap (the worst case; overlap with backward would hide at most one
    backward pass).  DiLoCo exchanges the model once per ``sync_every`` steps;
    streaming sends ``fragments`` slices, one every ``sync_every / fragments``
    steps, and hides each behind ``sync_delay`` inner steps.
    """
    links = NetworkModel(bandwidth=bandwidth, latency=latency).for_workers(workers)
    ring = list(range(workers))
    nbytes = round(params * bytes_per_value)
    compute = sync_every * step_seconds

    def exchange(size: int) -> float:
        if coded:
            return links.allgather_seconds(ring, size) + links.quorum_latency
        return links.allreduce_seconds(ring, size) + links.quorum_latency

    if data_parallel:
        comm = sync_every * links.allreduce_seconds(ring, nbytes)
        exposed = comm
        name = "data parallel"
    else:
        per_fragment = exchange(math.ceil(nbytes / fragments))
        comm = fragments * per_fragment
        hidden = min(per_fragment, sync_delay * step_seconds)
        exposed = fragments * (per_fragment - hidden)
        name = "streaming" if fragments > 1 else "diloco"
    return WhatIf(
        algorithm=name,
        bandwidth=bandwidth,
        step_seconds=step_seconds,
        comm_seconds=comm,
        exposed_seconds=exposed,
        utilization=compute / (compute + exposed),
    )
