"""The rules for groups of unequal speed (ftdiloco.training.hetero), checked without processes."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from ftdiloco.config import Config
from ftdiloco.coordination.manager import Manager
from ftdiloco.coordination.metrics import GroupMetrics
from ftdiloco.coordination.standalone import StandaloneManager
from ftdiloco.training import diloco
from ftdiloco.training.diloco import DiLoCo
from ftdiloco.training.hetero import (
    Contribution,
    contribution_weights,
    delayed_nesterov_,
    join_grace,
    local_steps,
    momentum_due,
    period_position,
    real_steps_at,
    staleness_discount,
)
from ftdiloco.training.local_sgd import LocalSGD
from ftdiloco.training.outer_loop import SyncReport

# -- DyLU: H_w = max(1, floor(H v_w / v_max)) -------------------------------------------------


@pytest.mark.parametrize(
    ("every", "rate", "fastest", "expected"),
    [
        (100, 10.0, 10.0, 100),  # the fastest group takes the full period
        (100, 5.0, 10.0, 50),  # half the speed, half the steps
        (100, 3.3, 10.0, 33),  # floor
        (100, 0.001, 10.0, 1),  # never below one step
        (7, 1.0, 3.0, 2),
        (100, None, 10.0, 100),  # its first period: no rate measured yet
        (100, 5.0, None, 100),
        (100, 0.0, 10.0, 100),  # a rate of 0 is no measurement
        (100, 12.0, 10.0, 100),  # a rate above the reported maximum never exceeds H
    ],
)
def test_local_steps(every: int, rate: float | None, fastest: float | None, expected: int) -> None:
    assert local_steps(every, rate, fastest) == expected


def test_rounding_never_costs_a_step() -> None:
    # (3 * v) / v is 2.9999999999999996 for this v: floored, the fastest group took 2 of 3 steps.
    v = 7934.93954600048
    assert local_steps(3, v, v) == 3
    assert local_steps(4, v * 0.75, v) == 3  # nor a group at exactly 3/4 of it
    assert local_steps(100, 3.3, 10.0) == 33


def test_local_steps_leaves_every_fragment_a_step() -> None:
    assert local_steps(100, 0.001, 10.0, minimum=4) == 4


def test_groups_of_unequal_speed_arrive_together() -> None:
    """Steps / rate is about the same for every group: nobody waits more than one step's time."""
    rates = {"a": 10.0, "b": 9.0, "c": 5.0, "d": 2.5}
    every = 200
    seconds = {rid: local_steps(every, v, max(rates.values())) / v for rid, v in rates.items()}
    slowest_step = 1 / min(rates.values())
    assert max(seconds.values()) - min(seconds.values()) <= slowest_step


# -- the schedule in units of the full period -------------------------------------------------


