"""What DiLoCo and LocalSGD share: the outer loop driven by the inner optimizer's steps.

:class:`OuterLoop` hooks the inner optimizer's ``step`` and syncs every
``sync_every`` steps; the protocols say what it needs of a manager
(:class:`OuterManager`; DyLU and async mode also :class:`PacedManager`; the
hub :class:`OuterStepHost`); :class:`SyncReport` is what each sync did.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ftdiloco.coordination.allreduce import Work
from ftdiloco.coordination.plan import QuorumPlan
from ftdiloco.training.compression import Codec


class OuterManager(Protocol):
    """What DiLoCo and LocalSGD use of a manager.

    :class:`ftdiloco.coordination.manager.Manager` is the real one; the simulator
    (:mod:`ftdiloco.sim`) passes an in-process one, so that simulated runs
    go through this module's outer step and not a copy of it.
    """

    @property
    def step(self) -> int: ...

    @property
    def plan(self) -> QuorumPlan | None: ...

    def register_state(
        self,
        name: str,
        save: Callable[[], dict[str, torch.Tensor]],
        load: Callable[[dict[str, torch.Tensor]], None],
    ) -> None: ...

    def start_quorum(self) -> QuorumPlan | None: ...

    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work: ...

    def should_commit(self) -> bool: ...

    def maybe_checkpoint(self) -> Path | None: ...

    def report_sync(self, report: SyncReport) -> None: ...


@runtime_checkable
class PacedManager(Protocol):
    """What DyLU and asynchronous DiLoCo use of a manager, beyond :class:`OuterManager`.

    A group tells its peers its rate and its pseudo-gradient's worth with its
    join (``plan.peer_info`` hands every group the same map back), and the
    weighted allreduce sums ``tensors * weight`` over every participant.
    """

    def set_join_info(self, info: Mapping[str, int | float | str | bool]) -> None: ...

    def set_join_grace(self, seconds: float | None) -> None: ...

    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float | None = None,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work: ...


@dataclass(frozen=True)
class GlobalWeights:
    """What DiLoCo hands a manager that applies the outer step itself (the hub's, ftdiloco.hub).

    Such a manager writes the new global weights into ``backup`` when a step
    commits, and DiLoCo takes them instead of stepping its own outer
    optimizer; on a heal it writes them and calls ``adopt``.
    """

    names: tuple[str, ...]  # the trainable parameters, model order
    backup: tuple[torch.Tensor, ...]  # their backups: this group's global weights
    # Per fragment, per flat buffer of its pseudo-gradient: the parameter indices in it.
    fragments: tuple[tuple[tuple[int, ...], ...], ...]
    sync_point: torch.Tensor  # the inner step the current sync started at
    outer_lr: float  # the outer optimizer's, for a hub that starts from this group
    outer_momentum: float
    momentum_every: int  # delayed Nesterov's (1: plain Nesterov, sync mode)
    adopt: Callable[[int], None]  # run on from the backups, at this sync point


@runtime_checkable
class OuterStepHost(Protocol):
    """A manager whose server holds the global weights and applies the outer step."""

    def bind_global_weights(self, weights: GlobalWeights) -> None: ...


@dataclass(frozen=True)
class SyncReport:
    """What one outer step did, for the training script's log line."""

    step: int
    committed: bool
    participants: int
    quorum_id: int
    seconds: float
    bytes_sent: int
    healed: bool
    waited: float
    hidden_fraction: float
    fragment: int = 0  # which fragment of the model it carried (streaming DiLoCo)
    # Inner steps this group takes per outer period now (DyLU: H_w; else sync_every).
    local_steps: int = 0
    # Outer steps the global state moved since this group's pseudo-gradient
    # started (asynchronous DiLoCo: it joined late and was merged, discounted).
    staleness: int = 0
    # Inner steps per second of this group's own work, as last told to its
    # peers (DyLU, async); 0: not measured.
    rate: float = 0.0


def flat_views(params: list[nn.Parameter]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One flat buffer per dtype and per-parameter views into it.

    Sending whole flat buffers lets the manager allreduce without copying.
    """
    flats: list[torch.Tensor] = []
    views: list[torch.Tensor] = [torch.empty(0)] * len(params)
    for indices in by_dtype(params):
        dtype = params[indices[0]].dtype
        numel = sum(params[i].numel() for i in indices)
        flat = torch.zeros(numel, dtype=dtype, device=params[indices[0]].device)
        offset = 0
        for i in indices:
            n = params[i].numel()
            views[i] = flat[offset : offset + n].view_as(params[i])
            offset += n
        flats.append(flat)
    return flats, views


def by_dtype(params: list[nn.Parameter]) -> list[list[int]]:
    """The parameter indices of each flat buffer: one per dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    return list(groups.values())


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat named tensors (what heals carry)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{index}.{key}"] = value
    return out


def load_optimizer_tensors(
    prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        head, sep, rest = name.partition(".")
        if head != prefix or not sep:
            continue
        index, _, key = rest.partition(".")
        state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


class OuterLoop:
    """Counts inner steps through the optimizer's post-step hook; syncs every N."""

    def __init__(
        self,
        manager: OuterManager,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sync_every: int,
    ) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.manager = manager
        self.model = model
        self.sync_every = sync_every
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.last_sync: SyncReport | None = None
        self._optimizer = optimizer
        self.inner_steps = 0
        # The inner step at which the current sync started, carried by heals
        # so that a group that joins runs on the others' schedule.
        self._sync_point = torch.zeros((), dtype=torch.int64)
        self._hook: Any = None

    def __enter__(self) -> OuterLoop:
        self._hook = self._optimizer.register_step_post_hook(self._after_inner_step)
        self._catch_up()
        return self

    def _catch_up(self) -> None:
        """Before the first inner step, take part in the job's next outer step.

        A group that (re)starts joins the quorum at once; when the others
        reach their sync it heals there, contributes nothing, commits with
        them, and only then begins inner steps -- none of them wasted.  In a
        fresh job this first step is an empty one that aligns every group on
        the primary's weights.
        """
        raise NotImplementedError

    def _join(self) -> None:
        """Join this step's quorum (healing if behind), publishing our sync point."""
        self._sync_point.fill_(self.inner_steps)
        self.manager.start_quorum()

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _after_inner_step(self, *_: object) -> None:
        self.inner_steps += 1
        if self.inner_steps % self.sync_every == 0:
            self.sync()

    def sync(self) -> SyncReport:
        raise NotImplementedError

    def _report(
        self,
        started: float,
        committed: bool,
        flats: list[torch.Tensor],
        waited: float | None,
        sent: int | None = None,
        fragment: int = 0,
        local_steps: int | None = None,
        staleness: int = 0,
        rate: float = 0.0,
    ) -> SyncReport:
        """``waited`` None: the sync ran on the training thread, which it blocked throughout."""
        plan = self.manager.plan
        seconds = time.perf_counter() - started
        waited = seconds if waited is None else waited
        self.last_sync = SyncReport(
            step=self.manager.step,
            committed=committed,
            participants=plan.replica_world_size if plan is not None else 0,
            quorum_id=plan.quorum_id if plan is not None else -1,
            seconds=seconds,
            bytes_sent=sent
            if sent is not None
            else sum(f.numel() * f.element_size() for f in flats),
            healed=plan.heal if plan is not None else False,
            waited=waited,
            # Of the time from sending to applying, the share the inner loop
            # did not spend blocked on the network.
            hidden_fraction=max(0.0, 1.0 - waited / seconds) if seconds > 0 else 0.0,
            fragment=fragment,
            local_steps=self.sync_every if local_steps is None else local_steps,
            staleness=staleness,
            rate=rate,
        )
        self.manager.report_sync(self.last_sync)
        return self.last_sync


def copy_all(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for d, s in zip(dst, src, strict=True):
            d.copy_(s, non_blocking=True)


def tensors_hash(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensors' bytes, for checking that groups hold identical weights."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        digest.update(
            bytes(
                t.detach()
                .cpu()
                .contiguous()
                .reshape(-1)
                .view(torch.uint8)
                .clone()
                .untyped_storage()
            )
        )
    return digest.hexdigest()
