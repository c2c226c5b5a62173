"""``DilocoSimulator``: N DiLoCo workers in one process, with failures and a network model.

A drop-in for diloco-sim's keyword API (``from ftdiloco.sim import
DilocoSimulator`` instead of ``from diloco_sim import ...``), whose workers run
this library's own :class:`~ftdiloco.training.diloco.DiLoCo` against in-process stand-ins
for the lighthouse and the collectives (:mod:`ftdiloco.sim.world`).  What a run
learns about convergence therefore holds for a real job with the same
settings; a test checks that a 2-worker simulation and a real 2-group job
commit bitwise identical global weights.

Beyond diloco-sim: the real system's options (``fragments``, ``sync_delay``,
``alpha``, ``compression``, ``error_feedback``, ``algorithm="localsgd"``), a
``seed`` that makes a run bitwise reproducible, failure injection
(:class:`~ftdiloco.sim.failures.FailurePlan`), a network model
(:class:`~ftdiloco.sim.network.NetworkModel`) giving simulated wall-clock time,
communication wait, compute utilization and bytes on the wire, and outputs
(:mod:`ftdiloco.sim.output`).  Hooks run in the caller's thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftdiloco.sim.failures import FailurePlan
from ftdiloco.sim.network import NetworkModel
from ftdiloco.sim.output import Recorder, load_model_file
from ftdiloco.sim.run import Run
from ftdiloco.sim.worker import LossFn, WorkerSpec
from ftdiloco.training.compression import get_codec
from ftdiloco.training.diloco import split_fragments

log = structlog.get_logger("ftdiloco.sim")


@dataclass
class TrainStats:
    """Passed to ``train_loss_hook`` after every local step (diloco-sim's fields)."""

    loss: float
    local_step: int
    global_step: int
    epoch: int
    num_diloco_steps: int


@dataclass
class EvalStats:
    """Passed to ``eval_loss_hook`` after each evaluation of the global model."""

    loss: float
    accuracy: float
    local_step: int
    global_step: int
    epoch: int
    num_diloco_steps: int


@dataclass
class SimResult:
    """What :meth:`DilocoSimulator.train` returns (and writes to ``summary.json``)."""

    local_steps: int
    final_eval_loss: float | None
    final_train_loss: float | None
    sim_seconds: float  # simulated wall-clock time of the job
    compute_seconds: float  # summed over workers, while up
    wait_seconds: float  # summed over workers: blocked on quorum, heal or exchange
    compute_utilization: float  # compute / (compute + wait), over the workers' up time
    outer_steps: int  # outer steps (quorums) run
    committed: int
    rolled_back: int
    failures: int
    skipped_failures: int
    rejoins: int
    bytes_sent: int  # payload bytes per worker, summed over outer steps (library's accounting)
    wire_bytes: int  # bytes per worker on the wire (ring allreduce / allgather), summed
    bytes_per_outer_step: float  # payload bytes one worker sends per outer step, mean
    per_worker: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _length(name: str, dataset: object) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a map-style Dataset with a length") from None


class DilocoSimulator:
    """Train ``num_nodes`` simulated DiLoCo workers; see the module docstring.

    The first twenty arguments are diloco-sim's, with its defaults (``device``
    is accepted; without it workers spread over the CUDA devices, else the
    CPU).  The rest are keyword-only.  Every argument is checked here: a bad
    one raises ValueError or TypeError naming it, before any training.
    """

    def __init__(
        self,
        model_cls: Callable[..., nn.Module],
        loss_fn: LossFn,
        train_dataset: Dataset[Any],
        model_kwargs: dict[str, Any] | None = None,
        num_nodes: int = 4,
        optimizer_kwargs: dict[str, Any] | None = None,
        diloco_interval: int = 500,
        batch_size: int = 16,
        eval_dataset: Dataset[Any] | None = None,
        optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        ckpt_interval: int | None = None,
        eval_iters: int = 50,
        save_dir: str | Path | None = None,
        outer_optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        outer_optimizer_kwargs: dict[str, Any] | None = None,
        max_local_step: int | None = None,
        num_epochs: int = 1,
        cosine_anneal: bool = False,
        train_loss_hook: Callable[[TrainStats], None] | None = None,
        eval_loss_hook: Callable[[EvalStats], None] | None = None,
        device: torch.device | str | None = None,
        *,
        seed: int = 0,
        algorithm: str = "diloco",
        fragments: int = 1,
        sync_delay: int = 0,
        alpha: float = 0.0,
        compression: str = "fp32",
        error_feedback: bool = False,
        grad_clip: float | None = None,
        network: NetworkModel | None = None,
        failures: FailurePlan | None = None,
        min_replicas: int = 1,
        progress: bool = True,
        record_hashes: bool = False,
    ) -> None:
        if not callable(model_cls):
            raise TypeError(f"model_cls must be an nn.Module class, got {model_cls!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        self.num_nodes = _positive_int("num_nodes", num_nodes)
        self.diloco_interval = _positive_int("diloco_interval", diloco_interval)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.eval_iters = _positive_int("eval_iters", eval_iters)
        self.num_epochs = _positive_int("num_epochs", num_epochs)
        self.min_replicas = _positive_int("min_replicas", min_replicas)
        if ckpt_interval is not None:
            _positive_int("ckpt_interval", ckpt_interval)
        if max_local_step is not None:
            _positive_int("max_local_step", max_local_step, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        size = _length("train_dataset", train_dataset)
        if size // self.num_nodes < self.batch_size:
            raise ValueError(
                f"train_dataset has {size} items: fewer than one batch "
                f"(batch_size={batch_size}) for each of num_nodes={num_nodes} workers"
            )
        if eval_dataset is not None and _length("eval_dataset", eval_dataset) < 1:
            raise ValueError("eval_dataset is empty")
        if algorithm not in ("diloco", "localsgd"):
            raise ValueError(f"algorithm must be 'diloco' or 'localsgd', got {algorithm!r}")
        try:
            get_codec(compression)
        except ValueError as e:
            raise ValueError(f"compression: {e}") from None
        if algorithm == "localsgd" and (compression != "fp32" or fragments != 1 or sync_delay):
            raise ValueError("compression, fragments and sync_delay need algorithm='diloco'")
        _positive_int("fragments", fragments)
        if not (isinstance(sync_delay, int) and 0 <= sync_delay < diloco_interval // fragments):
            raise ValueError(
                f"sync_delay must be in [0, diloco_interval // fragments) = "
                f"[0, {diloco_interval // fragments}), got {sync_delay!r}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {grad_clip!r}")
        self.network = network if network is not None else NetworkModel()
        if not isinstance(self.network, NetworkModel):
            raise TypeError(f"network must be a NetworkModel, got {network!r}")
        self.links = self.network.for_workers(self.num_nodes)
        self.failures = failures if failures is not None else FailurePlan()
        if not isinstance(self.failures, FailurePlan):
            raise TypeError(f"failures must be a FailurePlan, got {failures!r}")
        self.failures.validate(self.num_nodes)

        steps = self.num_epochs * size // (self.batch_size * self.num_nodes)
        self.max_local_step = min(steps, max_local_step) if max_local_step else steps
        self.spec = WorkerSpec(
            model_cls=model_cls,
            model_kwargs=dict(model_kwargs or {}),
            optimizer_cls=optimizer_cls,
            optimizer_kwargs=dict(
                optimizer_kwargs if optimizer_kwargs is not None else {"lr": 1e-3}
            ),
            outer_optimizer_cls=outer_optimizer_cls,
            outer_optimizer_kwargs=dict(
                outer_optimizer_kwargs
                if outer_optimizer_kwargs is not None
                else {"lr": 0.7, "nesterov": True, "momentum": 0.9}
            ),
            loss_fn=loss_fn,
            sync_every=self.diloco_interval,
            algorithm=algorithm,
            fragments=fragments,
            sync_delay=sync_delay,
            alpha=alpha,
            compression=compression,
            error_feedback=error_feedback,
            grad_clip=grad_clip,
            seed=seed,
        )
        self._check_model(fragments)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.ckpt_interval = ckpt_interval
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.cosine_anneal = cosine_anneal
        self.train_loss_hook = train_loss_hook
        self.eval_loss_hook = eval_loss_hook
        self.device = torch.device(device) if device is not None else None
        self.seed = seed
        self.progress = progress
        self.record_hashes = record_hashes
        self.result: SimResult | None = None
        # After train(): one ``sync`` event per outer step (see metrics.jsonl).
        self.recorded_syncs: list[dict[str, Any]] = []

    def _check_model(self, fragments: int) -> None:
        """Build one model now, so a bad model_kwargs or fragments fails here, not in a thread."""
        try:
            model = self.spec.model_cls(**self.spec.model_kwargs)
        except Exception as e:
            raise ValueError(f"model_cls(**model_kwargs) failed: {e!r}") from e
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_cls must build an nn.Module, got {type(model).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model_cls builds a model without trainable parameters")
        try:
            split_fragments(params, fragments)
        except ValueError as e:
            raise ValueError(f"fragments: {e}") from None
        self.numel = sum(p.numel() for p in params)

    def device_for(self, worker: int) -> torch.device:
        """Where worker ``worker`` trains: ``device``, else CUDA devices round-robin, else CPU."""
        if self.device is not None:
            return self.device
        if torch.cuda.is_available():
            return torch.device("cuda", worker % torch.cuda.device_count())
        return torch.device("cpu")

    def train(self, model_path: str | Path | None = None) -> SimResult:
        """Run to ``max_local_step``; ``model_path`` starts every worker from those weights."""
        initial = load_model_file(model_path) if model_path is not None else None
        recorder = Recorder(self.save_dir)
        try:
            self.result = Run(self, recorder, initial).execute()
        finally:
            recorder.close()
            self.recorded_syncs = [e for e in recorder.events if e["event"] == "sync"]
        return self.result

    def lr_scale(self, local_step: int) -> float | None:
        """Cosine annealing to 0 over the run (CosineAnnealingLR's closed form), or None."""
        if not self.cosine_anneal:
            return None
        return 0.5 * (1 + math.cos(math.pi * local_step / self.max_local_step))

    def eval_loader(self) -> DataLoader[Any]:
        assert self.eval_dataset is not None
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.eval_dataset, batch_size=self.batch_size, shuffle=True, generator=gen
        )
