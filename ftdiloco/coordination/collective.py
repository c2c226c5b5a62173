"""The cross-group collective of one quorum: its process group and the allreduce.

A process group lives as long as its quorum: a new quorum id means new
members or a restarted one, so the group is rebuilt (never reused across a
restart).  When a step fails the group is abandoned at once -- aborted on a
side thread that nobody waits for, because aborting gloo joins threads that
may sit in a receive from a frozen peer -- and destroyed later on the
training thread, since destroying it on the abort's thread crashed gloo at
exit.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import torch

from ftdiloco.config import Config
from ftdiloco.coordination import process_group
from ftdiloco.coordination.allreduce import Bucketer, Work, serially, start_thread
from ftdiloco.coordination.outcome import StepOutcome
from ftdiloco.coordination.plan import QuorumPlan
from ftdiloco.training.compression import Codec, compressed_allreduce


class Collective:
    """Connects the quorum's process group and runs the allreduce over it."""

    def __init__(self, config: Config, backend: str, outcome: StepOutcome) -> None:
        self._config = config
        self._backend = backend
        self._outcome = outcome
        self._bucketer = Bucketer()
        self._pg: process_group.CrossGroup | None = None
        self._pg_quorum_id: int | None = None
        # Process groups aborted in the background (see abandon), kept so that
        # they are destroyed on this thread, not on the abort's.
        self._aborts: list[tuple[process_group.CrossGroup, concurrent.futures.Future[None]]] = []

    def connect(self, plan: QuorumPlan) -> None:
        """Have the process group of ``plan``'s quorum (kept when the quorum id is the same)."""
        if self._pg is not None and self._pg_quorum_id == plan.quorum_id:
            return
        self.abandon()
        if plan.replica_world_size == 1:
            return
        cfg = self._config
        self._pg = self._outcome.wait(
            start_thread(
                lambda: process_group.connect(
                    backend=self._backend,
                    store_address=plan.store_address,
                    prefix=plan.store_prefix,
                    rank=plan.replica_rank,
                    world_size=plan.replica_world_size,
                    timeout=cfg.collective_timeout,
                    host=cfg.host,
                    token=cfg.token,
                ),
                "connect",
            ),
            cfg.collective_timeout,
            "connect",
        )
        self._pg_quorum_id = plan.quorum_id

    def abandon(self) -> None:
        """Abort the process group without waiting for its peers (see the module's docstring)."""
        pg, self._pg, self._pg_quorum_id = self._pg, None, None
        if pg is not None:
            # Finished aborts are dropped here, so their groups die on this thread.
            self._aborts = [(g, f) for g, f in self._aborts if not f.done()]
            self._aborts.append((pg, start_thread(lambda: process_group.abort(pg), "abort")))

    def close(self) -> None:
        """Abandon the group and let the aborts finish (bounded by the collective deadline).

        A process that exits while a backend's threads are being torn down
        dies in C++ ("terminate called"); a peer frozen for good cannot hold
        the exit for longer than the deadline.
        """
        self.abandon()
        concurrent.futures.wait(
            [f for _, f in self._aborts], timeout=self._config.collective_timeout
        )
        self._aborts.clear()

    def allreduce(
        self,
        plan: QuorumPlan,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float | None,
        codec: Codec | None,
        residuals: Sequence[torch.Tensor | None] | None,
    ) -> Work:
        """Average (with ``weight``: sum weighted) ``tensors`` in place; see Manager.allreduce."""
        if weight is None and plan.heal:
            for t in tensors:
                t.zero_()
        elif weight is not None and weight != 1.0:
            for t in tensors:
                serially(lambda out, src: torch.mul(src, weight, out=out), t, t)
        if plan.replica_world_size == 1:
            return Work.done(not self._outcome.failed)  # the average of one is the input
        pg = self._pg
        if pg is None:
            return self._failed(RuntimeError("no process group for this quorum"))
        # Weighted: the caller's weights sum to 1, so the plain sum is the average.
        divisor = (
            1 if weight is not None else max(1, plan.replica_world_size - len(plan.recovering))
        )
        if codec is not None:
            return self._coded(pg, plan, tensors, codec, residuals, divisor, weight)
        pending = []
        try:
            # pack copies the next bucket only after this one is on its way.
            for bucket, parts in self._bucketer.pack(tensors):
                pending.append((pg.allreduce([bucket]), parts))
        except Exception as e:
            return self._failed(e)

        def finish() -> None:
            # Average each bucket as it arrives, while later ones are in flight.
            for work, parts in pending:
                work.wait()
                for t, summed in parts:
                    serially(lambda out, src: torch.div(src, divisor, out=out), t, summed)

        return self._work(start_thread(finish, "allreduce"))

    def _coded(
        self,
        pg: process_group.CrossGroup,
        plan: QuorumPlan,
        tensors: Sequence[torch.Tensor],
        codec: Codec,
        residuals: Sequence[torch.Tensor | None] | None,
        divisor: int,
        weight: float | None,
    ) -> Work:
        try:
            pending = [
                compressed_allreduce(
                    pg,
                    t,
                    codec,
                    world_size=plan.replica_world_size,
                    contributors=divisor,
                    residual=r,
                    contribute=weight is not None or not plan.heal,
                )
                for t, r in zip(tensors, residuals or [None] * len(tensors), strict=True)
            ]
        except Exception as e:
            return self._failed(e)

        def finish() -> None:
            for exchange in pending:
                exchange.wait()

        work = self._work(start_thread(finish, "allreduce"))
        work.nbytes = sum(exchange.nbytes for exchange in pending)
        return work

    def _failed(self, error: BaseException) -> Work:
        self._outcome.fail(error)
        self.abandon()
        return Work.done(False)

    def _work(self, future: concurrent.futures.Future[None]) -> Work:
        def finish() -> bool:
            try:
                self._outcome.wait(future, self._config.collective_timeout, "allreduce")
            except Exception as e:
                work.abandoned = not future.done()
                self._failed(e)
                return False
            return not self._outcome.failed

        work = Work(finish)
        return work
