"""The hub's state and wire format (ftdiloco.hub.state, ftdiloco.hub.wire), in one process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from ftdiloco.hub import wire
from ftdiloco.hub.rounds import Commit
from ftdiloco.hub.state import GlobalState, Layout, OuterSettings

LAYOUT = Layout(
    names=("embed.weight", "head.weight", "head.bias"),
    dtypes=("F32", "F32", "F32"),
    shapes=((4, 3), (2, 3), (2,)),
    fragments=(((0, 1, 2),),),
)


def state(momentum_every: int = 1) -> GlobalState:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g) for s in LAYOUT.shapes]
    return GlobalState(LAYOUT, weights, OuterSettings(0.7, 0.9, momentum_every))


def test_the_outer_step_is_torch_sgd_with_nesterov() -> None:
    hub = state()
    params = [torch.nn.Parameter(w.clone()) for w in hub.weights]
    sgd = torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in LAYOUT.shapes]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        sgd.step()
        # Two groups that each sent the same pseudo-gradient: the sum over 2.
        total = torch.cat([grad.reshape(-1) for grad in grads]) * 2
        hub.step_(0, [total], divisor=2.0, contributors=2)
    for w, p in zip(hub.weights, params, strict=True):
        torch.testing.assert_close(w, p.detach(), rtol=1e-6, atol=1e-6)


def test_async_moves_the_momentum_every_n_contributions() -> None:
    """Delayed Nesterov (hetero.delayed_nesterov_): plain SGD until the momentum is due."""
    hub = state(momentum_every=2)
    before = [w.clone() for w in hub.weights]
    hub.step_(0, [torch.ones(20)], divisor=1.0, contributors=1)
    for w, b in zip(hub.weights, before, strict=True):
        torch.testing.assert_close(w, b - 0.7)
    assert all(not m.any() for m in hub.momentum) and hub.counts[0].tolist() == [1, 1]
    hub.step_(0, [torch.ones(20)], divisor=1.0, contributors=1)
    assert all(torch.allclose(m, torch.ones_like(m)) for m in hub.momentum)  # mean of 2 ones
    assert hub.counts[0].tolist() == [0, 0]


@pytest.mark.parametrize("momentum_every", [1, 3])
def test_the_state_file_round_trips_and_damage_is_caught(
    tmp_path: Path, momentum_every: int
) -> None:
    hub = state(momentum_every)
    hub.step_(0, [torch.ones(20)], divisor=1.0, contributors=1)
    hub.step, hub.sync_point = 3, 12
    hub.last_commit = Commit(5 << 32 | 9, 3, ("group0", "group1"))
    path = tmp_path / "hub.safetensors"
    hub.save(path)
    back = GlobalState.load(path)
    assert (back.step, back.sync_point, back.last_commit) == (3, 12, hub.last_commit)
    assert back.layout == LAYOUT and back.settings == hub.settings
    assert torch.equal(back.counts, hub.counts)
    mine = [*hub.weights, *hub.momentum, *hub.pending]
    for a, b in zip(mine, [*back.weights, *back.momentum, *back.pending], strict=True):
        assert torch.equal(a, b)
    assert not path.with_name(path.name + ".tmp").exists()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        GlobalState.load(path)


def test_a_different_model_is_named_at_its_first_difference() -> None:
    other = Layout(
        names=("embed.weight", "head.weight", "head.bias"),
        dtypes=("F32", "F32", "F32"),
        shapes=((4, 3), (5, 3), (2,)),
        fragments=(((0, 1, 2),),),
    )
    problem = LAYOUT.first_mismatch(other)
    assert problem is not None and "'head.weight'" in problem and "[5, 3]" in problem
    fewer = Layout(("embed.weight",), ("F32",), ((4, 3),), (((0,),),))
    assert "lacks parameter 'head.weight'" in (LAYOUT.first_mismatch(fewer) or "")
    cut = Layout(LAYOUT.names, LAYOUT.dtypes, LAYOUT.shapes, (((0,),), ((1, 2),)))
    assert "fragments" in (LAYOUT.first_mismatch(cut) or "")
    assert LAYOUT.first_mismatch(Layout.from_json(json.loads(json.dumps(LAYOUT.to_json())))) is None
    with pytest.raises(ValueError, match="exactly once"):
        Layout(LAYOUT.names, LAYOUT.dtypes, LAYOUT.shapes, (((0, 1),),))


def test_the_wire_header_round_trips_and_refuses_nonsense() -> None:
    tensors = [("a", torch.arange(6, dtype=torch.float32)), ("b", torch.ones(3, dtype=torch.uint8))]
    stream = io.BytesIO(wire.header(tensors, {"step": "4"}))
    entries, meta = wire.read_header(stream.read)
    assert meta["step"] == "4"
    assert [(e.name, e.dtype, e.shape, e.nbytes) for e in entries] == [
        ("a", torch.float32, (6,), 24),
        ("b", torch.uint8, (3,), 3),
    ]
    assert entries[0].xxh3 == wire.checksum(wire.tensor_bytes(tensors[0][1]))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.header_length((1 << 40).to_bytes(8, "little"))
    for text in [
        b"[]",
        b"{not json",
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}}',
    ]:
        with pytest.raises(wire.WireError):
            wire.parse_header(text)
    assert wire.segments(0) == [(0, 0)]
    assert wire.segments(wire.SEGMENT + 1) == [(0, wire.SEGMENT), (wire.SEGMENT, wire.SEGMENT + 1)]
