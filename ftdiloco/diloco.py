"""DiLoCo and LocalSGD: an outer step every ``sync_every`` inner optimizer steps.

Both hook the inner optimizer's ``step`` so the user's loop stays ordinary::

    with DiLoCo(manager, model, inner_opt, outer_opt, sync_every=50) as diloco:
        for x, y in loader:
            loss = model(x, y); loss.backward(); inner_opt.step(); inner_opt.zero_grad()

DiLoCo keeps the last committed global weights (the *backup*) on the CPU.  An
outer step averages the pseudo-gradients (backup - local weights) over the
quorum, restores the backup, and -- only if the group's vote commits --
applies the outer optimizer and takes a new backup.  A failed step therefore
leaves the model exactly at the last committed global weights.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftdiloco.manager import Manager


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


class _OuterLoop:
    """Counts inner steps through the optimizer's post-step hook; syncs every N."""

    def __init__(
        self, manager: Manager, model: nn.Module, optimizer: torch.optim.Optimizer, sync_every: int
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
        self._hook: Any = None

    def __enter__(self) -> _OuterLoop:
        self._hook = self._optimizer.register_step_post_hook(self._after_inner_step)
        return self

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

    def _flat_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One flat buffer per dtype and per-parameter views into it.

        Sending whole flat buffers lets the manager allreduce without copying.
        """
        flats: list[torch.Tensor] = []
        views: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, indices in by_dtype.items():
            flat = torch.zeros(
                sum(self.params[i].numel() for i in indices),
                dtype=dtype,
                device=self.params[indices[0]].device,
            )
            offset = 0
            for i in indices:
                n = self.params[i].numel()
                views[i] = flat[offset : offset + n].view_as(self.params[i])
                offset += n
            flats.append(flat)
        return flats, views

    def _report(self, started: float, committed: bool, flats: list[torch.Tensor]) -> SyncReport:
        plan = self.manager.plan
        self.last_sync = SyncReport(
            step=self.manager.step,
            committed=committed,
            participants=plan.replica_world_size if plan is not None else 0,
            quorum_id=plan.quorum_id if plan is not None else -1,
            seconds=time.perf_counter() - started,
            bytes_sent=sum(f.numel() * f.element_size() for f in flats),
            healed=plan.heal if plan is not None else False,
        )
        return self.last_sync


class DiLoCo(_OuterLoop):
    def __init__(
        self,
        manager: Manager,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        sync_every: int,
        backup_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(manager, model, inner_optimizer, sync_every)
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        outer_params = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
        if any(id(p) not in outer_params for p in self.params):
            raise ValueError("the outer optimizer must hold every trainable model parameter")
        device = torch.device(backup_device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        self.backup = [
            p.detach().to(device, copy=True).pin_memory()
            if pin
            else p.detach().to(device, copy=True)
            for p in self.params
        ]
        self._flats, self._pseudo = self._flat_views()
        manager.register_state("diloco", self._save, self._load)

    def _save(self) -> dict[str, torch.Tensor]:
        state = {f"backup.{i}": b for i, b in enumerate(self.backup)}
        state.update(optimizer_tensors("outer", self.outer_optimizer))
        state.update(optimizer_tensors("inner", self.inner_optimizer))
        return state

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt a peer's committed state: global weights, both optimizers' state."""
        for i, b in enumerate(self.backup):
            b.copy_(state[f"backup.{i}"])
        load_optimizer_tensors("outer", self.outer_optimizer, state)
        load_optimizer_tensors("inner", self.inner_optimizer, state)
        self._restore()

    def _restore(self) -> None:
        with torch.no_grad():
            for p, b in zip(self.params, self.backup, strict=True):
                p.copy_(b, non_blocking=True)

    def sync(self) -> SyncReport:
        """The outer step; a failure is rolled back, never raised."""
        started = time.perf_counter()
        manager = self.manager
        manager.start_quorum()  # a group that is behind heals here: backup, model and optimizers
        with torch.no_grad():
            for pseudo, p, b in zip(self._pseudo, self.params, self.backup, strict=True):
                pseudo.copy_(b, non_blocking=True)
                pseudo.sub_(p)
        manager.allreduce(self._flats).wait()
        self._restore()
        committed = manager.should_commit()
        if committed:
            self._outer_step()
        report = self._report(started, committed, self._flats)
        manager.maybe_checkpoint()  # a step boundary: periodic and requested saves (may exit)
        return report

    def _outer_step(self) -> None:
        saved = [p.grad for p in self.params]
        for p, pseudo in zip(self.params, self._pseudo, strict=True):
            p.grad = pseudo
        self.outer_optimizer.step()
        with torch.no_grad():
            for p, b, g in zip(self.params, self.backup, saved, strict=True):
                b.copy_(p, non_blocking=True)
                p.grad = g
        if torch.cuda.is_available():
            torch.cuda.synchronize()


class LocalSGD(_OuterLoop):
    """Average the weights themselves every ``sync_every`` steps (no outer optimizer).

    A failed step keeps the local weights: LocalSGD has no global copy to return to.
    """

    def __init__(
        self, manager: Manager, model: nn.Module, optimizer: torch.optim.Optimizer, sync_every: int
    ) -> None:
        super().__init__(manager, model, optimizer, sync_every)
        self.optimizer = optimizer
        self._flats, self._views = self._flat_views()
        manager.register_state("localsgd", self._save, self._load)

    def _save(self) -> dict[str, torch.Tensor]:
        state = {f"param.{i}": p.detach() for i, p in enumerate(self.params)}
        state.update(optimizer_tensors("inner", self.optimizer))
        return state

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(state[f"param.{i}"])
        load_optimizer_tensors("inner", self.optimizer, state)

    def sync(self) -> SyncReport:
        started = time.perf_counter()
        self.manager.start_quorum()
        with torch.no_grad():
            for view, p in zip(self._views, self.params, strict=True):
                view.copy_(p)
        self.manager.allreduce(self._flats).wait()
        committed = self.manager.should_commit()
        if committed:
            with torch.no_grad():
                for view, p in zip(self._views, self.params, strict=True):
                    p.copy_(view)
        report = self._report(started, committed, self._flats)
        self.manager.maybe_checkpoint()  # a step boundary: periodic and requested saves (may exit)
        return report


def tensors_hash(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensors' bytes, for checking that groups hold identical weights."""
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
