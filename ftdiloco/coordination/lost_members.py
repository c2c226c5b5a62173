"""``member_lost`` reaches every rank of a group, not only the one that hears the lighthouse.

Only group rank 0 holds the liveness link.  The other ranks sit in their own
cross-group collectives with the lost group's ranks, and a frozen peer keeps
those waiting until the collective deadline.  So each outer step they ask
rank 0 -- a long-poll on its manager server, ``POST /v1/group/lost`` --
whether a member of their quorum was lost, and abandon their wait when it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import aiohttp
from aiohttp import web

from ftwire import guard, protocol
from ftwire.background import BackgroundLoop

# Quorums remembered (losses seen, ranks waiting): ids change after every loss,
# so only the last few can still be asked about.
KEPT = 64


class LostMembers:
    def __init__(self, token: str | None, log: Any) -> None:
        self._token = token
        self._log = log
        # Rank 0: the losses seen per quorum id, and the ranks waiting for one.
        self._lost: dict[int, str] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        # Other ranks: this step's question to rank 0.
        self._watch: concurrent.futures.Future[None] | None = None

    # -- rank 0 ---------------------------------------------------------------------------

    def record(self, quorum_id: int, replica_id: str) -> None:
        """On rank 0's loop: remember the loss and release the ranks asking about it."""
        self._lost[quorum_id] = replica_id
        while len(self._lost) > KEPT:
            del self._lost[next(iter(self._lost))]
        waiter = self._waiters.pop(quorum_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def release_all(self) -> None:
        """On rank 0's loop, when it leaves: answer every waiting rank now (nothing lost)."""
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def route(self, request: web.Request) -> web.Response:
        """``POST /v1/group/lost``: answer when a member of quorum Q is lost, or at the timeout."""
        guard.authorize(request, self._token)
        message = protocol.unpack(await guard.read_body(request))
        quorum_id = protocol.read_field(message, "quorum_id", int)
        timeout = protocol.read_count(message, "timeout_ms", 1) / 1000
        if quorum_id not in self._lost:
            while len(self._waiters) >= KEPT:  # forgotten quorums: let their askers go
                stale = self._waiters.pop(next(iter(self._waiters)))
                if not stale.done():
                    stale.set_result(None)
            waiter = self._waiters.setdefault(quorum_id, asyncio.get_running_loop().create_future())
            await asyncio.wait([waiter], timeout=timeout)
        body = protocol.pack({"lost": self._lost.get(quorum_id)})
        return web.Response(body=body, content_type=protocol.CONTENT_TYPE)

    # -- the other ranks ----------------------------------------------------------------------

    def watch(
        self,
        loop: BackgroundLoop,
        ask: tuple[aiohttp.ClientSession, str],
        quorum_id: int,
        abort: concurrent.futures.Future[str],
        timeout: float,
    ) -> None:
        """Ask rank 0 (``ask``: session, its URL) about ``quorum_id``; a loss sets ``abort``."""
        if self._watch is not None:
            self._watch.cancel()
        self._watch = loop.submit(self._ask(*ask, quorum_id, abort, timeout))

    async def _ask(
        self,
        session: aiohttp.ClientSession,
        leader: str,
        quorum_id: int,
        abort: concurrent.futures.Future[str],
        timeout: float,
    ) -> None:
        body = protocol.pack({"quorum_id": quorum_id, "timeout_ms": int(timeout * 1000)})
        headers = guard.authorization(self._token) if self._token else {}
        try:
            async with session.post(
                f"{leader}/v1/group/lost",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout + 5),
            ) as response:
                answer = protocol.unpack(await response.read()) if response.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, protocol.ProtocolError) as e:
            self._log.debug("asking group rank 0 for lost members failed", error=repr(e))
            return
        lost = answer.get("lost")
        if isinstance(lost, str) and not abort.done():
            self._log.warning("quorum member lost (told by group rank 0)", member=lost)
            abort.set_result(lost)
