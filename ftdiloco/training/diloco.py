"""DiLoCo: an outer step every ``sync_every`` inner optimizer steps.

It hooks the inner optimizer's ``step`` so the user's loop stays ordinary::

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

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ftdiloco.coordination.allreduce import Work
from ftdiloco.coordination.plan import QuorumPlan
from ftdiloco.training.compression import get_codec
from ftdiloco.training.hetero import (
    Contribution,
    contribution_weights,
    delayed_nesterov_,
    join_grace,
    local_steps,
    momentum_due,
    period_position,
    real_steps_at,
)
from ftdiloco.training.outer_loop import (
    GlobalWeights,
    OuterLoop,
    OuterManager,
    OuterStepHost,
    PacedManager,
    SyncReport,
    by_dtype,
    copy_all,
    flat_views,
    load_optimizer_tensors,
    optimizer_tensors,
)

MODES = ("sync", "async")
# Async: how far apart, as a share of a trip, groups of one speed may join.
_JITTER = 0.05


@dataclass
class _Fragment:
    """A slice of the model (in module order) with its own backup."""

    index: int
    params: list[nn.Parameter]
    backup: list[torch.Tensor]
    flats: list[torch.Tensor]
    pseudo: list[torch.Tensor]
    residuals: list[torch.Tensor]  # error feedback: what quantization left out, per flat


@dataclass
class _InFlight:
    """A sync between its start and the inner step where it is applied."""

    # The quorum's work and the fragment it averaged (see DiLoCo._exchange).
    done: concurrent.futures.Future[tuple[Work, _Fragment]]
    started: float
    started_at: int  # the inner step at which it started; applied sync_delay steps later
    # It ran on the training thread (plain DiLoCo): the inner loop waited throughout.
    blocking: bool = False


def split_fragments(params: list[nn.Parameter], n: int) -> list[list[nn.Parameter]]:
    """``n`` consecutive runs of parameters of about equal bytes, in module order."""
    if not 1 <= n <= len(params):
        raise ValueError(f"fragments must be between 1 and {len(params)} parameters, got {n}")
    sizes = [p.numel() * p.element_size() for p in params]
    total = sum(sizes)
    runs: list[list[nn.Parameter]] = [[] for _ in range(n)]
    done, target = 0, 0
    for i, (p, size) in enumerate(zip(params, sizes, strict=True)):
        by_bytes = (2 * done + size) * n // max(2 * total, 1)  # where its middle falls
        # Never skip a fragment, and leave a parameter for every later one.
        target = max(min(by_bytes, target + 1, n - 1, i), n - (len(params) - i))
        runs[target].append(p)
        done += size
    return runs


class DiLoCo(OuterLoop):
    """DiLoCo, optionally streaming: the model travels in fragments, overlapped with compute.

    ``fragments`` (N) splits the model into N slices and syncs one of them
    every ``sync_every / N`` inner steps, so at most one slice is on the wire
    at a time.  A sync carries the slice of the committed step (step mod N):
    every group up to date is at that step, and a group that fell behind
    learns it from the quorum, so all of them pass the collective the same
    tensors (a failed step is retried with the same slice).
    ``sync_delay`` (tau) starts a slice's allreduce tau inner steps before its
    result is applied, hiding the communication behind those steps.  ``alpha``
    merges the new global weights with the local ones at application
    (0: take the global weights).  N = 1, tau = 0, alpha = 0 is plain DiLoCo.
    Each fragment has its own backup and rolls back on its own.
    ``compression`` ("fp32", "bf16", "fp16", "int8", "fp8", "int4") is how
    pseudo-gradients travel; they are always summed in fp32.
    ``error_feedback`` carries each sync's quantization error into the next.

    With tau > 0 everything between a fragment's start and its application
    that is not the training thread's own arithmetic -- joining the quorum
    (which includes waiting for the slowest group), a heal, encoding, the
    exchange -- runs on one sync thread, so the inner loop only pays for
    the pseudo-gradient at the start and the vote and outer step at the end.
    A heal that lands meanwhile reaches the live weights at the application.

    Groups of unequal speed (:mod:`ftdiloco.training.hetero`): with ``dylu``
    each group reports its inner-step rate with its join and takes
    ``H_w = max(1, floor(sync_every * v_w / v_max))`` inner steps in the next
    period, so all of them arrive together; pseudo-gradients are weighted by
    the samples behind them (inner steps x ``tokens_per_step``).  With
    ``mode="async"`` nobody waits for a straggler longer than ``grace``
    seconds: the quorum commits with the groups that are ready, a late
    group's pseudo-gradient joins a later step discounted by its staleness
    (it heals to the current global weights in that step), and the outer
    step is delayed Nesterov, the momentum moving every ``momentum_every``
    contributions (the outer optimizer must be ``torch.optim.SGD``; its lr
    and momentum are read from its param groups).
    """

    def __init__(
        self,
        manager: OuterManager,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        sync_every: int,
        backup_device: str | torch.device = "cpu",
        *,
        fragments: int = 1,
        sync_delay: int = 0,
        alpha: float = 0.0,
        compression: str = "fp32",
        error_feedback: bool = False,
        dylu: bool = False,
        mode: Literal["sync", "async"] = "sync",
        grace: float = 1.0,
        momentum_every: int = 1,
        tokens_per_step: int = 1,
    ) -> None:
        super().__init__(manager, model, inner_optimizer, sync_every)
        self._paced = _paced_manager(manager, dylu, mode)
        self.dylu = dylu
        self.asynchronous = mode == "async"
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace}")
        if momentum_every < 1 or tokens_per_step < 1:
            raise ValueError(
                "momentum_every and tokens_per_step must be >= 1,"
                f" got {momentum_every} and {tokens_per_step}"
            )
        if self.asynchronous and not isinstance(outer_optimizer, torch.optim.SGD):
            raise ValueError(
                "mode='async' steps the outer weights with delayed Nesterov, reading lr and"
                f" momentum from a torch.optim.SGD; got {type(outer_optimizer).__name__}"
            )
        self.momentum_every = momentum_every
        self.tokens_per_step = tokens_per_step
        # fp32 goes through the manager's plain (bucketed, in place) allreduce.
        self.codec = None if compression == "fp32" else get_codec(compression)
        if not 0 <= sync_delay < sync_every // fragments:
            raise ValueError(
                f"sync_delay must be in [0, sync_every // fragments) ="
                f" [0, {sync_every // fragments}) so that one fragment is on the wire at a time;"
                f" got {sync_delay}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.sync_delay = sync_delay
        self.alpha = alpha
        outer_params = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
        if any(id(p) not in outer_params for p in self.params):
            raise ValueError("the outer optimizer must hold every trainable model parameter")
        device = torch.device(backup_device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        self.fragments = []
        for index, params in enumerate(split_fragments(self.params, fragments)):
            backup = [p.detach().to(device, copy=True) for p in params]
            if pin:  # page-locked host memory makes device<->backup copies asynchronous
                backup = [b.pin_memory() for b in backup]
            flats, pseudo = flat_views(params)
            residuals = (
                [torch.zeros_like(f, dtype=torch.float32) for f in flats]
                if error_feedback and self.codec is not None
                else []
            )
            self.fragments.append(_Fragment(index, params, backup, flats, pseudo, residuals))
        self.backup = [b for f in self.fragments for b in f.backup]
        # The inner steps (mod sync_every) at which a sync starts: one per
        # fragment, evenly spaced, the last at the end of the outer period.
        self.slots = tuple((k + 1) * sync_every // fragments % sync_every for k in range(fragments))
        self.in_flight: _InFlight | None = None
        # One thread for every background sync: at most one is in flight, and
        # the manager is used by one thread at a time.
        self._sync_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_background = False
        self._healed_sync_point: int | None = None
        # The period in real inner steps: H_w now, and from the next period
        # on (DyLU; both sync_every otherwise).  ``inner_steps`` stays in units
        # of sync_every (see hetero.period_position), so that the slots, the
        # sync delay and a heal's sync point mean the same on every group.
        self.local_steps = self._next_local_steps = sync_every
        self._period_start = 0
        self._real_steps = 0
        # Real inner steps since each fragment was last applied: what its
        # pseudo-gradient is worth.
        self._trip = [0] * len(self.fragments)
        self._pace = _InnerRate()
        self._rate = 0.0  # the last rate measured (for the reports)
        # Of the exchange in flight (set on the sync thread before it ends):
        # how many groups brought a pseudo-gradient, and how stale ours was.
        self._contributors = 0
        self._staleness = 0
        # Delayed Nesterov per fragment: contributions and outer steps since
        # its momentum last moved (healed and checkpointed with the state).
        self._delayed = torch.zeros((len(self.fragments), 2), dtype=torch.int64)
        # Async: each join's grace (hetero.join_grace) from when the others
        # are expected: replica id -> (when its trip began, its length in
        # seconds or None), learnt from the quorums shared with it; and when
        # this group's last quorum formed.
        self.grace = grace
        self._peers: dict[str, tuple[float, float | None]] = {}
        self._formed_at: float | None = None
        if self._paced is not None and self.asynchronous:
            self._paced.set_join_grace(grace)
        manager.register_state("diloco", self._save, self._load)
        self._host = manager if isinstance(manager, OuterStepHost) else None
        if self._host is not None:
            self._bind_host(self._host, model)

    def _bind_host(self, host: OuterStepHost, model: nn.Module) -> None:
        """Hand the backups to a manager that steps the global weights itself (the hub).

        The hub's outer step is DiLoCo's delayed Nesterov (every step in sync
        mode: SGD with Nesterov momentum), so the outer optimizer must be one
        it can stand for.
        """
        group = self.outer_optimizer.param_groups[0]
        heavy_ball = float(group.get("momentum", 0.0)) > 0 and not group.get("nesterov", False)
        if not isinstance(self.outer_optimizer, torch.optim.SGD) or heavy_ball:
            raise ValueError(
                "over a hub the outer step is SGD with Nesterov momentum, applied by the hub;"
                f" got {type(self.outer_optimizer).__name__}"
                + (" without nesterov=True" if heavy_ball else "")
            )
        mine = {id(p) for p in self.params}
        first = 0
        layout = []
        for fragment in self.fragments:
            layout.append(tuple(tuple(first + i for i in g) for g in by_dtype(fragment.params)))
            first += len(fragment.params)
        host.bind_global_weights(
            GlobalWeights(
                names=tuple(n for n, p in model.named_parameters() if id(p) in mine),
                backup=tuple(self.backup),
                fragments=tuple(layout),
                sync_point=self._sync_point,
                outer_lr=float(group["lr"]),
                outer_momentum=float(group.get("momentum", 0.0)),
                momentum_every=self.momentum_every if self.asynchronous else 1,
                adopt=self._run_on_from,
            )
        )

    def _save(self) -> dict[str, torch.Tensor]:
        state = {f"backup.{i}": b for i, b in enumerate(self.backup)}
        state["sync_point"] = self._sync_point
        if self.asynchronous:
            state["delayed"] = self._delayed
        state.update(optimizer_tensors("outer", self.outer_optimizer))
        if self.sync_delay == 0:
            # With a delay the inner loop runs on while a peer may be copying
            # this state, so the inner optimizer's moments are not carried.
            state.update(optimizer_tensors("inner", self.inner_optimizer))
        return state

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt a peer's committed state: global weights, optimizer state.

        The backups and the outer optimizer are only touched when a fragment
        is applied, so a heal on the sync thread may write them; the live
        weights and the step count belong to the inner loop, which adopts
        them when the fragment in flight is applied.
        """
        for i, b in enumerate(self.backup):
            b.copy_(state[f"backup.{i}"])
        if self.asynchronous:
            self._delayed.copy_(state["delayed"])
        load_optimizer_tensors("outer", self.outer_optimizer, state)
        if self.sync_delay == 0:
            load_optimizer_tensors("inner", self.inner_optimizer, state)
        self._run_on_from(int(state["sync_point"]))

    def _run_on_from(self, sync_point: int) -> None:
        """The backups were healed: the inner loop adopts them now, or when the sync is applied."""
        if self._in_background:
            self._healed_sync_point = sync_point
        else:
            self._adopt_global_weights(sync_point)

    def _adopt_global_weights(self, inner_steps: int) -> None:
        """Run on from the donors' weights, at their point of the schedule."""
        self.inner_steps = inner_steps
        position = inner_steps % self.sync_every
        self._period_start = inner_steps - position
        self._real_steps = real_steps_at(
            position, self.local_steps, self.sync_every, len(self.fragments)
        )
        self._trip = [0] * len(self.fragments)
        for fragment in self.fragments:
            copy_all(fragment.params, fragment.backup)
            for residual in fragment.residuals:
                residual.zero_()  # the error of progress the heal discarded

    def __exit__(self, *exc: object) -> None:
        """Let a background sync finish, so the manager is idle when the caller closes it.

        The sync stays in flight, unapplied and unvoted: ``sync()`` still
        applies it; otherwise this group is simply behind at its next quorum.
        Leaving on an exception (Ctrl-C, say) does not wait: closing the
        manager then abandons the sync instead of waiting out its deadline.
        """
        try:
            if self._sync_thread is not None:
                self._sync_thread.shutdown(wait=exc[0] is None, cancel_futures=True)
                self._sync_thread = None
        finally:
            super().__exit__(*exc)

    def _after_inner_step(self, *_: object) -> None:
        self._pace.stopped()
        self._advance()
        flight = self.in_flight
        if flight is not None and self.inner_steps >= flight.started_at + self.sync_delay:
            self._apply()
        if self.inner_steps % self.sync_every in self.slots:
            self._start(now=self.sync_delay == 0)
            if self.sync_delay == 0:
                self._apply()
        self._pace.resumed()

    def _advance(self) -> None:
        """One real inner step: move along the period, in units of sync_every.

        At full speed that is one unit; a group that takes H_w < sync_every
        steps (DyLU) strides further, reaching every sync point exactly.
        """
        self._real_steps += 1
        self._trip = [n + 1 for n in self._trip]
        self.inner_steps = self._period_start + period_position(
            self._real_steps, self.local_steps, self.sync_every, len(self.fragments)
        )
        if self._real_steps >= self.local_steps:
            self._period_start, self._real_steps = self.inner_steps, 0
            self.local_steps = self._next_local_steps

    def sync(self) -> SyncReport:
        """Finish the sync in flight and sync every other fragment, now (at the end of training)."""
        remaining = len(self.fragments)
        if self.in_flight is not None:
            self._apply()
            remaining -= 1
        for _ in range(remaining):
            self._start(now=True)
            self._apply()
        assert self.last_sync is not None
        return self.last_sync

    def _catch_up(self) -> None:
        started = time.perf_counter()
        self._tell_peers(self.fragments[self.manager.step % len(self.fragments)])
        self._join()
        self._formed_at = time.perf_counter()  # its first trip starts here (async's grace)
        # A heal moved inner_steps to the donors' sync point: sync when they sync.
        if self.inner_steps % self.sync_every in self.slots:
            self._start(now=True, joined_at=started)
            self._apply(skip_empty=True)
        self._pace.resumed()

    def _start(self, *, now: bool, joined_at: float | None = None) -> None:
        """Take a pseudo-gradient and send it, on this thread or on the sync thread.

        Which fragment a sync carries follows the committed step, which every
        group up to date agrees on (see _exchange).  ``joined_at``: the
        quorum was already joined, at that time.
        """
        fragment = self.fragments[self.manager.step % len(self.fragments)]
        with torch.no_grad():
            for pseudo, p, b in zip(fragment.pseudo, fragment.params, fragment.backup, strict=True):
                if b.device == p.device:
                    torch.sub(b, p, out=pseudo)
                else:  # a host backup of an accelerator's weights
                    pseudo.copy_(b, non_blocking=True)
                    pseudo.sub_(p)
        started = joined_at if joined_at is not None else time.perf_counter()
        if joined_at is None:
            # What a heal from us carries: the inner step this sync started at.
            self._sync_point.fill_(self.inner_steps)
            self._tell_peers(fragment)
        join = joined_at is None
        if now:
            done: concurrent.futures.Future[tuple[Work, _Fragment]] = concurrent.futures.Future()
            done.set_result(self._exchange(fragment, join))
        else:
            if self._sync_thread is None:
                self._sync_thread = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="ftdiloco-sync"
                )
            self._in_background = True
            done = self._sync_thread.submit(self._exchange, fragment, join)
        self.in_flight = _InFlight(done, started, self.inner_steps, blocking=now)

    def _exchange(self, fragment: _Fragment, join: bool) -> tuple[Work, _Fragment]:
        """Join the quorum (a group that is behind heals here) and average a fragment.

        Every member must pass tensors of the same shapes to the collective.
        A group that is behind may be at another point of the schedule, so it
        takes part -- with zeros -- in the fragment of the quorum's step,
        which is what the members up to date send: they are at that step.
        """
        if join:
            self.manager.start_quorum()
            self._formed_at = time.perf_counter()
        plan = self.manager.plan
        if plan is not None and plan.heal:
            fragment = self.fragments[plan.max_step % len(self.fragments)]
        residuals = fragment.residuals or None
        if self._paced is not None and plan is not None:
            weight = self._weigh(plan)
            work = self._paced.allreduce(
                fragment.flats, weight=weight, codec=self.codec, residuals=residuals
            )
        else:
            work = self.manager.allreduce(fragment.flats, codec=self.codec, residuals=residuals)
        work.wait()
        return work, fragment

    def _tell_peers(self, fragment: _Fragment) -> None:
        """What this group's next join tells the others: rate, H_w, its pseudo-gradient's worth.

        The staleness of its last contribution goes along for the operator
        (the lighthouse's /status and dashboard); the peers do not use it.
        """
        if self._paced is None:
            return
        rate = self._pace.take()
        if rate is not None:
            self._rate = rate
        if self.asynchronous and self._formed_at is not None:
            self._paced.set_join_grace(self._grace_now())
        self._paced.set_join_info(
            {
                "rate": rate if rate is not None else 0.0,
                "h": self.local_steps,
                "tokens": self._trip[fragment.index] * self.tokens_per_step,
                "step": self.manager.step,
                "staleness": self._staleness,
            }
        )

    def _expect_peers(self, plan: QuorumPlan) -> None:
        """Async: every other participant starts its next trip now; note when it should be back.

        Its trip is its H over its rate (per fragment: a group joins once per
        fragment), as it told us; unknown until it measured a rate.
        """
        now = time.perf_counter()
        for rid in plan.participants:
            info = plan.peer_info.get(rid, {})
            rate, h = float(info.get("rate", 0.0)), float(info.get("h", self.sync_every))
            if rid != plan.replica_id:
                trip = h / rate / len(self.fragments) if rate > 0 else None
                self._peers[rid] = (now, trip)

    def _grace_now(self) -> float:
        """Async: this join's straggler grace (hetero.join_grace), from when the others are due.

        A group overdue by more than a trip (its own, or this group's if its
        length is unknown) without joining a quorum with this one has left,
        or joins on another rhythm: it is forgotten, so that it cannot hold
        every later step in the long wait meant for a group still waiting.
        """
        assert self._formed_at is not None
        now = time.perf_counter()
        elapsed = now - self._formed_at
        arrivals: list[float | None] = []
        for rid, (start, trip) in list(self._peers.items()):
            due = start + (trip or 0.0) - now
            if -due > max(trip or 0.0, elapsed):
                del self._peers[rid]
            else:
                arrivals.append(None if trip is None else due)
        return join_grace(self.grace, elapsed, arrivals, jitter=_JITTER * elapsed)

    def _weigh(self, plan: QuorumPlan) -> float:
        """This group's weight in the outer step, from what every participant said (I1).

        Synchronously a group that heals brings nothing (its pseudo-gradient
        was taken against a state the quorum has left).  Asynchronously a
        group behind brings its pseudo-gradient, discounted by its staleness,
        if it is of the fragment this step carries.
        """
        fragments = len(self.fragments)
        contributions = {}
        for rid in plan.participants:
            info = plan.peer_info.get(rid, {})
            step = int(info.get("step", plan.max_step))
            tokens = float(info.get("tokens", 0.0))
            behind = plan.max_step - step
            if rid in plan.recovering and not (
                self.asynchronous and behind > 0 and step % fragments == plan.max_step % fragments
            ):
                tokens = 0.0
            contributions[rid] = Contribution(tokens, behind)
        weights = contribution_weights(contributions)
        self._contributors = sum(1 for w in weights.values() if w > 0)
        self._staleness = contributions[plan.replica_id].staleness
        return weights[plan.replica_id]

    def _apply(self, skip_empty: bool = False) -> None:
        """Wait for the sync in flight; commit and step its fragment, or roll it back.

        ``skip_empty``: when nobody made progress (a fresh or resumed job's
        first step) the average is all zeros, and stepping would only replay
        the outer optimizer's momentum; the step is committed without it.
        """
        flight = self.in_flight
        assert flight is not None
        self.in_flight = None
        waiting = time.perf_counter()
        try:
            work, fragment = flight.done.result()
        finally:
            self._in_background = False
        waited: float | None = None if flight.blocking else time.perf_counter() - waiting
        if work.abandoned:
            # The backend may still write into these buffers: never reuse them.
            fragment.flats, fragment.pseudo = flat_views(fragment.params)
        if self._healed_sync_point is not None:
            # A heal on the sync thread: run on from the donors' weights and schedule.
            healed, self._healed_sync_point = self._healed_sync_point, None
            self._adopt_global_weights(healed + self.inner_steps - flight.started_at)
        self._trip[fragment.index] = 0
        plan = self.manager.plan
        if self.dylu and plan is not None:
            self._plan_local_steps(plan)
        if self.asynchronous and plan is not None:
            self._expect_peers(plan)
        local = [p.detach().clone() for p in fragment.params] if self.alpha > 0 else None
        copy_all(fragment.params, fragment.backup)
        committed = self.manager.should_commit()
        empty = skip_empty and not any(bool(flat.any()) for flat in fragment.flats)
        # A hub steps even when this group brought nothing: the others may have.
        stepped = committed and (self._host is not None or not empty)
        if stepped and self._host is not None:
            # The hub applied the outer step; should_commit wrote its weights to the backups.
            copy_all(fragment.params, fragment.backup)
        elif stepped:
            self._apply_settings()
            self._outer_step(fragment)
        if stepped and local is not None:
            with torch.no_grad():
                for p, mine in zip(fragment.params, local, strict=True):
                    p.lerp_(mine, self.alpha)
        if not committed:
            for residual in fragment.residuals:
                residual.zero_()  # it held the error of a pseudo-gradient now discarded
        self._report(
            flight.started,
            committed,
            fragment.flats,
            waited,
            work.nbytes,
            fragment.index,
            local_steps=self.local_steps,
            staleness=self._staleness,
            rate=self._rate,
        )
        self.manager.maybe_checkpoint()  # a step boundary: periodic and requested saves (may exit)

    def _plan_local_steps(self, plan: QuorumPlan) -> None:
        """DyLU: H_w for the next period from the rates every group reported (now, at its start)."""
        rates = {rid: float(info.get("rate", 0.0)) for rid, info in plan.peer_info.items()}
        self._next_local_steps = local_steps(
            self.sync_every,
            rates.get(plan.replica_id),
            max(rates.values(), default=0.0),
            minimum=len(self.fragments),
        )
        if self._real_steps == 0:
            self.local_steps = self._next_local_steps

    def _apply_settings(self) -> None:
        """The live settings of this step's quorum (set-outer-lr), on every param group.

        Every group of the quorum holds the same settings for the same step, so
        the change takes effect at the same outer step everywhere (I1).
        """
        plan = self.manager.plan
        settings = plan.outer_settings if plan is not None else None
        if settings is None:
            return
        for group in self.outer_optimizer.param_groups:
            if settings.outer_lr is not None:
                group["lr"] = settings.outer_lr
            if settings.outer_momentum is not None and "momentum" in group:
                group["momentum"] = settings.outer_momentum

    def _outer_step(self, fragment: _Fragment) -> None:
        """Outer optimizer on this fragment only: the others' grads are hidden from it."""
        if self.asynchronous:
            self._delayed_nesterov(fragment)
            return
        saved = [p.grad for p in self.params]
        mine = {id(p) for p in fragment.params}
        for p in self.params:
            if id(p) not in mine:
                p.grad = None
        for p, pseudo in zip(fragment.params, fragment.pseudo, strict=True):
            p.grad = pseudo
        self.outer_optimizer.step()
        copy_all(fragment.backup, fragment.params)
        for p, g in zip(self.params, saved, strict=True):
            p.grad = g
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _delayed_nesterov(self, fragment: _Fragment) -> None:
        """Asynchronous mode's outer step (hetero.delayed_nesterov_) on this fragment.

        The momentum and the pending sum live in the outer optimizer's state,
        so heals and checkpoints carry them like any optimizer state.
        """
        counts = self._delayed[fragment.index]
        counts += torch.tensor([self._contributors, 1])
        due = momentum_due(int(counts[0]), self.momentum_every)
        groups = {id(p): g for g in self.outer_optimizer.param_groups for p in g["params"]}
        for p, pseudo in zip(fragment.params, fragment.pseudo, strict=True):
            state = self.outer_optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
            if "delayed_sum" not in state:
                state["delayed_sum"] = torch.zeros_like(p)
            group = groups[id(p)]
            delayed_nesterov_(
                p,
                pseudo,
                state["momentum_buffer"],
                state["delayed_sum"],
                steps=int(counts[1]),
                due=due,
                lr=float(group["lr"]),
                beta=float(group["momentum"]),
            )
        if due:
            counts.zero_()
        copy_all(fragment.backup, fragment.params)