@pytest.mark.parametrize(
    ("every", "fragments"), [(e, f) for e in (1, 2, 5, 8, 12, 17) for f in (1, 2, 3, 4) if f <= e]
)
def test_period_position_walks_every_sync_point_exactly_once(every: int, fragments: int) -> None:
    slots = {(k + 1) * every // fragments for k in range(fragments)}
    for local in range(fragments, every + 1):
        positions = [period_position(r, local, every, fragments) for r in range(local + 1)]
        assert positions[0] == 0 and positions[-1] == every
        assert all(b > a for a, b in itertools.pairwise(positions)), positions
        # Every fragment's sync point is reached exactly, never strided over.
        assert slots <= set(positions)
        # At the full H the clock is the plain inner-step count.
        if local == every:
            assert positions == list(range(every + 1))
        # A heal's sync point maps back onto the step that reaches it.
        for r, position in enumerate(positions):
            assert real_steps_at(position, local, every, fragments) == r


def test_real_steps_at_a_position_between_two_steps_rounds_up() -> None:
    assert [period_position(r, 2, 8) for r in range(3)] == [0, 4, 8]
    assert real_steps_at(3, 2, 8) == 1
    assert real_steps_at(5, 2, 8) == 2


# -- weights: tokens x staleness discount ------------------------------------------------------


def test_staleness_discount() -> None:
    assert [staleness_discount(s) for s in range(4)] == [1.0, 0.5, 1 / 3, 0.25]
    assert staleness_discount(-1) == 1.0


def test_weights_are_proportional_to_tokens_and_sum_to_one() -> None:
    weights = contribution_weights({"b": Contribution(50), "a": Contribution(100)})
    assert weights == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert math.fsum(weights.values()) == pytest.approx(1.0)


def test_a_stale_contribution_counts_less() -> None:
    weights = contribution_weights(
        {"a": Contribution(100), "b": Contribution(100), "c": Contribution(200, staleness=1)}
    )
    # c did twice the work, one step ago: it counts as much as a fresh group.
    assert weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_nothing_to_bring_gives_zero_weights() -> None:
    assert contribution_weights({"a": Contribution(0), "b": Contribution(0)}) == {
        "a": 0.0,
        "b": 0.0,
    }
    assert contribution_weights({"a": Contribution(10), "b": Contribution(0)}) == {
        "a": 1.0,
        "b": 0.0,
    }


def test_weights_do_not_depend_on_the_order_groups_are_listed_in() -> None:
    groups = {
        rid: Contribution(tokens, s) for rid, tokens, s in [("a", 7, 0), ("b", 3, 2), ("c", 11, 1)]
    }
    expected = contribution_weights(groups)
    for order in itertools.permutations(groups):
        assert contribution_weights({rid: groups[rid] for rid in order}) == expected


# -- delayed Nesterov --------------------------------------------------------------------------


def test_momentum_due() -> None:
    assert [momentum_due(c, 3) for c in range(5)] == [False, False, False, True, True]
    assert momentum_due(1, 1)


def _run_delayed(grads: list[torch.Tensor], contributions: list[int], every: int) -> torch.Tensor:
    param = torch.ones(3, dtype=torch.float64)
    momentum, pending = torch.zeros_like(param), torch.zeros_like(param)
    count = steps = 0
    for grad, n in zip(grads, contributions, strict=True):
        count, steps = count + n, steps + 1
        due = momentum_due(count, every)
        delayed_nesterov_(param, grad, momentum, pending, steps=steps, due=due, lr=0.7, beta=0.9)
        if due:
            count = steps = 0
    return param


def test_delayed_nesterov_due_every_step_is_torch_nesterov_sgd() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, dtype=torch.float64) for _ in range(6)]
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    for grad in grads:
        param.grad = grad.clone()
        sgd.step()
    assert torch.equal(_run_delayed(grads, [3] * 6, every=3), param.detach())


def test_delayed_nesterov_steps_plainly_and_moves_the_momentum_with_the_mean() -> None:
    g1, g2 = torch.full((3,), 1.0, dtype=torch.float64), torch.full((3,), 3.0, dtype=torch.float64)
    # Two single contributions, every 2: a plain step, then the momentum takes their mean (2).
    out = _run_delayed([g1, g2], [1, 1], every=2)
    momentum = 2.0
    expected = 1.0 - 0.7 * 1.0 - 0.7 * (3.0 + 0.9 * momentum)
    assert torch.allclose(out, torch.full((3,), expected, dtype=torch.float64))


# -- async: each join's straggler grace ------------------------------------------------------

# A fast group's trip took 1.2 s; the user's grace is 0.2 s; groups of one speed join within 5%.
ELAPSED, GRACE, JITTER = 1.2, 0.2, 0.06


def test_a_slow_group_that_just_left_is_not_waited_for() -> None:
    """The other fast group is due now, the slow one in 1.2 s: form as soon as the fast are in."""
    assert join_grace(GRACE, ELAPSED, [0.0, 1.2], jitter=JITTER) == pytest.approx(JITTER)
    # ... waiting for a fast group due a little later, never longer than the grace.
    assert join_grace(GRACE, ELAPSED, [0.1, 1.2], jitter=JITTER) == pytest.approx(0.16)
    assert join_grace(GRACE, ELAPSED, [0.19, 5.0], jitter=JITTER) == GRACE


def test_a_group_that_may_be_waiting_gets_the_whole_trip() -> None:
    """A late group due about now (or long ago) may be in the lighthouse already: the wait counts
    from its join, so the grace spans two trips of this group: the other fast ones get in too."""
    assert join_grace(GRACE, ELAPSED, [0.0, 0.05], jitter=JITTER) == 2 * ELAPSED + GRACE
    assert join_grace(GRACE, ELAPSED, [0.0, -0.9, 3.0], jitter=JITTER) == 2 * ELAPSED + GRACE
    assert join_grace(GRACE, ELAPSED, [0.0, None, 3.0], jitter=JITTER) == 2 * ELAPSED + GRACE


