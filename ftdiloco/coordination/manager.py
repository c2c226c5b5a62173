"""One Manager per training process: a quorum per outer step, and the commit vote.

The training thread calls, once per outer step::

    manager.start_quorum()          # join, rebuild the cross-group group, heal if behind
    work = manager.allreduce(grads) # average over the live groups (errors recorded)
    work.wait()
    if manager.should_commit():     # the group's vote; True -> step += 1
        ...apply the outer step...

Nothing here raises for a failure of the distributed kind (a peer died, a
deadline passed, the lighthouse is away): the step is marked failed, the vote
says no, and the next ``start_quorum`` starts clean.  Blocking work (connecting
a process group, waiting on a collective) runs on a side thread so the
training thread can give up on it at its deadline, or at once when the
lighthouse reports that a member of the quorum died.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
import torch
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from torch._C._distributed_c10d import TCPStore

from ftdiloco.config import Config
from ftdiloco.coordination import process_group
from ftdiloco.coordination.allreduce import Bucketer, Work, serially, start_thread
from ftdiloco.coordination.group import GroupGather, contribute_remote
from ftdiloco.coordination.lost_members import LostMembers
from ftdiloco.coordination.metrics import GroupMetrics
from ftdiloco.coordination.plan import DIRTY, QuorumPlan, plan_quorum
from ftdiloco.state.group_checkpoints import GroupCheckpoints
from ftdiloco.state.heal import HealError, StateServer, fetch_state
from ftdiloco.state.registry import StateLoad, StateRegistry, StateSave
from ftdiloco.training.compression import Codec, compressed_allreduce
from ftwire import guard, protocol
from ftwire.background import BackgroundLoop
from ftwire.history import GENESIS, new_incarnation, next_history
from ftwire.messages import Member, Quorum
from lighthouse.client import AsyncLighthouseClient, LivenessLink

log = structlog.get_logger(__name__)

T = TypeVar("T")


class MemberLost(RuntimeError):
    """The lighthouse reported that a member of the current quorum died."""


class Manager:
    def __init__(self, config: Config | None = None, *, backend: str | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        cfg = self.config
        if cfg.standalone:
            raise ValueError(
                "FTDILOCO_LIGHTHOUSE=none asks for standalone training: use"
                " ftdiloco.coordination.standalone.StandaloneManager (as the example does),"
                " not a Manager"
            )
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group_rank = cfg.rank
        self.group_size = cfg.world_size
        self._log = log.bind(replica=cfg.replica_id, group_rank=cfg.rank)
        # One per process start: the lighthouse tells a restart from a
        # retry by it, and never reuses a process group across one.
        self.incarnation = new_incarnation()
        # The committed step and the history that led to it, replaced as one
        # pair (the liveness thread reads it).
        self._committed: tuple[int, str] = (0, GENESIS)
        self._commit_failures = 0
        self._rounds = 0
        self._plan: QuorumPlan | None = None
        self._pg: process_group.CrossGroup | None = None
        self._pg_quorum_id: int | None = None
        self._lost_members = LostMembers(cfg.token, self._log)
        # Process groups aborted in the background (see _drop_process_group),
        # kept so that they are destroyed on this thread, not on the abort's.
        self._aborts: list[tuple[process_group.CrossGroup, concurrent.futures.Future[None]]] = []
        self._error: BaseException | None = None
        self._abort: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._states = StateRegistry()
        self.checkpoints = GroupCheckpoints(
            cfg, self.group_rank, self.group_size, self._states, self._round, self._log
        )
        self._bucketer = Bucketer()
        self._dirty = False
        self._state_server = StateServer(self.config.token)
        self.metrics = GroupMetrics()
        self._last_loss: float | None = None
        self._sync_started = time.perf_counter()

        self._loop = BackgroundLoop(f"ftdiloco-{cfg.replica_id}-{cfg.rank}")
        self._headers = {protocol.TOKEN_HEADER: f"Bearer {cfg.token}"} if cfg.token else {}
        self._lighthouse: AsyncLighthouseClient | None = None
        self._liveness: LivenessLink | None = None
        self._store: process_group.RendezvousStore | None = None
        self._runner: web.AppRunner | None = None
        self.address = self._loop.run(self._serve(), timeout=30)
        if self.group_rank == 0:
            self._store = process_group.host_store(cfg.host, 0, cfg.collective_timeout, cfg.token)
            # The client retries until FTDILOCO_TIMEOUT itself, saying so every few seconds.
            self._loop.run(self._connect_lighthouse(), timeout=cfg.quorum_timeout + 5)
        self._leader_url = self._find_leader()
        self._log.info("manager ready", address=self.address, leader=self._leader_url)

    # -- public API ------------------------------------------------------------

    @property
    def step(self) -> int:
        """Outer steps committed so far (after a heal: the donors' step)."""
        return self._committed[0]

    @property
    def history(self) -> str:
        """Identity of the committed history behind :attr:`step` (ftwire.history)."""
        return self._committed[1]

    @property
    def plan(self) -> QuorumPlan | None:
        return self._plan

    @property
    def error(self) -> BaseException | None:
        """Why the current outer step failed, if it did."""
        return self._error

    def num_participants(self) -> int:
        return self._plan.replica_world_size if self._plan is not None else 0

    def register_state(self, name: str, save: StateSave, load: StateLoad) -> None:
        """Replicated state that heals and checkpoints carry (weights, optimizer state).

        ``save`` returns tensors that stay unchanged from ``start_quorum`` until
        the commit, so they can be served to a recovering peer meanwhile.
        """
        self._states.register(name, save, load)

    def report_loss(self, loss: float, *, eval_loss: float | None = None) -> None:
        """The script's latest training (and held-out) loss, for ``/metrics``."""
        self.metrics.loss.set(loss)
        self._last_loss = loss if math.isfinite(loss) else None
        if eval_loss is not None:
            self.metrics.eval_loss.set(eval_loss)

    def report_sync(self, report: Any) -> None:
        """DiLoCo and LocalSGD hand over each SyncReport, for ``/metrics``."""
        self.metrics.hidden.set(report.hidden_fraction)
        if report.participants > 1 and not report.healed:  # alone, or healing: nothing sent
            self.metrics.sent.inc(report.bytes_sent)

    def report_error(self, error: BaseException) -> None:
        """Fail the current outer step (the vote will say no)."""
        if self._error is None:
            self._error = error
            self._log.warning("outer step failed", step=self.step, error=repr(error))

    def start_quorum(self) -> QuorumPlan | None:
        """Join this outer step's quorum; on return the group may allreduce."""
        self._error = None
        self._plan = None
        self._abort = concurrent.futures.Future()
        started = self._sync_started = time.perf_counter()
        if not self._dirty and self._states:
            # Until the commit nothing changes this state: a peer may copy it.
            self._state_server.publish(self.step, self._states.tensors())
        try:
            quorum = self._round("quorum", self._quorum_contribution())["quorum"]
            info = protocol.decode_quorum(quorum)
            plan = plan_quorum(
                info, self.config.replica_id, self.group_rank, init_sync=self.config.init_sync
            )
            self._plan = plan
            self.metrics.participants.set(plan.replica_world_size)
            if self.group_rank > 0 and plan.replica_world_size > 1:
                self._lost_members.watch(
                    self._loop,
                    (self._session, self._leader_url),
                    plan.quorum_id,
                    self._abort,
                    self.config.collective_timeout,
                )
            self._reconfigure(plan)
        except Exception as e:
            self.report_error(e)
            self._drop_process_group()
            return None
        if plan.heal:
            try:
                self._heal(plan)
            except Exception as e:
                # Keep the process group: this group still takes part in the
                # allreduce (contributing nothing) so its peers are not stalled.
                self.report_error(e)
        self._log.info(
            "quorum",
            quorum_id=plan.quorum_id,
            participants=plan.replica_world_size,
            replica_rank=plan.replica_rank,
            step=self.step,
            max_step=plan.max_step,
            healed=plan.heal,
            seconds=round(time.perf_counter() - started, 4),
        )
        return plan

    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work:
        """Average ``tensors`` in place over the groups that contribute this step.

        With a ``codec`` each tensor (flat and contiguous) travels compressed and
        is summed in fp32 on arrival; ``residuals`` (one per tensor, or None)
        keep what quantization dropped, for the next sync (error feedback).

        Groups that healed in this quorum contribute zeros and are not counted,
        so a freshly healed group does not dilute the others' progress.  Large
        tensors are summed where they lie, so after a failure their values are
        partial sums: roll back, as DiLoCo does.
        """
        plan, pg = self._plan, self._pg
        if plan is None or (self._error is not None and not plan.heal):
            # Abort rather than stay away: peers waiting in this collective fail
            # at once instead of at their deadline, and everyone rolls back.
            self._drop_process_group()
            return Work.done(False)
        if plan.heal:
            for t in tensors:
                t.zero_()
        if plan.replica_world_size == 1:
            return Work.done(self._error is None)  # the average of one is the input
        if pg is None:
            self.report_error(RuntimeError("no process group for this quorum"))
            return Work.done(False)
        contributors = max(1, plan.replica_world_size - len(plan.recovering))
        if codec is not None:
            return self._allreduce_coded(
                pg, tensors, codec, residuals or [None] * len(tensors), plan, contributors
            )
        pending = []
        try:
            # _pack copies the next bucket only after this one is on its way.
            for bucket, parts in self._bucketer.pack(tensors):
                pending.append((pg.allreduce([bucket]), parts))
        except Exception as e:
            self.report_error(e)
            self._drop_process_group()
            return Work.done(False)

        def finish() -> None:
            # Average each bucket as it arrives, while later ones are in flight.
            for work, parts in pending:
                work.wait()
                for t, summed in parts:
                    serially(lambda out, src: torch.div(src, contributors, out=out), t, summed)

        return self._work(start_thread(finish, "allreduce"))

    def _allreduce_coded(
        self,
        pg: process_group.CrossGroup,
        tensors: Sequence[torch.Tensor],
        codec: Codec,
        residuals: Sequence[torch.Tensor | None],
        plan: QuorumPlan,
        contributors: int,
    ) -> Work:
        try:
            pending = [
                compressed_allreduce(
                    pg,
                    t,
                    codec,
                    world_size=plan.replica_world_size,
                    contributors=contributors,
                    residual=r,
                    contribute=not plan.heal,
                )
                for t, r in zip(tensors, residuals, strict=True)
            ]
        except Exception as e:
            self.report_error(e)
            self._drop_process_group()
            return Work.done(False)

        def finish() -> None:
            for exchange in pending:
                exchange.wait()

        work = self._work(start_thread(finish, "allreduce"))
        work.nbytes = sum(exchange.nbytes for exchange in pending)
        return work

    def should_commit(self) -> bool:
        """The group's vote: commit only if every rank succeeded and enough groups took part.

        Then rank 0 asks the lighthouse's commit fence: a quorum that lost a
        member before any group committed it commits nowhere, so a group
        that was frozen or evicted never commits that step alone.
        """
        ok = self._error is None
        try:
            answer = self._round("vote", {"ok": ok})
            commit = bool(answer["commit"])
            if not commit and answer.get("refused"):
                self.report_error(RuntimeError(f"commit fence: {answer['refused']}"))
        except Exception as e:
            self.report_error(e)
            commit = False
        plan = self._plan
        if commit and plan is not None:
            # The caller is about to change the published state.
            self._state_server.retract()
            step = plan.max_step + 1
            self._committed = (step, next_history(plan.history, plan.quorum_id, step))
            self._commit_failures = 0
        else:
            commit = False
            self._commit_failures += 1
            self._drop_process_group()
        (self.metrics.committed if commit else self.metrics.rolled_back).inc()
        self.metrics.step.set(self.step)
        self.metrics.sync_seconds.observe(time.perf_counter() - self._sync_started)
        self._log.info(
            "outer step committed" if commit else "outer step rolled back",
            step=self.step,
            commit_failures=self._commit_failures,
            error=repr(self._error) if self._error is not None else None,
        )
        return commit

    def close(self) -> None:
        """Leave: the lighthouse drops this group at once instead of at a timeout."""
        self._drop_process_group()
        # Let the aborts finish: a process that exits while a backend's threads
        # are being torn down dies in C++ ("terminate called").  A peer frozen
        # for good cannot hold the exit for longer than the deadline.
        concurrent.futures.wait(
            [f for _, f in self._aborts], timeout=self.config.collective_timeout
        )
        self._aborts.clear()
        try:
            self._loop.run(self._shutdown(), timeout=10)
        finally:
            self._loop.close()
            if self._store is not None:
                self._store.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the group round (rank 0 answers for every rank) ----------------------------

    def _quorum_contribution(self) -> dict[str, Any]:
        step, history = self._committed
        return {
            "step": step,
            "history": history,
            "commit_failures": self._commit_failures,
            "heal": self.address,
            "dirty": self._dirty,
        }

    def _round(self, kind: str, value: dict[str, Any]) -> dict[str, Any]:
        self._rounds += 1
        timeout = self.config.quorum_timeout if kind == "quorum" else self.config.collective_timeout
        round_no = self._rounds
        if self.group_rank == 0:
            coro = self._gather.contribute(kind, round_no, 0, value, timeout)
        else:
            coro = contribute_remote(
                self._session,
                self._leader_url,
                kind,
                round_no,
                self.group_rank,
                value,
                timeout,
                self._headers,
            )
        return self._loop.run(coro, timeout=timeout + 10)

    async def _decide_quorum(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        assert self._lighthouse is not None and self._store is not None
        lead = values[0]
        member = Member(
            replica_id=self.config.replica_id,
            address=self.address,
            store_address=f"{self.config.host}:{self._store.port}",
            step=lead["step"],
            world_size=self.group_size,
            commit_failures=lead["commit_failures"],
            data={
                "heal": [values[r]["heal"] for r in range(self.group_size)],
                DIRTY: any(v["dirty"] for v in values.values()),
                # For the dashboard's loss chart: the script's last reported loss.
                **({"loss": self._last_loss} if self._last_loss is not None else {}),
            },
            incarnation=self.incarnation,
            history=lead["history"],
            expected_groups=self.config.num_replica_groups or 0,
        )
        info = await self._lighthouse.join(member, timeout=self.config.quorum_timeout)
        quorum = Quorum(info.quorum_id, info.members, info.created)
        return {"quorum": protocol.encode_quorum(quorum, info.created, info.settings)}

    async def _decide_vote(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        plan = self._plan
        enough = plan is not None and plan.replica_world_size >= self.config.min_replicas
        if plan is None or not enough or not all(v["ok"] for v in values.values()):
            return {"commit": False}
        assert self._lighthouse is not None
        fence = await self._lighthouse.fence(self.config.replica_id, plan.quorum_id, plan.max_step)
        if not fence.commit:
            self._log.warning("commit refused by the fence", reason=fence.reason)
            return {"commit": False, "refused": fence.reason}
        return {"commit": True}

    # -- servers and connections (on the background loop) -------------------------

    async def _serve(self) -> str:
        app = web.Application(client_max_size=protocol.MAX_MESSAGE_BYTES)
        self._gather = GroupGather(
            self.group_size,
            {
                "quorum": self._decide_quorum,
                "vote": self._decide_vote,
                "checkpoint": self.checkpoints.decide_checkpoint,
                "resume": self.checkpoints.decide_resume,
            },
        )
        self._state_server.add_routes(app)
        app.router.add_get("/metrics", self._metrics_route)
        if self.group_rank == 0:
            self._gather.add_routes(app, self._token_ok)
            app.router.add_post("/v1/checkpoint", self._checkpoint_route)
            app.router.add_post("/v1/group/lost", self._lost_members.route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = self.config.manager_port if self.group_rank == 0 else 0
        site = web.TCPSite(runner, self.config.host, port)
        await site.start()
        self._runner = runner
        self._session = aiohttp.ClientSession()
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[attr-defined]
        bound = sockets[0].getsockname()[1]
        return f"http://{self.config.host}:{bound}"

    async def _metrics_route(self, request: web.Request) -> web.Response:
        """``GET /metrics``: this process's Prometheus metrics (read-only, as on the lighthouse)."""
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _token_ok(self, request: web.Request) -> bool:
        return guard.request_token_ok(request, self.config.token)

    async def _connect_lighthouse(self) -> None:
        cfg = self.config
        self._lighthouse = AsyncLighthouseClient(
            list(cfg.lighthouse), cfg.token, retry_deadline=cfg.quorum_timeout
        )
        self._liveness = self._lighthouse.liveness(
            cfg.replica_id,
            self._on_lighthouse_event,
            interval=cfg.heartbeat_interval,
            state=self._liveness_state,
        )
        await self._liveness.start()

    def _liveness_state(self) -> protocol.Liveness:
        """What every heartbeat tells the lighthouse: who we are, what we hold committed."""
        return protocol.Liveness(self.incarnation, None if self._dirty else self._committed)

    def _on_lighthouse_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == protocol.EVENT_MEMBER_LOST:
            lost = protocol.decode_member_lost(event)
            self._lost_members.record(lost.quorum_id, lost.replica_id)
            plan = self._plan
            if plan is not None and lost.replica_id in plan.participants:
                self._log.warning("quorum member lost", member=lost.replica_id, cause=lost.cause)
                if not self._abort.done():
                    self._abort.set_result(lost.replica_id)
        elif kind == "kill":
            self._log.error("killed by the lighthouse operator", reason=event.get("reason"))
            os._exit(70)

    async def _shutdown(self) -> None:
        # Long-polls from the other ranks would hold the server's cleanup.
        self._lost_members.release_all()
        if self._liveness is not None:
            await self._liveness.stop()
        if self._lighthouse is not None:
            await self._lighthouse.close()
        await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _find_leader(self) -> str:
        """Group rank 0's manager address, shared through torchrun's store."""
        if self.group_size == 1:
            return self.address
        cfg = self.config
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = f"ftdiloco/leader/{attempt}"
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = TCPStore(
            cfg.master_addr,
            cfg.master_port,
            is_master=self.group_rank == 0 and not agent_store,
            wait_for_workers=False,
            timeout=timedelta(seconds=cfg.quorum_timeout),
        )
        if self.group_rank == 0:
            store.set(key, self.address)
            self._leader_store = store
            return self.address
        return store.get(key).decode()

    # -- the cross-group process group ------------------------------------------------

    def _reconfigure(self, plan: QuorumPlan) -> None:
        if self._pg is not None and self._pg_quorum_id == plan.quorum_id:
            return
        self._drop_process_group()
        if plan.replica_world_size == 1:
            return
        cfg = self.config
        self._pg = self._await(
            start_thread(
                lambda: process_group.connect(
                    backend=self.backend,
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

    def _drop_process_group(self) -> None:
        """Abandon the cross-group process group without waiting for its peers.

        Aborting a gloo group joins its threads, which may sit in a receive
        from a frozen peer until that peer thaws; the survivors must roll back
        now, so the abort runs on its own daemon thread and nobody waits.
        """
        pg, self._pg, self._pg_quorum_id = self._pg, None, None
        if pg is not None:
            # Finished aborts are dropped here, so their groups die on this thread.
            self._aborts = [(g, f) for g, f in self._aborts if not f.done()]
            self._aborts.append((pg, start_thread(lambda: process_group.abort(pg), "abort")))

    def _heal(self, plan: QuorumPlan) -> None:
        """Copy the committed state of ``plan.donor`` (this group rank's peer) into ours.

        Received bytes land in our own tensors, so a heal needs no second copy
        of the state; until one succeeds the group is *dirty*: it serves
        nothing, never counts as a donor, and heals again at the next quorum.
        """
        donor = plan.donor
        assert donor is not None
        addresses = donor.data.get("heal")
        if not isinstance(addresses, list) or len(addresses) <= self.group_rank:
            raise HealError(f"donor {donor.replica_id} sent no heal address", "protocol")
        self._state_server.retract()
        self._dirty = True
        local = self._states.tensors()

        def destination(
            layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        ) -> dict[str, torch.Tensor]:
            out = {}
            for name, dtype, shape in layout:
                mine = local.get(name)
                fits = mine is not None and (mine.dtype, tuple(mine.shape)) == (dtype, shape)
                if mine is None or not fits or not mine.is_contiguous():
                    mine = torch.empty(shape, dtype=dtype)  # e.g. optimizer state not made yet
                out[name] = mine
            return out

        timeout = self.config.heal_timeout
        started = time.perf_counter()
        received = self._loop.run(
            fetch_state(
                addresses[self.group_rank],
                plan.max_step,
                destination,
                token=self.config.token,
                timeout=timeout,
                session=self._session,
            ),
            timeout=timeout + 5,
        )
        self._states.load(received)
        self._committed = (plan.max_step, plan.history)
        self._dirty = False
        seconds = time.perf_counter() - started
        self.metrics.heals.inc()
        self.metrics.heal_seconds.inc(seconds)
        self.metrics.heal_bytes.inc(sum(t.numel() * t.element_size() for t in received.values()))
        self._log.info(
            "healed",
            donor=donor.replica_id,
            step=self.step,
            tensors=len(received),
            seconds=round(seconds, 3),
        )

    def _await(self, future: concurrent.futures.Future[T], timeout: float, what: str) -> T:
        """Wait for side-thread work, giving up at the deadline or when a member dies."""
        watched: list[concurrent.futures.Future[Any]] = [future, self._abort]
        done, _ = concurrent.futures.wait(
            watched, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if future in done:
            return future.result()
        if self._abort in done:
            raise MemberLost(f"{what} abandoned: quorum member {self._abort.result()} died")
        raise TimeoutError(f"{what} missed its {timeout:g}s deadline")

    def _finish(self, future: concurrent.futures.Future[None], work: Work) -> bool:
        try:
            self._await(future, self.config.collective_timeout, "allreduce")
        except Exception as e:
            work.abandoned = not future.done()
            self.report_error(e)
            self._drop_process_group()
            return False
        return self._error is None

    def _work(self, future: concurrent.futures.Future[None]) -> Work:
        work = Work(lambda: self._finish(future, work))
        return work

    # -- durable checkpoints (ftdiloco.state.group_checkpoints) ----------------------------

    @property
    def checkpoint_metadata(self) -> Callable[[], dict[str, Any]] | None:
        """A function returning JSON-able run metadata (a data loader's position, say),
        stored with every checkpoint this manager saves."""
        return self.checkpoints.metadata

    @checkpoint_metadata.setter
    def checkpoint_metadata(self, metadata: Callable[[], dict[str, Any]] | None) -> None:
        self.checkpoints.metadata = metadata

    @property
    def resumed_metadata(self) -> dict[str, Any] | None:
        """After :meth:`resume` returned True: that metadata, as saved."""
        return self.checkpoints.resumed_metadata

    def checkpoint_directory(self, root: str | os.PathLike[str] | None = None) -> Path | None:
        """This process's checkpoints: ``<root>/<replica id>/rank-<group rank>``.

        ``root`` defaults to ``FTDILOCO_CHECKPOINT_DIR``; None if neither is set.
        """
        return self.checkpoints.directory(root)

    def save_checkpoint(
        self,
        root: str | os.PathLike[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Save this rank's registered state at the current step; returns the checkpoint's path.

        Call between outer steps only: from ``start_quorum`` until the outer
        optimizer has stepped the state is in flux.  A group whose last heal
        failed holds torn state and refuses.  ``metadata`` (JSON) is stored
        with the output of :attr:`checkpoint_metadata`.
        """
        return self.checkpoints.save(self._committed, self._dirty, root, metadata)

    def resume(self, root: str | os.PathLike[str] | None = None) -> bool:
        """Load the newest checkpoint that every rank of the group holds intact.

        Call on every rank, after the state is registered and before the
        first outer step.  The ranks agree (a group round) on the step, so a
        group never resumes at mixed steps; damaged checkpoints are skipped
        with a warning.  The states' load callbacks receive the tensors, and
        :attr:`step` and :attr:`history` become the saved ones; groups that
        are further ahead still heal this one at the next quorum.  Returns
        False if there is nothing to resume from.

        Raises :class:`~ftdiloco.state.checkpoint.CheckpointError` if the checkpoint
        does not fit the registered state (another model or optimizer):
        silently starting over would lose the run.  If the checkpoint holds
        tensors no state takes, that is found only after loading, so the
        state may be partly overwritten when it raises.
        """
        resumed = self.checkpoints.resume(root)
        if resumed is None:
            return False
        self._committed = resumed
        return True

    def maybe_checkpoint(self) -> Path | None:
        """Save if a checkpoint is due; DiLoCo and LocalSGD call this after every outer step.

        Due means: ``FTDILOCO_CHECKPOINT_EVERY`` steps have been committed
        since step 0, ``POST /v1/checkpoint`` asked for one, or a SIGTERM
        arrived (see :meth:`install_sigterm_handler`).  A request reaches one
        rank only, so the ranks first agree in a group round, and all of them
        save the same step.  After a SIGTERM it saves and then raises
        ``SystemExit`` (0, or 1 if the save failed), which leaves through the
        caller's ``with`` blocks so the lighthouse sees the group go at once.
        A failed periodic save is logged, not raised: the peers still hold
        the run, and stopping the training would not bring the disk back.
        """
        return self.checkpoints.maybe_save(self._committed, self._dirty)

    def install_sigterm_handler(self) -> None:
        """On SIGTERM: save a checkpoint at the end of the current outer step, then exit.

        Schedulers send SIGTERM some time before they kill a pre-empted job;
        this keeps the progress since the last periodic checkpoint.  The
        handler only sets a flag -- the training thread saves, at the next
        step boundary (:meth:`maybe_checkpoint`) -- so the grace period must
        cover the rest of an outer step plus a save.  A second SIGTERM, or
        one after :meth:`close`, goes to the handler that was there before
        (by default: the process ends at once).  Call from the main thread,
        with a checkpoint directory configured.
        """
        self.checkpoints.install_sigterm_handler(self._loop.loop.is_closed)

    async def _checkpoint_route(self, request: web.Request) -> web.Response:
        """``POST /v1/checkpoint``: save at the next step boundary (202, with the current step).

        Only flags the request: the training thread saves, since the state
        must not be read while training changes it.
        """
        guard.authorize(request, self.config.token)
        if self.checkpoints.directory() is None:
            raise guard.Refused(409, "no_checkpoint_dir", "FTDILOCO_CHECKPOINT_DIR is not set")
        self.checkpoints.requests += 1
        self._log.info("checkpoint requested", peer=request.remote, step=self.step)
        body = protocol.pack({"ok": True, "step": self.step})
        return web.Response(status=202, body=body, content_type=protocol.CONTENT_TYPE)
