"""Gathering the ranks of one replica group: rank 0 answers for all of them.

Every rank of a group must see the same quorum and the same commit decision.
Rank 0 hosts the gather (an aiohttp route on its manager server); each rank
contributes once per round and all of them get one answer -- or, if anything
fails (the lighthouse is unreachable, a rank never arrives), all of them get
the same error.  No rank is ever left waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from lighthouse import protocol

log = structlog.get_logger(__name__)

Decide = Callable[[dict[int, dict[str, Any]]], Awaitable[dict[str, Any]]]


class GroupError(RuntimeError):
    """A group round failed; every rank of the group receives this."""


@dataclass
class _Round:
    result: asyncio.Future[dict[str, Any]]
    values: dict[int, dict[str, Any]] = field(default_factory=dict)


class GroupGather:
    """Rounds keyed by name: one contribution per rank, one answer for all.

    ``decide`` runs once, on rank 0's loop, when every rank has contributed.
    """

    def __init__(self, world_size: int, decide: dict[str, Decide]) -> None:
        self.world_size = world_size
        self._decide = decide
        self._rounds: dict[str, _Round] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    async def contribute(
        self, kind: str, round_no: int, rank: int, value: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        if kind not in self._decide:
            raise protocol.ProtocolError(f"unknown round kind {kind!r}")
        if not 0 <= rank < self.world_size:
            raise protocol.ProtocolError(f"group rank {rank} outside 0..{self.world_size - 1}")
        key = f"{kind}/{round_no}"
        rnd = self._rounds.get(key)
        if rnd is None:
            rnd = self._rounds[key] = _Round(asyncio.get_running_loop().create_future())
        if rank in rnd.values:
            raise protocol.ProtocolError(f"rank {rank} already contributed to {key}")
        rnd.values[rank] = value
        if len(rnd.values) == self.world_size:
            self._tasks.add(asyncio.ensure_future(self._finish(key, rnd, self._decide[kind])))
        try:
            return await asyncio.wait_for(asyncio.shield(rnd.result), timeout)
        except TimeoutError:
            if len(rnd.values) == self.world_size:
                # Everyone arrived; the decision (a lighthouse join) has its own
                # deadline and answers every rank when it passes.
                return await rnd.result
            missing = sorted(set(range(self.world_size)) - rnd.values.keys())
            error = GroupError(f"{key}: group ranks {missing} did not arrive in {timeout:g}s")
            self._fail(key, rnd, error)
            return await rnd.result

    async def _finish(self, key: str, rnd: _Round, decide: Decide) -> None:
        task = asyncio.current_task()
        try:
            answer = await decide(rnd.values)
        except Exception as e:
            self._fail(key, rnd, GroupError(f"{key}: {e}"))
            return
        if not rnd.result.done():
            rnd.result.set_result(answer)
        self._rounds.pop(key, None)
        self._tasks.discard(task)

    def _fail(self, key: str, rnd: _Round, error: GroupError) -> None:
        if not rnd.result.done():
            log.warning("group round failed", round=key, error=str(error))
            rnd.result.set_exception(error)
        self._rounds.pop(key, None)

    def add_routes(self, app: web.Application, token_ok: Callable[[web.Request], bool]) -> None:
        async def handle(request: web.Request) -> web.Response:
            if not token_ok(request):
                return _error(401, "unauthorized", "missing or wrong token")
            try:
                message = protocol.unpack(await request.read())
                kind = protocol._text(message, "kind", 32)
                round_no = protocol._count(message, "round", 0)
                rank = protocol._count(message, "rank", 0)
                timeout = protocol._count(message, "timeout_ms", 1) / 1000
                value = protocol._field(message, "value", dict)
            except protocol.ProtocolError as e:
                return _error(400, "bad_request", str(e))
            try:
                answer = await self.contribute(kind, round_no, rank, value, timeout)
            except protocol.ProtocolError as e:
                return _error(400, "bad_request", str(e))
            except GroupError as e:
                return _error(503, "group_round_failed", str(e))
            return web.Response(body=protocol.pack(answer), content_type=protocol.CONTENT_TYPE)

        app.router.add_post("/v1/group/round", handle)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status, body=protocol.encode_error(code, message), content_type=protocol.CONTENT_TYPE
    )


async def contribute_remote(
    session: aiohttp.ClientSession,
    url: str,
    kind: str,
    round_no: int,
    rank: int,
    value: dict[str, Any],
    timeout: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    """A non-zero rank's side of a round, over HTTP to rank 0."""
    body = protocol.pack(
        {
            "kind": kind,
            "round": round_no,
            "rank": rank,
            "value": value,
            "timeout_ms": max(1, int(timeout * 1000)),
        }
    )
    client_timeout = aiohttp.ClientTimeout(total=timeout + 5)
    try:
        async with session.post(
            f"{url}/v1/group/round", data=body, headers=headers, timeout=client_timeout
        ) as resp:
            payload = await resp.read()
            if resp.status != 200:
                code, text = protocol.decode_error(payload)
                raise GroupError(f"rank 0 answered {resp.status} {code}: {text}")
            return protocol.unpack(payload)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise GroupError(f"cannot reach group rank 0 at {url}: {e!r}") from e