def test_with_nothing_known_every_group_is_waited_for() -> None:
    """The first period (no rates yet) runs as in sync mode, bounded by a trip and the grace."""
    assert join_grace(GRACE, ELAPSED, [None, None], jitter=JITTER) == 2 * ELAPSED + GRACE
    assert join_grace(GRACE, ELAPSED, [], jitter=JITTER) == 2 * ELAPSED + GRACE


# -- one group without a lighthouse; LocalSGD refuses the modes it lacks ----------------------


def _standalone(**settings: object) -> StandaloneManager:
    return StandaloneManager(Config.from_env({"FTDILOCO_LIGHTHOUSE": "none"}, **settings))


def _train(loop: DiLoCo, model: nn.Module, inner: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(0)
    for _ in range(steps):
        model(torch.randn(4, 3)).square().mean().backward()
        inner.step()
        inner.zero_grad()


@pytest.mark.parametrize("settings", [{"dylu": True}, {"mode": "async"}])
def test_standalone_runs_dylu_and_async_alone(settings: dict[str, object]) -> None:
    """Alone, a group is the fastest (H = sync_every) and its pseudo-gradient weighs 1."""
    manager = _standalone(**settings)
    model = nn.Linear(3, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, nesterov=True)
    before = [p.detach().clone() for p in model.parameters()]
    config = manager.config
    with DiLoCo(
        manager, model, inner, outer, sync_every=3, dylu=config.dylu, mode=config.mode
    ) as diloco:
        _train(diloco, model, inner, 9)
    report = manager.last_sync
    assert report is not None and report.committed and report.participants == 1
    assert manager.step == 4  # the first, empty step and three more
    assert report.local_steps == 3 and report.staleness == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_standalone_weighted_allreduce_scales_by_the_weight() -> None:
    manager = _standalone()
    t = torch.ones(4)
    assert manager.allreduce([t], weight=0.0).wait()
    assert not t.any()
    with pytest.raises(ValueError, match="join grace"):
        manager.set_join_grace(-1.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"mode": "async"}, "FTDILOCO_MODE=async needs DiLoCo"), ({"dylu": True}, "FTDILOCO_DYLU")],
)
def test_localsgd_refuses_async_and_dylu(settings: dict[str, object], message: str) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message) as refused:
        LocalSGD(_standalone(**settings), model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    assert "\n" not in str(refused.value)


def test_a_groups_pace_reaches_its_metrics() -> None:
    """Manager.report_sync sets H, rate and staleness from each SyncReport (GET /metrics)."""
    manager = SimpleNamespace(metrics=GroupMetrics())
    report = SyncReport(
        step=3,
        committed=True,
        participants=3,
        quorum_id=1,
        seconds=0.1,
        bytes_sent=0,
        healed=False,
        waited=0.1,
        hidden_fraction=0.0,
        local_steps=12,
        staleness=2,
        rate=7.5,
    )
    Manager.report_sync(manager, report)  # type: ignore[arg-type]
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(manager.metrics.render().decode())
        for s in family.samples
    }
    assert samples["ftdiloco_inner_steps_per_outer_step"] == 12
    assert samples["ftdiloco_inner_step_rate"] == 7.5
    assert samples["ftdiloco_staleness"] == 2


def test_the_inner_rate_leans_on_the_last_period_but_not_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A period twice as slow moves the rate part of the way: one noisy period cannot swing H_w."""
    clock = [0.0]
    monkeypatch.setattr(diloco.time, "perf_counter", lambda: clock[0])
    rate = diloco._InnerRate()

    def period(steps: int, each: float) -> None:
        for _ in range(steps):
            rate.resumed()
            clock[0] += each
            rate.stopped()
            clock[0] += 1.0  # inside the hook: an outer step, not the group's own work

    assert rate.take() is None  # nothing measured
    period(10, 0.1)
    assert rate.take() == pytest.approx(10.0)
    assert rate.take() is None  # nothing new since
    period(10, 0.2)
    # (5 + 10 steps) / (0.5 + 2 s): between the old 10/s and the new 5/s.
    assert rate.take() == pytest.approx(6.0)