class _InnerRate:
    """This group's inner steps per second of its own work, the syncs left out.

    The hook marks when the training loop got control back and when its next
    inner step ended; the time between is the loop's own (forward, backward,
    data, any pacing), the time inside the hook is the outer step's.

    Steps and seconds decay by half at every take, so a rate is mostly the
    last period's but not only: one period measured on a busy machine would
    otherwise swing H_w by a third from one step to the next, and every
    group whose plan comes out too long makes the fast ones wait for it.
    """

    DECAY = 0.5

    def __init__(self) -> None:
        self._resumed: float | None = None
        self._steps = 0.0
        self._seconds = 0.0
        self._fresh = False  # a step measured since the last take

    def resumed(self) -> None:
        self._resumed = time.perf_counter()

    def stopped(self) -> None:
        if self._resumed is not None:
            self._steps += 1
            self._seconds += time.perf_counter() - self._resumed
            self._resumed = None
            self._fresh = True

    def take(self) -> float | None:
        """Steps per second, the last period weighing most (None: nothing new measured)."""
        if not self._fresh or not self._seconds > 0:
            return None
        rate = self._steps / self._seconds
        self._steps *= self.DECAY
        self._seconds *= self.DECAY
        self._fresh = False
        return rate


def _paced_manager(manager: OuterManager, dylu: bool, mode: str) -> PacedManager | None:
    """The manager as a PacedManager where DyLU or async mode need one; bad settings raise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not dylu and mode == "sync":
        return None
    if not isinstance(manager, PacedManager):
        raise ValueError(
            f"dylu and mode='async' need a manager that tells its peers its rate"
            f" (set_join_info, set_join_grace, a weighted allreduce); {type(manager).__name__}"
            " has none"
        )
    return manager
