"""The HTTP server of one training process, and its client session.

Every rank serves its heals (``/v1/heal/...``) and ``/metrics``; group rank 0
also serves the group rounds, the operator's ``POST /v1/checkpoint`` and the
long-poll that tells the other ranks of a lost quorum member.  Routes come
from the collaborators that own them; this module only puts them on one
aiohttp application and runs it on the manager's background loop.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ftdiloco.config import Config
from ftdiloco.coordination.group import GroupGather
from ftdiloco.coordination.lost_members import LostMembers
from ftdiloco.coordination.metrics import GroupMetrics
from ftdiloco.state.group_checkpoints import GroupCheckpoints
from ftdiloco.state.heal import StateServer
from ftwire import guard, protocol


class Endpoint:
    """One process's server: started with :meth:`start`, stopped with :meth:`close`."""

    def __init__(
        self,
        config: Config,
        group_rank: int,
        heals: StateServer,
        metrics: GroupMetrics,
        gather: GroupGather,
        checkpoints: GroupCheckpoints,
        lost_members: LostMembers,
        step: Callable[[], int],
    ) -> None:
        self._config = config
        self._group_rank = group_rank
        self._heals = heals
        self._metrics = metrics
        self._gather = gather
        self._checkpoints = checkpoints
        self._lost_members = lost_members
        self._step = step
        self._runner: web.AppRunner | None = None

    async def start(self) -> tuple[str, aiohttp.ClientSession]:
        """Serve; returns this process's address and a client session for its requests."""
        cfg = self._config
        app = web.Application(client_max_size=protocol.MAX_MESSAGE_BYTES)
        self._heals.add_routes(app)
        app.router.add_get("/metrics", self._metrics_route)
        if self._group_rank == 0:
            self._gather.add_routes(app, self._token_ok)
            self._checkpoints.add_routes(app, self._step)
            app.router.add_post("/v1/group/lost", self._lost_members.route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.manager_port if self._group_rank == 0 else 0)
        await site.start()
        self._runner = runner
        sockets = site._server.sockets if site._server is not None else []  # type: ignore[attr-defined]
        bound = sockets[0].getsockname()[1]
        return f"http://{cfg.host}:{bound}", aiohttp.ClientSession()

    async def close(self) -> None:
        # Long-polls from the other ranks would hold the server's cleanup.
        self._lost_members.release_all()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics_route(self, request: web.Request) -> web.Response:
        """``GET /metrics``: this process's Prometheus metrics (read-only, as on the lighthouse)."""
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _token_ok(self, request: web.Request) -> bool:
        return guard.request_token_ok(request, self._config.token)
