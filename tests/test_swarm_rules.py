"""The pure rules of DiLoCo-SWARM, without a process: routing, pausing, cutting, the wire."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ftdiloco.swarm.routing import Peer, choose, pipeline_pause, routing_weights
from ftdiloco.swarm.split import balanced_cuts, split_layers
from ftdiloco.swarm.transport import decode, encode
from ftwire import guard

ADDRESSES = [f"http://w{i}:1" for i in range(4)]
rates_st = st.dictionaries(st.sampled_from(ADDRESSES), st.floats(0.0, 1e4, allow_nan=False))


@given(
    listed=st.lists(st.sampled_from(ADDRESSES), unique=True),
    rates=rates_st,
    failed=st.frozensets(st.sampled_from(ADDRESSES)),
)
def test_weights_cover_every_usable_listed_worker_and_sum_to_one(listed, rates, failed):
    peers = [Peer(f"r{i}", a) for i, a in enumerate(listed)]
    weights = routing_weights(peers, rates, failed)
    assert set(weights) == set(listed) - failed
    if weights:
        assert sum(weights.values()) == pytest.approx(1.0)
        assert all(w > 0 for w in weights.values())


def test_weights_follow_measured_throughput():
    peers = [Peer("a", "http://a"), Peer("b", "http://b")]
    weights = routing_weights(peers, {"http://a": 20.0, "http://b": 10.0})
    assert weights == pytest.approx({"http://a": 2 / 3, "http://b": 1 / 3})


def test_a_new_worker_gets_the_mean_rate_so_it_gets_work_at_once():
    peers = [Peer("a", "http://a"), Peer("b", "http://b"), Peer("new", "http://new")]
    weights = routing_weights(peers, {"http://a": 30.0, "http://b": 10.0})
    assert weights["http://new"] == pytest.approx(20.0 / 60.0)
    assert routing_weights(peers[2:], {}) == {"http://new": 1.0}


def test_a_failed_worker_gets_nothing_until_forgotten():
    peers = [Peer("a", "http://a"), Peer("b", "http://b")]
    assert routing_weights(peers, {}, frozenset({"http://a"})) == {"http://b": 1.0}
    assert routing_weights(peers, {}, frozenset({"http://a", "http://b"})) == {}


@given(
    weights=st.dictionaries(st.sampled_from(ADDRESSES), st.floats(0.01, 100), min_size=1).map(
        lambda d: {k: v / sum(d.values()) for k, v in d.items()}
    ),
    u=st.floats(0.0, 1.0, exclude_max=True),
)
def test_choose_returns_the_worker_whose_share_holds_u(weights, u):
    chosen = choose(weights, u)
    ordered = sorted(weights)
    edges = list(itertools.accumulate(weights[a] for a in ordered))
    lower = edges[ordered.index(chosen) - 1] if ordered.index(chosen) else 0.0
    assert chosen in weights
    assert lower <= u + 1e-9


def test_choose_splits_in_proportion_and_refuses_nonsense():
    weights = {"a": 0.25, "b": 0.75}
    draws = [choose(weights, i / 1000) for i in range(1000)]
    assert draws.count("a") == 250
    with pytest.raises(ValueError, match="no worker"):
        choose({}, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        choose(weights, 1.0)


@pytest.mark.parametrize(
    ("live", "paused_at"),
    [
        ({1: 2}, None),
        ({1: 0}, 1),
        ({0: 1, 1: 0, 2: 0}, 1),
        ({0: 0, 1: 3}, 0),
        ({0: 1, 1: 1, 2: 1}, None),
        ({}, None),
    ],
)
def test_the_first_stage_without_a_live_worker_pauses_the_pipeline(live, paused_at):
    reason = pipeline_pause(live)
    if paused_at is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(f"stage {paused_at} has no live worker")


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=12), st.integers(1, 12))
def test_cuts_are_consecutive_nonempty_runs(sizes, n):
    if n > len(sizes):
        with pytest.raises(ValueError):
            balanced_cuts(sizes, n)
        return
    cuts = balanced_cuts(sizes, n)
    assert len(cuts) == n and cuts[0] == 0
    assert all(a < b for a, b in itertools.pairwise([*cuts, len(sizes)]))


def test_equal_layers_cut_evenly_and_stages_chain_to_the_whole_model():
    assert balanced_cuts([10] * 6, 2) == [0, 3]
    assert balanced_cuts([10] * 6, 3) == [0, 2, 4]
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2)]
    stages = split_layers(layers, 2)
    x = torch.randn(3, 4)
    assert torch.equal(stages[1](stages[0](x)), nn.Sequential(*layers)(x))


def test_tensors_cross_the_wire_exactly_and_anything_else_is_a_400():
    sent = {"x": torch.randn(2, 3, 4), "y": torch.arange(6).view(2, 3)}
    received = decode(encode(sent), frozenset({"x", "y"}))
    assert all(torch.equal(sent[k], received[k]) for k in sent)
    with pytest.raises(guard.Refused, match="expected tensors"):
        decode(encode({"x": torch.zeros(1)}), frozenset({"x", "y"}))
    with pytest.raises(guard.Refused, match="not a safetensors"):
        decode(b"\x80\x04pickle", frozenset({"x"}))
