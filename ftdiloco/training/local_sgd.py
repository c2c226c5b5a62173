"""LocalSGD: average the weights themselves every ``sync_every`` inner steps."""

from __future__ import annotations

import time

import torch
from torch import nn

from ftdiloco.training.outer_loop import (
    OuterLoop,
    OuterManager,
    SyncReport,
    copy_all,
    flat_views,
    load_optimizer_tensors,
    optimizer_tensors,
)


def _refuse_paced_settings(manager: OuterManager) -> None:
    """LocalSGD has neither DyLU nor an asynchronous mode: say so rather than ignore the setting.

    A script chooses its outer loop, but FTDILOCO_MODE and FTDILOCO_DYLU
    reach every script through the manager's config; a LocalSGD job started
    with them would silently run plain synchronous LocalSGD.
    """
    config = getattr(manager, "config", None)  # the simulator's manager has none
    if getattr(config, "mode", "sync") == "async":
        raise ValueError(
            "FTDILOCO_MODE=async needs DiLoCo (a global copy and an outer optimizer to merge"
            " stale pseudo-gradients into); LocalSGD only syncs: unset it or use DiLoCo"
        )
    if getattr(config, "dylu", False):
        raise ValueError(
            "FTDILOCO_DYLU=1 needs DiLoCo (pseudo-gradients weighted by the work behind them);"
            " LocalSGD averages the weights themselves: unset it or use DiLoCo"
        )


class LocalSGD(OuterLoop):
    """Average the weights themselves every ``sync_every`` steps (no outer optimizer).

    A failed step keeps the local weights: LocalSGD has no global copy to return to.
    """

    def __init__(
        self,
        manager: OuterManager,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sync_every: int,
    ) -> None:
        _refuse_paced_settings(manager)
        super().__init__(manager, model, optimizer, sync_every)
        self.optimizer = optimizer
        self._flats, self._views = flat_views(self.params)
        manager.register_state("localsgd", self._save, self._load)

    def _save(self) -> dict[str, torch.Tensor]:
        state = {f"param.{i}": p.detach() for i, p in enumerate(self.params)}
        state["sync_point"] = self._sync_point
        state.update(optimizer_tensors("inner", self.optimizer))
        return state

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(state[f"param.{i}"])
        self.inner_steps = int(state["sync_point"])
        load_optimizer_tensors("inner", self.optimizer, state)

    def _catch_up(self) -> None:
        self.sync()

    def sync(self) -> SyncReport:
        started = time.perf_counter()
        self._join()
        with torch.no_grad():
            for view, p in zip(self._views, self.params, strict=True):
                view.copy_(p)
        work = self.manager.allreduce(self._flats)
        work.wait()
        if work.abandoned:
            # The backend may still write into these buffers: never reuse them.
            self._flats, self._views = flat_views(self.params)
        committed = self.manager.should_commit()
        if committed:
            copy_all(self.params, self._views)
        # LocalSGD syncs on the training thread: all of it is waiting.
        report = self._report(started, committed, self._flats, None)
        self.manager.maybe_checkpoint()  # a step boundary: periodic and requested saves (may exit)
        return report
