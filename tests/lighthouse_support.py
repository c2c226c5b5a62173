"""Raw-HTTP helpers for the lighthouse server tests.

They speak the wire protocol with a bare aiohttp session (not the client
library) so that the tests pin down the HTTP contract itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from ftwire import protocol
from ftwire.messages import Member, Quorum
from lighthouse.server import LighthouseServer, ServerConfig

Answer = tuple[int, dict[str, Any]]


class Lighthouses:
    """Starts in-process daemons on loopback and stops every one of them at the end."""

    def __init__(self) -> None:
        self._servers: list[LighthouseServer] = []

    async def start(self, **config: Any) -> LighthouseServer:
        server = LighthouseServer(ServerConfig(**config))
        await server.start()
        self._servers.append(server)
        return server

    async def stop_all(self) -> None:
        for server in self._servers:
            await server.stop()


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": protocol.CONTENT_TYPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def post(
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    body: bytes,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST a body; returns the status and the decoded msgpack answer."""
    async with session.post(
        url + path, data=body, headers={**_headers(token), **(headers or {})}
    ) as response:
        return response.status, protocol.unpack(await response.read())


async def join(
    session: aiohttp.ClientSession,
    url: str,
    rid: str,
    timeout: float = 10.0,
    token: str | None = None,
    **fields: Any,
) -> Answer:
    body = protocol.encode_join(Member(rid, **fields), timeout)
    return await post(session, url, "/v1/join", body, token)


async def heartbeat(session: aiohttp.ClientSession, url: str, rid: str) -> Answer:
    return await post(session, url, "/v1/heartbeat", protocol.encode_heartbeat(rid))


def quorum_of(answer: Answer) -> Quorum:
    status, body = answer
    assert status == 200, body
    return protocol.decode_quorum(body["quorum"])


async def connect(
    session: aiohttp.ClientSession, url: str, rid: str, token: str | None = None
) -> aiohttp.ClientWebSocketResponse:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return await session.ws_connect(f"{url}/v1/ws", params={"replica_id": rid}, headers=headers)


async def next_event(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    """The next pushed event; fails if none arrives in time or the socket closes."""
    msg = await ws.receive(timeout)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    return protocol.unpack(msg.data)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until a state with no event of its own to await holds; fail after timeout."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.002)

    await asyncio.wait_for(poll(), timeout)
