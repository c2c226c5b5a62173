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
from pathlib import Path
from typing import Any

import structlog
import torch

from ftdiloco.config import Config
from ftdiloco.coordination import process_group
from ftdiloco.coordination.allreduce import Work
from ftdiloco.coordination.collective import Collective
from ftdiloco.coordination.endpoint import Endpoint
from ftdiloco.coordination.group import GroupChannel, GroupGather, QuorumAsk, find_leader
from ftdiloco.coordination.leader import GroupLeader
from ftdiloco.coordination.lost_members import LostMembers
from ftdiloco.coordination.metrics import GroupMetrics
from ftdiloco.coordination.outcome import MemberLost, StepOutcome
from ftdiloco.coordination.plan import QuorumPlan, plan_quorum
from ftdiloco.state.group_checkpoints import GroupCheckpoints
from ftdiloco.state.healer import Healer
from ftdiloco.state.registry import StateLoad, StateRegistry, StateSave
from ftdiloco.training.compression import Codec
from ftwire import protocol
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
        gather = GroupGather(
            self.group_size,
            {
                "quorum": lambda values: self._lead().decide_quorum(values),
                "vote": lambda values: self._lead().decide_vote(values),
                "checkpoint": self.checkpoints.decide_checkpoint,
                "resume": self.checkpoints.decide_resume,
            },
        )
        self._endpoint = Endpoint(
            cfg,
            self.group_rank,
            self._healer.server,
            self.metrics,
            gather,
            self.checkpoints,
            self._lost_members,
            lambda: self.step,
        )
        self.address, self._session = self._loop.run(self._endpoint.start(), timeout=30)
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
        # Rank 0 keeps torchrun's store alive (it may host it) for the others to read.
        self._leader_url, self._leader_store = find_leader(
            cfg, self.group_rank, self.group_size, self.address
        )
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
            # A member that left (closed cleanly: it finished) is no failure to warn of.
            say = self._log.info if cause == "left" else self._log.warning
            say("quorum member lost", member=replica_id, cause=cause)
            self._outcome.member_lost(replica_id)

    async def _shutdown(self) -> None:
        await self._endpoint.close()
        if self._leader is not None:
            await self._leader.close()
        await self._session.close()

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

        Between outer steps only (the state is in flux from ``start_quorum`` to
        the outer step); refused while a failed heal left the state torn.
        """
        return self.checkpoints.save(self._committed, self._healer.dirty, root, metadata)

    def resume(self, root: str | os.PathLike[str] | None = None) -> bool:
        """Load the newest checkpoint every rank of the group holds intact; False if none.

        On every rank, after registering the state and before the first outer
        step; :attr:`step` and :attr:`history` become the saved ones (groups
        further ahead still heal this one).  Raises
        :class:`~ftdiloco.state.checkpoint.CheckpointError` if it does not fit
        the registered state: silently starting over would lose the run.
        Details: :meth:`GroupCheckpoints.resume`.
        """
        resumed = self.checkpoints.resume(root)
        if resumed is None:
            return False
        self._committed = resumed
        return True

    def maybe_checkpoint(self) -> Path | None:
        """Save if a checkpoint is due; DiLoCo and LocalSGD call this after every outer step.

        Due: every ``FTDILOCO_CHECKPOINT_EVERY`` steps, on ``POST /v1/checkpoint``
        or after a SIGTERM (then it raises ``SystemExit`` once saved).  Details:
        :meth:`GroupCheckpoints.maybe_save`.
        """
        return self.checkpoints.maybe_save(self._committed, self._healer.dirty)

    def install_sigterm_handler(self) -> None:
        """On SIGTERM: save a checkpoint at the end of the current outer step, then exit.

        The scheduler's grace period must cover the rest of an outer step plus
        a save.  Details: :meth:`GroupCheckpoints.install_sigterm_handler`.
        """
        self.checkpoints.install_sigterm_handler(self._loop.loop.is_closed)
