"""Group rank 0's side of coordination: the lighthouse link and the round decisions.

Only rank 0 of a group talks to the lighthouse.  It keeps the liveness link
(heartbeats carrying the committed state; the lighthouse pushes "a quorum
member died" and the operator's kill back over it), joins each quorum on
behalf of every rank, and asks the commit fence after the ranks voted yes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ftdiloco.config import Config
from ftdiloco.coordination.lost_members import LostMembers
from ftdiloco.coordination.plan import QuorumPlan
from ftwire import protocol
from ftwire.history import DIRTY
from ftwire.messages import DATA_HEAL, DATA_INFO, DATA_LOSS, Member
from lighthouse.client import AsyncLighthouseClient, LivenessLink


class GroupLeader:
    """Decides the quorum and vote rounds for the group; rank 0 only."""

    def __init__(
        self,
        config: Config,
        incarnation: str,
        address: str,
        store_address: str,
        liveness_state: Callable[[], protocol.Liveness],
        plan: Callable[[], QuorumPlan | None],
        on_member_lost: Callable[[str, str], None],
        lost_members: LostMembers,
        log: Any,
    ) -> None:
        self._config = config
        self._incarnation = incarnation
        self._address = address
        self._store_address = store_address
        self._liveness_state = liveness_state
        self._plan = plan
        self._on_member_lost = on_member_lost
        self._lost_members = lost_members
        self._log = log
        self._lighthouse: AsyncLighthouseClient | None = None
        self._liveness: LivenessLink | None = None
        # Carried by the next join (Manager.report_loss, set_join_info, set_join_grace).
        self.loss: float | None = None
        self.info: Mapping[str, Any] = {}
        self.grace: float | None = None

    async def connect(self) -> None:
        cfg = self._config
        # The client retries until FTDILOCO_TIMEOUT itself, saying so every few seconds.
        self._lighthouse = AsyncLighthouseClient(
            list(cfg.lighthouse), cfg.token, retry_deadline=cfg.quorum_timeout
        )
        self._liveness = self._lighthouse.liveness(
            cfg.replica_id,
            self._on_event,
            interval=cfg.heartbeat_interval,
            state=self._liveness_state,
        )
        await self._liveness.start()

    async def close(self) -> None:
        if self._liveness is not None:
            await self._liveness.stop()
        if self._lighthouse is not None:
            await self._lighthouse.close()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == protocol.EVENT_MEMBER_LOST:
            lost = protocol.decode_member_lost(event)
            self._lost_members.record(lost.quorum_id, lost.replica_id)
            self._on_member_lost(lost.replica_id, lost.cause)
        elif kind == "kill":
            self._log.error("killed by the lighthouse operator", reason=event.get("reason"))
            os._exit(70)

    async def decide_quorum(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Join the lighthouse with what every rank contributed (group.QuorumAsk)."""
        assert self._lighthouse is not None
        cfg, lead = self._config, values[0]
        data: dict[str, Any] = {
            DATA_HEAL: [values[r]["heal"] for r in range(len(values))],
            DIRTY: any(v["dirty"] for v in values.values()),
        }
        if self.loss is not None:
            data[DATA_LOSS] = self.loss
        if self.info:
            data[DATA_INFO] = dict(self.info)
        member = Member(
            replica_id=cfg.replica_id,
            address=self._address,
            store_address=self._store_address,
            step=lead["step"],
            world_size=len(values),
            commit_failures=lead["commit_failures"],
            data=data,
            incarnation=self._incarnation,
            history=lead["history"],
            expected_groups=cfg.num_replica_groups or 0,
            join_grace=self.grace,
        )
        quorum = await self._lighthouse.join(member, timeout=cfg.quorum_timeout)
        return {"quorum": protocol.encode_quorum(quorum, quorum.created, quorum.settings)}

    async def decide_vote(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Commit if every rank succeeded, enough groups took part and the fence agrees."""
        plan = self._plan()
        enough = plan is not None and plan.replica_world_size >= self._config.min_replicas
        if plan is None or not enough or not all(v["ok"] for v in values.values()):
            return {"commit": False}
        assert self._lighthouse is not None
        fence = await self._lighthouse.fence(self._config.replica_id, plan.quorum_id, plan.max_step)
        if not fence.commit:
            self._log.warning("commit refused by the fence", reason=fence.reason)
            return {"commit": False, "refused": fence.reason}
        return {"commit": True}
