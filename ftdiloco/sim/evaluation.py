"""The global model of a simulated run: evaluated, saved, summarised.

Every live worker holds the same committed global weights (invariant I1, and
the simulator's tests check it), so the first live worker's stand for the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ftdiloco.sim.worker import SimWorker


class GlobalModel:
    """A model of the run's class that takes the committed global weights on demand."""

    def __init__(
        self,
        build: Callable[[], nn.Module],
        loss_fn: Callable[..., torch.Tensor],
        loader: Callable[[], Iterator[Any]] | None,
        batches: int,
    ) -> None:
        self._build = build
        self._model: nn.Module | None = None
        self._loss_fn = loss_fn
        self._loader = loader
        self._batches = batches
        self._iter: Iterator[Any] | None = None

    def take(self, worker: SimWorker) -> nn.Module:
        """The global weights of ``worker`` (with its buffers), in this module."""
        if self._model is None:
            self._model = self._build()
        model = self._model
        model.load_state_dict(worker.model.state_dict())
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, g in zip(params, worker.global_tensors(), strict=True):
                p.copy_(g)
        return model

    def state_dict(self, worker: SimWorker) -> dict[str, torch.Tensor]:
        return self.take(worker).state_dict()

    @torch.no_grad()
    def evaluate(self, worker: SimWorker, *, fresh: bool) -> tuple[float, float]:
        """Mean loss and accuracy over ``batches`` eval batches.

        The eval loader runs on from call to call, as diloco-sim's does;
        ``fresh`` restarts it (the final evaluation: the same batches for
        every run with the same seed).  Accuracy is argmax over the last
        dimension, where outputs have one more dimension than targets; NaN
        otherwise.
        """
        assert self._loader is not None
        model = self.take(worker)
        model.eval()
        if fresh or self._iter is None:
            self._iter = self._loader()
        device = next(model.parameters()).device
        losses, correct, total = [], 0, 0
        for _ in range(self._batches):
            try:
                x, y = next(self._iter)
            except StopIteration:
                self._iter = self._loader()
                x, y = next(self._iter)
            x, y = x.to(device), y.to(device)
            out = model(x)
            losses.append(float(self._loss_fn(out, y).item()))
            if isinstance(out, torch.Tensor) and out.dim() == y.dim() + 1:
                correct += int((out.argmax(dim=-1) == y).sum().item())
                total += y.numel()
        model.train()
        return sum(losses) / len(losses), (correct / total if total else float("nan"))


def settings(sim: Any) -> dict[str, Any]:
    """The run's settings, for ``summary.json``."""
    spec, failures = sim.spec, sim.failures
    mtbf = failures.mtbf
    return {
        "num_nodes": sim.num_nodes,
        "diloco_interval": sim.diloco_interval,
        "batch_size": sim.batch_size,
        "max_local_step": sim.max_local_step,
        "algorithm": spec.algorithm,
        "fragments": spec.fragments,
        "sync_delay": spec.sync_delay,
        "alpha": spec.alpha,
        "compression": spec.compression,
        "error_feedback": spec.error_feedback,
        "seed": sim.seed,
        "params": sim.numel,
        "failures_unit": failures.unit,
        "mtbf": list(mtbf) if isinstance(mtbf, list | tuple) else mtbf,
        "down_for": failures.down_for,
    }


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, desc="simulating", unit="step", leave=False)
