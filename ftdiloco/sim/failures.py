"""Which simulated worker fails when, and for how long.

A failure is a crash: the worker loses everything it has not committed (its
inner steps since the last outer step, and the outer step in flight, which
then rolls back on every participant, as a real job does when a member dies
mid-exchange), stays down for ``down_for``, and rejoins at the next outer
step by healing from a live worker -- the real restart path, through the
library's own DiLoCo.

Times are in inner steps (``unit="steps"``: exactly reproducible) or in
simulated seconds (``unit="seconds"``: the network model's clock).  Failures
come from a schedule, from a mean time between failures per worker (drawn
from an exponential distribution with the simulator's seed), or both.  A
failure that would leave no worker alive is skipped and counted: with no
live peer there is nothing to heal from, and a real job would restart from
a checkpoint instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Unit = Literal["steps", "seconds"]


@dataclass(frozen=True)
class Failure:
    """Worker ``worker`` crashes at ``at`` and is down for ``down_for`` (in the plan's unit)."""

    worker: int
    at: float
    down_for: float


@dataclass(frozen=True)
class FailurePlan:
    """Failure injection settings of a simulated run.

    ``mtbf``: mean time between failures of each worker (one value or one per
    worker; None or inf: only the schedule).  ``down_for``: how long a failed
    worker stays down.  ``schedule``: explicit failures.  ``unit``: "steps"
    (inner steps) or "seconds" (simulated).
    """

    mtbf: float | Sequence[float] | None = None
    down_for: float = 0.0
    schedule: Sequence[Failure] = field(default_factory=tuple)
    unit: Unit = "steps"

    def validate(self, num_nodes: int) -> None:
        if self.unit not in ("steps", "seconds"):
            raise ValueError(f"failures.unit must be 'steps' or 'seconds', got {self.unit!r}")
        if not (math.isfinite(self.down_for) and self.down_for >= 0):
            raise ValueError(f"failures.down_for must be >= 0, got {self.down_for}")
        for m in self._mtbfs(num_nodes):
            if not m > 0:
                raise ValueError(f"failures.mtbf must be > 0, got {m}")
        for f in self.schedule:
            if not 0 <= f.worker < num_nodes:
                raise ValueError(
                    f"failures.schedule: worker {f.worker} is not in 0..{num_nodes - 1}"
                )
            if not (math.isfinite(f.at) and f.at >= 0 and math.isfinite(f.down_for)):
                raise ValueError(f"failures.schedule: bad time in {f}")
            if f.down_for < 0:
                raise ValueError(f"failures.schedule: down_for must be >= 0 in {f}")

    def _mtbfs(self, n: int) -> list[float]:
        if self.mtbf is None:
            return [math.inf] * n
        if isinstance(self.mtbf, int | float):
            return [float(self.mtbf)] * n
        values = [float(m) for m in self.mtbf]
        if len(values) != n:
            raise ValueError(f"failures.mtbf has {len(values)} entries for {n} workers")
        return values


class FailureClock:
    """The next failure of each worker, drawn lazily so a run's length needs no bound."""

    def __init__(self, plan: FailurePlan, num_nodes: int, seed: int) -> None:
        plan.validate(num_nodes)
        self.plan = plan
        self._mtbf = plan._mtbfs(num_nodes)
        self._rngs = [random.Random(f"ftdiloco.sim.failures/{seed}/{w}") for w in range(num_nodes)]
        self._scheduled = [
            sorted((f for f in plan.schedule if f.worker == w), key=lambda f: f.at)
            for w in range(num_nodes)
        ]
        self._drawn: list[float] = [self._draw(w, 0.0) for w in range(num_nodes)]
        self.skipped = 0

    def _draw(self, worker: int, since: float) -> float:
        mtbf = self._mtbf[worker]
        if math.isinf(mtbf):
            return math.inf
        gap = self._rngs[worker].expovariate(1.0 / mtbf)
        if self.plan.unit == "steps":
            gap = max(1.0, float(math.ceil(gap)))
        return since + gap

    def next(self, worker: int) -> Failure | None:
        """The worker's next failure, or None if it never fails again."""
        scheduled = self._scheduled[worker]
        at = self._drawn[worker]
        if scheduled and scheduled[0].at <= at:
            return scheduled[0]
        if math.isinf(at):
            return None
        return Failure(worker, at, self.plan.down_for)

    def consume(self, failure: Failure, *, back_at: float) -> None:
        """``failure`` happened (or was skipped); the next one comes after ``back_at``."""
        scheduled = self._scheduled[failure.worker]
        if scheduled and scheduled[0] is failure:
            scheduled.pop(0)
        if self._drawn[failure.worker] <= back_at:  # drawn: it just happened, or is masked
            self._drawn[failure.worker] = self._draw(failure.worker, back_at)
        # A scheduled failure while the worker is down does not happen.
        while scheduled and scheduled[0].at < back_at:
            scheduled.pop(0)
