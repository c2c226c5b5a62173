"""What the hub holds: the global weights, the outer optimizer, and the model's layout.

An outer step updates the global weights in place (the hub holds one copy
of the model, plus one fp32 accumulator per round); the server keeps
downloads and the step apart.  The outer optimizer is SGD with (Nesterov)
momentum, as DiLoCo's; its lr and momentum can be changed live by the
operator and are saved with the state.

The state file is a safetensors file (the same layout as the wire, see
:mod:`ftdiloco.hub.wire`), written to a temporary name, fsynced and renamed:
a hub killed at any moment finds either the previous state or the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftdiloco.hub import wire
from ftdiloco.hub.rounds import Commit
from ftdiloco.state.dtypes import SAFETENSORS_CODES
from ftdiloco.training.hetero import delayed_nesterov_, momentum_due

__all__ = ["GlobalState", "Layout", "OuterSettings"]


@dataclass(frozen=True)
class Layout:
    """The trainable parameters (model order) and how DiLoCo cuts them into flat buffers.

    ``fragments[k][f]`` lists the parameter indices in flat buffer ``f`` of
    fragment ``k``, in their order in that buffer (one buffer per dtype).
    Every group of a job must have the same layout; the hub names the first
    parameter where one differs.
    """

    names: tuple[str, ...]
    dtypes: tuple[str, ...]  # safetensors codes
    shapes: tuple[tuple[int, ...], ...]
    fragments: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n or len(self.dtypes) != n or len(self.shapes) != n:
            raise ValueError("a layout needs one name, dtype and shape per parameter")
        bad = [d for d in self.dtypes if d not in wire._DTYPES]
        if bad:
            raise ValueError(f"unknown dtype {bad[0]!r}")
        placed = sorted(i for fragment in self.fragments for flat in fragment for i in flat)
        if placed != list(range(n)):
            raise ValueError("the fragments must hold every parameter exactly once")

    @classmethod
    def from_json(cls, value: Any) -> Layout:
        try:
            return cls(
                tuple(str(x) for x in value["names"]),
                tuple(str(x) for x in value["dtypes"]),
                tuple(tuple(int(d) for d in s) for s in value["shapes"]),
                tuple(
                    tuple(tuple(int(i) for i in flat) for flat in fragment)
                    for fragment in value["fragments"]
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a model layout: {type(e).__name__}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "dtypes": list(self.dtypes),
            "shapes": [list(s) for s in self.shapes],
            "fragments": [[list(flat) for flat in fragment] for fragment in self.fragments],
        }

    def numel(self, i: int) -> int:
        n = 1
        for d in self.shapes[i]:
            n *= d
        return n

    def flat_numels(self, fragment: int) -> list[int]:
        return [sum(self.numel(i) for i in flat) for flat in self.fragments[fragment]]

    def first_mismatch(self, other: Layout) -> str | None:
        """Where ``other`` (a group's model) differs from this one (the hub's), or None."""
        for i, name in enumerate(self.names):
            if i >= len(other.names):
                return f"the group's model lacks parameter {name!r}"
            mine = (name, self.dtypes[i], self.shapes[i])
            theirs = (other.names[i], other.dtypes[i], other.shapes[i])
            if mine != theirs:
                return (
                    f"parameter {i}: the hub has {name!r} {self.dtypes[i]} {list(self.shapes[i])},"
                    f" the group {other.names[i]!r} {other.dtypes[i]} {list(other.shapes[i])}"
                )
        if len(other.names) > len(self.names):
            return f"the group's model has an extra parameter {other.names[len(self.names)]!r}"
        if other.fragments != self.fragments:
            return (
                f"the group cuts the model in {len(other.fragments)} fragments,"
                f" the hub's job in {len(self.fragments)} (set the same fragments everywhere)"
            )
        return None


@dataclass(frozen=True)
class OuterSettings:
    """The outer step: delayed Nesterov (ftdiloco.training.hetero), the momentum moving every
    ``momentum_every`` contributions; 1 (sync mode) is exactly SGD with Nesterov momentum."""

    lr: float
    momentum: float
    momentum_every: int = 1


class GlobalState:
    """The global weights of the last committed step, and the outer optimizer's momentum."""

    def __init__(
        self,
        layout: Layout,
        weights: Sequence[torch.Tensor],
        settings: OuterSettings,
        *,
        step: int = 0,
        sync_point: int = 0,
        momentum: Sequence[torch.Tensor] | None = None,
        pending: Sequence[torch.Tensor] | None = None,
        counts: torch.Tensor | None = None,
        last_commit: Commit | None = None,
    ) -> None:
        for i, w in enumerate(weights):
            if SAFETENSORS_CODES[w.dtype] != layout.dtypes[i] or tuple(w.shape) != layout.shapes[i]:
                raise ValueError(f"weight {layout.names[i]!r} does not match the layout")
        self.layout = layout
        self.weights = list(weights)
        self.momentum = (
            list(momentum)
            if momentum is not None
            else [torch.zeros(w.shape, dtype=torch.float32) for w in weights]
        )
        self.settings = settings
        # Delayed Nesterov: the outer gradients since the momentum last moved
        # (only kept when it moves less often than every contribution), and
        # per fragment the contributions and steps they came from.
        self.pending = (
            list(pending)
            if pending is not None
            else [torch.zeros(w.shape, dtype=torch.float32) for w in weights]
            if settings.momentum_every > 1
            else []
        )
        self.counts = (
            counts
            if counts is not None
            else torch.zeros((len(layout.fragments), 2), dtype=torch.int64)
        )
        self.step = step
        self.sync_point = sync_point
        self.last_commit = last_commit

    @property
    def model_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

    def accumulators(self, fragment: int) -> list[torch.Tensor]:
        """One fp32 buffer per flat of ``fragment``: where every submission is summed."""
        return [torch.zeros(n, dtype=torch.float32) for n in self.layout.flat_numels(fragment)]

    def step_(
        self, fragment: int, sums: Sequence[torch.Tensor], divisor: float, contributors: int
    ) -> None:
        """The outer step with pseudo-gradient ``sums / divisor`` on ``fragment``, in place.

        The rule is DiLoCo's own (``hetero.delayed_nesterov_``), so a job
        steps alike through the hub or an allreduce.  In place, so that the
        hub never holds a second copy of the model: the server lets no
        download read the weights meanwhile.  ``sums`` is used as scratch.
        """
        counts = self.counts[fragment]
        counts += torch.tensor([contributors, 1])
        due = momentum_due(int(counts[0]), self.settings.momentum_every)
        for flat, total in zip(self.layout.fragments[fragment], sums, strict=True):
            offset = 0
            for i in flat:
                n = self.layout.numel(i)
                grad = total[offset : offset + n].view(self.layout.shapes[i]).div_(divisor)
                offset += n
                delayed_nesterov_(
                    self.weights[i],
                    grad,
                    self.momentum[i],
                    self.pending[i] if self.pending else torch.zeros_like(grad),
                    steps=int(counts[1]),
                    due=due,
                    lr=self.settings.lr,
                    beta=self.settings.momentum,
                )
        if due:
            counts.zero_()

    def named_weights(self, fragment: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """The global weights of ``fragment`` (None: all), in model order."""
        indices = (
            range(len(self.weights))
            if fragment is None
            else sorted(i for flat in self.layout.fragments[fragment] for i in flat)
        )
        return [(self.layout.names[i], self.weights[i]) for i in indices]

    def metadata(self) -> dict[str, str]:
        return {
            "step": str(self.step),
            "sync_point": str(self.sync_point),
            "counts": json.dumps(self.counts.tolist()),
            "layout": json.dumps(self.layout.to_json()),
            "settings": json.dumps(self.settings.__dict__),
            "last_commit": json.dumps(
                None if self.last_commit is None else self.last_commit.__dict__
            ),
        }

    def save(self, path: Path) -> None:
        """Write the state atomically: a temporary file, fsynced, renamed over ``path``."""
        tensors = [(f"weight.{n}", w) for n, w in zip(self.layout.names, self.weights, strict=True)]
        tensors += [
            (f"momentum.{n}", m) for n, m in zip(self.layout.names, self.momentum, strict=True)
        ]
        tensors += [
            (f"pending.{n}", p) for n, p in zip(self.layout.names, self.pending, strict=False)
        ]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(wire.header(tensors, self.metadata()))
            for _, t in tensors:
                f.write(wire.tensor_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    @classmethod
    def load(cls, path: Path) -> GlobalState:
        with open(path, "rb") as f:
            entries, meta = wire.read_header(f.read)
            tensors = {}
            for e in entries:
                t = torch.empty(e.shape, dtype=e.dtype)
                view = wire.tensor_bytes(t)
                if f.readinto(view) != e.nbytes or wire.checksum(view) != e.xxh3:
                    raise ValueError(f"{path}: tensor {e.name!r} is damaged")
                tensors[e.name] = t
        layout = Layout.from_json(json.loads(meta["layout"]))
        commit = json.loads(meta["last_commit"])
        return cls(
            layout,
            [tensors[f"weight.{n}"] for n in layout.names],
            OuterSettings(**json.loads(meta["settings"])),
            step=int(meta["step"]),
            sync_point=int(meta["sync_point"]),
            momentum=[tensors[f"momentum.{n}"] for n in layout.names],
            pending=[tensors[f"pending.{n}"] for n in layout.names if f"pending.{n}" in tensors],
            counts=torch.tensor(json.loads(meta["counts"]), dtype=torch.int64),
            last_commit=None
            if commit is None
            else Commit(commit["round_id"], commit["step"], tuple(commit["members"])),
        )
