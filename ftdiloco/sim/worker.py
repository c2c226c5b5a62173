"""One simulated worker: a model, its optimizers, its data shard, DiLoCo, on a thread.

The worker's thread holds the world's lock while it computes, so workers take
turns (see :mod:`ftdiloco.sim.world`); the driver hands it one inner step at a
time and reads the result from a queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ftdiloco.sim.world import InlineExecutor, SimManager, SimWorld
from ftdiloco.training.diloco import DiLoCo
from ftdiloco.training.local_sgd import LocalSGD
from ftdiloco.training.outer_loop import SyncReport, optimizer_tensors, tensors_hash

LossFn = Callable[..., torch.Tensor]


class ShardBatches:
    """Worker ``rank``'s shard, as diloco-sim reads it, one batch at a time, epoch after epoch.

    ``DistributedSampler(shuffle=True, drop_last=True)`` and a plain loader
    (the last batch of a shard may be short).  Unlike diloco-sim, each epoch
    is reshuffled (``set_epoch``); the order depends only on ``seed``.
    """

    def __init__(
        self, dataset: Dataset[Any], num_nodes: int, rank: int, batch_size: int, seed: int
    ) -> None:
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=num_nodes, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler)
        self.epoch = 0
        self._it: Any = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self.epoch += 1
                self._it = None


def inner_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    *,
    grad_clip: float | None = None,
    before_step: Callable[[], None] | None = None,
) -> float:
    """One inner step as diloco-sim takes it: zero_grad, loss_fn(model(x), y), backward, step.

    A real job's script that does exactly this (see the agreement test's
    worker) trains bitwise like the simulator.  ``before_step`` runs between
    backward and the optimizer step (the simulator saves the RNG there).
    """
    model.train()
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    value = float(loss.item())
    if before_step is not None:
        before_step()
    optimizer.step()  # DiLoCo's hook runs the outer step here when one is due
    return value


def global_state_hash(loop: DiLoCo | LocalSGD) -> str:
    """A digest of what invariant I1 compares: global weights and outer optimizer state."""
    if isinstance(loop, DiLoCo):
        outer = optimizer_tensors("outer", loop.outer_optimizer)
        return tensors_hash([*loop.backup, *(outer[k] for k in sorted(outer))])
    return tensors_hash(loop.params)


@dataclass
class StepResult:
    loss: float
    compute: float  # seconds of forward, backward and inner update
    report: SyncReport | None  # the sync applied during this step, if any


@dataclass
class WorkerSpec:
    """What every worker is built from (the simulator's arguments)."""

    model_cls: Callable[..., nn.Module]
    model_kwargs: dict[str, Any]
    optimizer_cls: Callable[..., torch.optim.Optimizer]
    optimizer_kwargs: dict[str, Any]
    outer_optimizer_cls: Callable[..., torch.optim.Optimizer]
    outer_optimizer_kwargs: dict[str, Any]
    loss_fn: LossFn
    sync_every: int
    algorithm: str
    fragments: int
    sync_delay: int
    alpha: float
    compression: str
    error_feedback: bool
    grad_clip: float | None
    seed: int


class SimWorker:
    """Worker ``index`` (replica id ``group<index>``, as a real job names its groups)."""

    def __init__(
        self,
        world: SimWorld,
        spec: WorkerSpec,
        index: int,
        device: torch.device,
        data: ShardBatches,
        *,
        incarnation: int = 0,
        initial_state: dict[str, torch.Tensor] | None = None,
        min_replicas: int = 1,
    ) -> None:
        self.index = index
        self.spec = spec
        self.device = device
        self.data = data
        self.world = world
        self.manager = SimManager(world, f"group{index}", min_replicas=min_replicas)
        # Built on the driver's thread: the global RNG seeds every model alike.
        torch.manual_seed(spec.seed)
        self.model = spec.model_cls(**spec.model_kwargs).to(device)
        if initial_state is not None:
            self.model.load_state_dict(initial_state)
        self.optimizer = spec.optimizer_cls(self.model.parameters(), **spec.optimizer_kwargs)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._compute_end = 0.0
        # Registered before DiLoCo's: runs first, so it times the inner update alone.
        self.optimizer.register_step_post_hook(self._inner_done)
        self.loop: DiLoCo | LocalSGD
        if spec.algorithm == "localsgd":
            self.loop = LocalSGD(self.manager, self.model, self.optimizer, spec.sync_every)
        else:
            self.outer = spec.outer_optimizer_cls(
                self.model.parameters(), **spec.outer_optimizer_kwargs
            )
            self.loop = DiLoCo(
                self.manager,
                self.model,
                self.optimizer,
                self.outer,
                spec.sync_every,
                fragments=spec.fragments,
                sync_delay=spec.sync_delay,
                alpha=spec.alpha,
                compression=spec.compression,
                error_feedback=spec.error_feedback,
            )
            self.loop._sync_thread = InlineExecutor()
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + index * 1009 + incarnation)
        self._rng = gen.get_state()
        self._commands: queue.Queue[tuple[int, float | None] | None] = queue.Queue()
        self._results: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"sim-{self.manager.replica_id}")
        self.entry_report: SyncReport | None = None

    # -- driver side --------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread: it enters DiLoCo, which joins the next quorum (and heals)."""
        self._thread.start()

    def wait_entered(self) -> SyncReport | None:
        self._expect("entered")
        return self.entry_report

    def step(self, local_step: int, lr_scale: float | None) -> None:
        self._commands.put((local_step, lr_scale))

    def result(self) -> StepResult:
        value: StepResult = self._expect("step")
        return value

    def stop(self) -> None:
        """End the thread (a crash, or the end of training); its state is dropped."""
        self._commands.put(None)
        self._thread.join(timeout=self.world.timeout)

    def sync_due(self) -> bool:
        """Whether the next inner step ends by starting an outer step (read while idle)."""
        steps = self.loop.inner_steps + 1
        if isinstance(self.loop, DiLoCo):
            return steps % self.loop.sync_every in self.loop.slots
        return steps % self.loop.sync_every == 0

    def in_flight(self) -> bool:
        return isinstance(self.loop, DiLoCo) and self.loop.in_flight is not None

    def global_tensors(self) -> list[torch.Tensor]:
        """The committed global weights, in ``model.parameters()`` order (trainable ones)."""
        if isinstance(self.loop, DiLoCo):
            return list(self.loop.backup)
        return [p.detach() for p in self.loop.params]

    def _expect(self, kind: str) -> Any:
        got, value = self._results.get(timeout=self.world.timeout)
        if got == "error":
            raise value
        assert got == kind, (got, kind)
        return value

    # -- worker thread --------------------------------------------------------------------

    def _inner_done(self, *_: object) -> None:
        self._compute_end = time.perf_counter()

    def _run(self) -> None:
        entered = False
        try:
            with self.world.lock:
                self.loop.__enter__()
                entered = True
                self.entry_report = self.loop.last_sync
            self._results.put(("entered", None))
            while (command := self._commands.get()) is not None:
                with self.world.lock:
                    result = self._step(*command)
                self._results.put(("step", result))
        except BaseException as e:
            self._results.put(("error", e))
        finally:
            if entered:
                with self.world.lock:
                    self.loop.__exit__(None, None, None)

    def _step(self, local_step: int, lr_scale: float | None) -> StepResult:
        x, y = self.data.next()
        x, y = _to(x, self.device), _to(y, self.device)
        if lr_scale is not None:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * lr_scale
        before = self.loop.last_sync
        saved = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        started = time.perf_counter()

        def keep_rng() -> None:
            # Before the outer step: it may wait at a barrier, where another worker runs.
            self._rng = torch.get_rng_state()
            torch.set_rng_state(saved)

        loss = inner_step(
            self.model,
            self.optimizer,
            self.spec.loss_fn,
            x,
            y,
            grad_clip=self.spec.grad_clip,
            before_step=keep_rng,
        )
        report = self.loop.last_sync if self.loop.last_sync is not before else None
        return StepResult(loss, self._compute_end - started, report)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
