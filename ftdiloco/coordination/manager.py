"""One Manager per training process: a quorum per outer step, and the commit vote.

The training thread calls, once per outer step::

    manager.start_quorum()          # join, rebuild the cross-group group, heal if behind
    work = manager.allreduce(grads) # average over the live groups (errors recorded)
    work.wait()
    if manager.should_commit():     # the group's vote; True -> step += 1
        ...apply the outer step...

Nothing here raises for a failure of the distributed kind (a peer died, a
deadline passed, the lighthouse is away): the step is marked failed, the vote
says no, and the next ``start_quorum`` starts clean.  The Manager coordinates;
each job is a collaborator's:

- :class:`~ftdiloco.coordination.group.GroupChannel`: the group rounds that
  keep the ranks of one group in step (quorum, vote, checkpoint, resume);
- :class:`~ftdiloco.coordination.leader.GroupLeader` (rank 0): the lighthouse
  link, the join on behalf of the group and the commit fence;
- :class:`~ftdiloco.coordination.collective.Collective`: the quorum's process
  group and the allreduce;
- :class:`~ftdiloco.state.healer.Healer`: serving and copying committed state;
- :class:`~ftdiloco.state.group_checkpoints.GroupCheckpoints`: durable checkpoints;
- :class:`~ftdiloco.coordination.outcome.StepOutcome`: the step's first error,
  and the abort signal when a quorum member dies.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import torch
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from torch._C._distributed_c10d import TCPStore

from ftdiloco.config import Config
from ftdiloco.coordination import process_group
from ftdiloco.coordination.allreduce import Work
from ftdiloco.coordination.collective import Collective
from ftdiloco.coordination.group import GroupChannel, GroupGather, QuorumAsk
from ftdiloco.coordination.leader import GroupLeader
from ftdiloco.coordination.lost_members import LostMembers
from ftdiloco.coordination.metrics import GroupMetrics
from ftdiloco.coordination.outcome import MemberLost, StepOutcome
from ftdiloco.coordination.plan import QuorumPlan, plan_quorum
from ftdiloco.state.group_checkpoints import GroupCheckpoints
from ftdiloco.state.healer import Healer
from ftdiloco.state.registry import StateLoad, StateRegistry, StateSave
from ftdiloco.training.compression import Codec
from ftwire import guard, protocol
from ftwire.background import BackgroundLoop
from ftwire.history import GENESIS, new_incarnation, next_history

__all__ = ["Manager", "MemberLost"]

log = structlog.get_logger(__name__)


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
        self._plan: QuorumPlan | None = None
        self._sync_started = time.perf_counter()
        self.metrics = GroupMetrics()
        self._outcome = StepOutcome(self._log)
        self._collective = Collective(cfg, self.backend, self._outcome)
        self._states = StateRegistry()
        self._healer = Healer(cfg, self.group_rank, self._states, self.metrics, self._log)
        self._lost_members = LostMembers(cfg.token, self._log)
        self._loop = BackgroundLoop(f"ftdiloco-{cfg.replica_id}-{cfg.rank}")
        headers = {protocol.TOKEN_HEADER: f"Bearer {cfg.token}"} if cfg.token else {}
        self._channel = GroupChannel(
            self.group_rank, self._loop, headers, cfg.quorum_timeout, cfg.collective_timeout
        )
        self.checkpoints = GroupCheckpoints(
            cfg, self.group_rank, self.group_size, self._states, self._channel, self._log
        )
        self._leader: GroupLeader | None = None
        self._store: process_group.RendezvousStore | None = None
        self._runner: web.AppRunner | None = None
        gather = GroupGather(
            self.group_size,
            {
                "quorum": lambda values: self._lead().decide_quorum(values),
                "vote": lambda values: self._lead().decide_vote(values),
                "checkpoint": self.checkpoints.decide_checkpoint,
                "resume": self.checkpoints.decide_resume,
            },
        )
        self.address, self._session = self._loop.run(self._serve(gather), timeout=30)
        if self.group_rank == 0:
            self._store = process_group.host_store(cfg.host, 0, cfg.collective_timeout, cfg.token)
            self._leader = GroupLeader(
                cfg,
                self.incarnation,
                self.address,
                f"{cfg.host}:{self._store.port}",
                self._liveness_state,
                lambda: self._plan,
                self._on_member_lost,
                self._lost_members,
                self._log,
            )
            self._loop.run(self._leader.connect(), timeout=cfg.quorum_timeout + 5)
        self._leader_url = self._find_leader()
        self._channel.connect(
            gather if self.group_rank == 0 else None, self._session, self._leader_url
        )
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
        return self._outcome.error

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
        if self._leader is not None:
            self._leader.loss = loss if math.isfinite(loss) else None
        if eval_loss is not None:
            self.metrics.eval_loss.set(eval_loss)

    def report_sync(self, report: Any) -> None:
        """DiLoCo and LocalSGD hand over each SyncReport, for ``/metrics``."""
        self.metrics.hidden.set(report.hidden_fraction)
        if report.participants > 1 and not report.healed:  # alone, or healing: nothing sent
            self.metrics.sent.inc(report.bytes_sent)
        self.metrics.local_steps.set(report.local_steps)
        self.metrics.staleness.set(report.staleness)
        if report.rate > 0:  # 0: not measured (plain DiLoCo, LocalSGD)
            self.metrics.inner_rate.set(report.rate)

    def report_error(self, error: BaseException) -> None:
        """Fail the current outer step (the vote will say no)."""
        self._outcome.fail(error)

    def set_join_info(self, info: Mapping[str, int | float | str | bool]) -> None:
        """What this group tells its peers with its next joins (its inner-step rate, say).

        Every member reads all of it, identically, as ``plan.peer_info``.  Only
        group rank 0's counts: it joins for the group.
        """
        if self._leader is not None:
            self._leader.info = dict(info)

    def set_join_grace(self, seconds: float | None) -> None:
        """Ask the lighthouse to wait at most ``seconds`` for stragglers once this group
        joined (asynchronous DiLoCo); None: the lighthouse's join timeout."""
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"join grace must be a finite number of seconds >= 0, got {seconds}")
        if self._leader is not None:
            self._leader.grace = seconds

    def start_quorum(self) -> QuorumPlan | None:
        """Join this outer step's quorum; on return the group may allreduce."""
        self._outcome.reset(self.step)
        self._plan = None
        started = self._sync_started = time.perf_counter()
        # Until the commit nothing changes this state: a peer may copy it.
        self._healer.publish(self.step)
        try:
            step, history = self._committed
            quorum = self._channel.quorum(
                QuorumAsk(step, history, self._commit_failures, self.address, self._healer.dirty)
            )
            plan = plan_quorum(
                quorum, self.config.replica_id, self.group_rank, init_sync=self.config.init_sync
            )
            self._plan = plan
            self.metrics.participants.set(plan.replica_world_size)
            if self.group_rank > 0 and plan.replica_world_size > 1:
                self._lost_members.watch(
                    self._loop,
                    (self._session, self._leader_url),
                    plan.quorum_id,
                    self._outcome.abort,
                    self.config.collective_timeout,
                )
            self._collective.connect(plan)
        except Exception as e:
            self.report_error(e)
            self._collective.abandon()
            return None
        if plan.heal:
            try:
                self._healer.heal(plan, self._loop, self._session)
                self._committed = (plan.max_step, plan.history)
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
        weight: float | None = None,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work:
        """Average ``tensors`` in place over the groups that contribute this step.

        Groups that healed in this quorum contribute zeros and are not counted,
        so a freshly healed group does not dilute the others' progress.  With
        a ``weight``, every participant (a healed one too) contributes
        ``tensors * weight`` and the result is the plain sum: the caller makes
        the weights sum to 1 over the participants, computed identically on
        every group (e.g. from ``plan.peer_info``).

        With a ``codec`` each tensor (flat and contiguous) travels compressed and
        is summed in fp32 on arrival; ``residuals`` (one per tensor, or None)
        keep what quantization dropped, for the next sync (error feedback).

        Large tensors are summed where they lie, so after a failure their
        values are partial sums: roll back, as DiLoCo does.
        """
        plan = self._plan
        if plan is None or (self._outcome.failed and not plan.heal):
            # Abort rather than stay away: peers waiting in this collective fail
            # at once instead of at their deadline, and everyone rolls back.
            self._collective.abandon()
            return Work.done(False)
        return self._collective.allreduce(
            plan, tensors, weight=weight, codec=codec, residuals=residuals
        )

    def should_commit(self) -> bool:
        """The group's vote: commit only if every rank succeeded and enough groups took part.

        Then rank 0 asks the lighthouse's commit fence: a quorum that lost a
        member before any group committed it commits nowhere, so a group
        that was frozen or evicted never commits that step alone.
        """
        try:
            vote = self._channel.vote(not self._outcome.failed)
            if not vote.commit and vote.refused:
                self.report_error(RuntimeError(f"commit fence: {vote.refused}"))
            commit = vote.commit
        except Exception as e:
            self.report_error(e)
            commit = False
        plan = self._plan
        if commit and plan is not None:
            # The caller is about to change the published state.
            self._healer.retract()
            step = plan.max_step + 1
            self._committed = (step, next_history(plan.history, plan.quorum_id, step))
            self._commit_failures = 0
        else:
            commit = False
            self._commit_failures += 1
            self._collective.abandon()
        (self.metrics.committed if commit else self.metrics.rolled_back).inc()
        self.metrics.step.set(self.step)
        self.metrics.sync_seconds.observe(time.perf_counter() - self._sync_started)
        error = self._outcome.error
        self._log.info(
            "outer step committed" if commit else "outer step rolled back",
            step=self.step,
            commit_failures=self._commit_failures,
            error=repr(error) if error is not None else None,
        )
        return commit

    def close(self) -> None:
        """Leave: the lighthouse drops this group at once instead of at a timeout."""
        self._collective.close()
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

    # -- the lighthouse's side (rank 0) ---------------------------------------------

    def _lead(self) -> GroupLeader:
        if self._leader is None:
            raise RuntimeError("only group rank 0 decides group rounds")
        return self._leader

    def _liveness_state(self) -> protocol.Liveness:
        """What every heartbeat tells the lighthouse: who we are, what we hold committed."""
        return protocol.Liveness(self.incarnation, None if self._healer.dirty else self._committed)

    def _on_member_lost(self, replica_id: str, cause: str) -> None:
        plan = self._plan
        if plan is not None and replica_id in plan.participants:
            self._log.warning("quorum member lost", member=replica_id, cause=cause)
            self._outcome.member_lost(replica_id)

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

    # -- this process's server (on the background loop) -------------------------------

    async def _serve(self, gather: GroupGather) -> tuple[str, aiohttp.ClientSession]:
        app = web.Application(client_max_size=protocol.MAX_MESSAGE_BYTES)
        self._healer.server.add_routes(app)
        app.router.add_get("/metrics", self._metrics_route)
        if self.group_rank == 0:
            gather.add_routes(app, self._token_ok)
            app.router.add_post("/v1/checkpoint", self._checkpoint_route)
            app.router.add_post("/v1/group/lost", self._lost_members.route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = self.config.manager_port if self.group_rank == 0 else 0
        site = web.TCPSite(runner, self.config.host, port)
        await site.start()
        self._runner = runner
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[attr-defined]
        bound = sockets[0].getsockname()[1]
        return f"http://{self.config.host}:{bound}", aiohttp.ClientSession()

    async def _shutdown(self) -> None:
        # Long-polls from the other ranks would hold the server's cleanup.
        self._lost_members.release_all()
        if self._leader is not None:
            await self._leader.close()
        await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics_route(self, request: web.Request) -> web.Response:
        """``GET /metrics``: this process's Prometheus metrics (read-only, as on the lighthouse)."""
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _token_ok(self, request: web.Request) -> bool:
        return guard.request_token_ok(request, self.config.token)

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
        return self.checkpoints.save(self._committed, self._healer.dirty, root, metadata)

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
        return self.checkpoints.maybe_save(self._committed, self._healer.dirty)

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
