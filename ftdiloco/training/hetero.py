"""The rules for groups of unequal speed: DyLU, contribution weights, delayed Nesterov.

Two ways keep fast groups busy when one group is slower:

* **DyLU** (dynamic local updates): every group reports its inner-step rate
  with its join; for the next outer period each group takes
  ``H_w = max(1, floor(H * v_w / v_max))`` inner steps, so all of them reach
  the outer step at about the same time.
* **asynchronous** DiLoCo: nobody waits for a straggler beyond a short grace;
  a late group's pseudo-gradient, taken against an older global state, joins
  a later outer step with a weight discounted by its staleness, and the outer
  optimizer is *delayed Nesterov*: a plain SGD step on every commit, the
  momentum only every ``momentum_every`` contributions.

Everything here is a pure function of numbers every group reads from the same
quorum, so every group computes the same weights and the same schedule (I1)
without another round trip; ``tests/test_dylu.py`` checks them exhaustively.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "Contribution",
    "contribution_weights",
    "delayed_nesterov_",
    "join_grace",
    "local_steps",
    "momentum_due",
    "period_position",
    "real_steps_at",
    "staleness_discount",
]


def local_steps(every: int, rate: float | None, fastest: float | None, minimum: int = 1) -> int:
    """H_w, this group's inner steps in the next outer period: ``max(1, floor(H v / v_max))``.

    ``rate`` is this group's inner steps per second, ``fastest`` the highest
    rate any group reported.  Unknown rates (a group's first period) mean the
    full ``every``.  ``minimum`` is the number of fragments under streaming:
    every fragment needs at least one inner step of its own.
    """
    if rate is None or fastest is None or not rate > 0 or not fastest > 0:
        return every
    # Floored with a nudge far above the rounding error: (H * v) / v came out
    # as 2.9999999999999996 for about one rate in 15 (and so did the fastest
    # group's own H when another group measured the same rate), one step short.
    steps = math.floor(every * rate / fastest + 1e-9)
    return max(minimum, min(every, steps))


def _bounds(length: int, fragments: int) -> list[int]:
    """Where each fragment's sync falls in a period of ``length`` steps (0 first, then N more)."""
    return [j * length // fragments for j in range(fragments + 1)]


def period_position(real: int, local: int, every: int, fragments: int = 1) -> int:
    """Where a group stands in the outer period after ``real`` of its ``local`` steps.

    The answer is in units of ``every``, the full period: the schedule (which
    inner step syncs which fragment, the sync delay, the point a heal carries)
    is kept in those units, the same for every group.  A group that takes
    ``local`` < ``every`` steps walks the same positions with longer strides;
    the fragment boundaries map exactly onto each other, so every group
    reaches each sync point at its own ``j * local // fragments``-th step and
    never strides over one.
    """
    if real <= 0:
        return 0
    if real >= local:
        return every
    mine, shared = _bounds(local, fragments), _bounds(every, fragments)
    j = next(j for j in range(1, fragments + 1) if mine[j] >= real)
    span = mine[j] - mine[j - 1]
    return shared[j - 1] + (real - mine[j - 1]) * (shared[j] - shared[j - 1]) // span


def real_steps_at(position: int, local: int, every: int, fragments: int = 1) -> int:
    """The fewest of a group's ``local`` steps that reach ``position`` (a heal's sync point)."""
    return next(
        r for r in range(local + 1) if period_position(r, local, every, fragments) >= position
    )


def staleness_discount(staleness: int) -> float:
    """How much a pseudo-gradient ``staleness`` outer steps old counts: 1 / (1 + staleness).

    A stale pseudo-gradient points downhill from where the model was, so it
    counts less the further the model has moved since; it is still progress,
    and throwing it away would waste the slow group's compute.
    """
    return 1.0 / (1.0 + max(0, staleness))


@dataclass(frozen=True)
class Contribution:
    """What a group told its peers about the pseudo-gradient it brings to an outer step."""

    # Samples (inner steps x batch) behind its pseudo-gradient; 0: none to bring.
    tokens: float
    # Outer steps committed since the global state it started from.
    staleness: int = 0


def contribution_weights(contributions: Mapping[str, Contribution]) -> dict[str, float]:
    """Each group's weight in the outer step: tokens x staleness discount, normalised to sum to 1.

    A group's shorter trip (DyLU) counts for the work it did, no more and no
    less.  Summed in replica-id order so that every group computes the very
    same floats.  All zeros when nobody brings anything (a fresh job's first
    step): the outer step is then empty.
    """
    raw = {
        rid: max(0.0, c.tokens) * staleness_discount(c.staleness)
        for rid, c in sorted(contributions.items())
    }
    total = math.fsum(raw.values())
    if total <= 0:
        return dict.fromkeys(raw, 0.0)
    return {rid: value / total for rid, value in raw.items()}


def join_grace(
    grace: float, elapsed: float, arrivals: Iterable[float | None], *, jitter: float
) -> float:
    """Asynchronous mode: how long this join asks the lighthouse to wait for stragglers.

    The lighthouse waits for live groups that have not joined until the
    grace has passed since the *first* join of the round, and it forms with
    whoever joined, so one number must serve two cases:

    * a group expected much later than ``grace`` (the slow one, which just
      started a trip): the on-time groups should form the moment they are all
      there, so the grace is short -- until the last of them is expected,
      plus ``jitter`` -- never the whole ``grace`` spent idle on every step;
    * a group that may have joined long ago (a late one waiting for the next
      step): the wait counts from *its* join, so a short grace would form the
      quorum with it and whichever on-time group came first, leaving the
      others out for a whole period.  Every joiner joined after this group's
      trip began (``elapsed`` ago: it was in the quorum then formed), so a
      grace of two trips and ``grace`` gives the other groups at least a
      trip beyond now: groups of one speed drift apart under load.  It costs
      nothing when all of them come (the quorum forms when the last one
      joins), and at most a trip when a group expected never does.

    ``arrivals``: for every other group known, in how many seconds it is
    expected to join (its last trip's start plus its H over its rate;
    negative: it may be waiting already; None: unknown).  Pure, so that the
    rule is tested without processes (tests/test_dylu.py).
    """
    wait = 2 * elapsed + grace
    expected = list(arrivals)
    if not any(a is not None and a > grace for a in expected):
        return wait  # nobody is late: wait for every group, at most a trip and the grace
    coming = [a for a in expected if a is None or a <= grace]
    if any(a is None or a < -grace for a in coming):
        return wait  # one of them may have been waiting for long
    return min(grace, max([0.0, *(a for a in coming if a is not None)]) + jitter)


def momentum_due(contributions: int, every: int) -> bool:
    """Delayed Nesterov's schedule: the momentum moves once ``every`` contributions have arrived.

    ``contributions`` counts the groups' pseudo-gradients merged since the
    momentum last moved, this step's included.
    """
    return contributions >= every


@torch.no_grad()
def delayed_nesterov_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    pending: torch.Tensor,
    *,
    steps: int,
    due: bool,
    lr: float,
    beta: float,
) -> None:
    """One outer step of delayed Nesterov, in place on ``param``, ``momentum`` and ``pending``.

    ``pending`` sums the outer gradients since the momentum last moved (this
    one included once added here); ``steps`` counts them, this one included.
    Between momentum updates the step is plain SGD (``param -= lr * grad``),
    so contributions that trickle in one at a time cannot each replay the
    whole momentum.  When ``due``, the momentum takes the mean of what
    accumulated and the step is Nesterov's (``grad + beta * momentum``).  With
    the momentum due on every step this is exactly ``torch.optim.SGD`` with
    ``nesterov=True`` (and no dampening or weight decay).
    """
    pending.add_(grad)
    if not due:
        param.sub_(grad, alpha=lr)
        return
    momentum.mul_(beta).add_(pending, alpha=1.0 / steps)
    pending.zero_()
    param.sub_(grad.add(momentum, alpha=beta), alpha=lr)
