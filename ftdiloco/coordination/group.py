"""Gathering the ranks of one replica group: rank 0 answers for all of them.

Every rank of a group must see the same quorum and the same commit decision.
Rank 0 hosts the gather (an aiohttp route on its manager server); each rank
contributes once per round and all of them get one answer -- or, if anything
fails (the lighthouse is unreachable, a rank never arrives), all of them get
the same error.  No rank is ever left waiting.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from ftdiloco.config import Config
from ftwire import guard, protocol
from ftwire.background import BackgroundLoop
from ftwire.history import HISTORY_CHARS
from ftwire.messages import Quorum

log = structlog.get_logger(__name__)

Decide = Callable[[dict[int, dict[str, Any]]], Awaitable[dict[str, Any]]]
Check = Callable[[Mapping[str, Any]], None]

# Rounds waiting for ranks at once; a newer one ends the oldest.
MAX_OPEN_ROUNDS = 64
# The longest a rank may ask to wait for the others.
MAX_TIMEOUT_MS = 24 * 3600 * 1000


def _quorum_value(value: Mapping[str, Any]) -> None:
    protocol.read_count(value, "step", 0)
    protocol.read_text(value, "history", HISTORY_CHARS)
    protocol.read_count(value, "commit_failures", 0)
    protocol.read_text(value, "heal", protocol.MAX_ADDRESS_LEN)
    protocol.read_field(value, "dirty", bool)


def _vote_value(value: Mapping[str, Any]) -> None:
    protocol.read_field(value, "ok", bool)


def _checkpoint_value(value: Mapping[str, Any]) -> None:
    protocol.read_field(value, "save", bool, False)
    protocol.read_field(value, "stop", bool, False)


def _resume_value(value: Mapping[str, Any]) -> None:
    steps = protocol.read_field(value, "steps", list)
    if not all(type(s) is int and s >= 0 for s in steps):
        raise protocol.ProtocolError("field 'steps' must be a list of ints >= 0")


# What each round kind's value must hold, checked when a rank contributes, so
# that a malformed value is that rank's 400 and never reaches ``decide``.
ROUND_VALUES: dict[str, Check] = {
    "quorum": _quorum_value,
    "vote": _vote_value,
    "checkpoint": _checkpoint_value,
    "resume": _resume_value,
}


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
        check = ROUND_VALUES.get(kind)
        if check is not None:
            try:
                check(value)
            except protocol.ProtocolError as e:
                raise protocol.ProtocolError(f"{kind} round value: {e}") from None
        key = f"{kind}/{round_no}"
        rnd = self._rounds.get(key)
        if rnd is None:
            while len(self._rounds) >= MAX_OPEN_ROUNDS:
                oldest = next(iter(self._rounds))
                self._fail(
                    oldest,
                    self._rounds[oldest],
                    GroupError(f"{oldest}: ended, {MAX_OPEN_ROUNDS} newer rounds are open"),
                )
            rnd = self._rounds[key] = _Round(asyncio.get_running_loop().create_future())
        if rank in rnd.values:
            raise protocol.ProtocolError(f"rank {rank} already contributed to {key}")
        rnd.values[rank] = value
        if len(rnd.values) == self.world_size:
            self._tasks.add(asyncio.ensure_future(self._finish(key, rnd, self._decide[kind])))
        try:
            return await asyncio.wait_for(asyncio.shield(rnd.result), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on
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
        finally:
            self._tasks.discard(task)
        if not rnd.result.done():
            rnd.result.set_result(answer)
        self._rounds.pop(key, None)

    def _fail(self, key: str, rnd: _Round, error: GroupError) -> None:
        if not rnd.result.done():
            log.warning("group round failed", round=key, error=str(error))
            rnd.result.set_exception(error)
        self._rounds.pop(key, None)

    def add_routes(self, app: web.Application, token_ok: Callable[[web.Request], bool]) -> None:
        async def handle(request: web.Request) -> web.Response:
            if not token_ok(request):
                raise guard.Refused(401, "unauthorized", "wrong token")
            message = protocol.unpack(await guard.read_body(request))
            kind = protocol.read_text(message, "kind", 32)
            round_no = protocol.read_count(message, "round", 0)
            rank = protocol.read_count(message, "rank", 0)
            timeout_ms = protocol.read_count(message, "timeout_ms", 1)
            if timeout_ms > MAX_TIMEOUT_MS:
                raise protocol.ProtocolError(f"field 'timeout_ms' must be <= {MAX_TIMEOUT_MS}")
            value = protocol.read_field(message, "value", dict)
            try:
                answer = await self.contribute(kind, round_no, rank, value, timeout_ms / 1000)
            except GroupError as e:
                raise guard.Refused(503, "group_round_failed", str(e)) from None
            return web.Response(body=protocol.pack(answer), content_type=protocol.CONTENT_TYPE)

        guard.install(app)
        app.router.add_post("/v1/group/round", handle)


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
            return protocol.unpack(payload, protocol.ANSWER)
    except (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError) as e:
        raise GroupError(f"cannot reach group rank 0 at {url}: {e!r}") from e


@dataclass(frozen=True)
class QuorumAsk:
    """What one rank brings to the quorum round: its committed state and heal address."""

    step: int
    history: str
    commit_failures: int
    heal: str
    dirty: bool

    def encode(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history,
            "commit_failures": self.commit_failures,
            "heal": self.heal,
            "dirty": self.dirty,
        }


@dataclass(frozen=True)
class Vote:
    """The group's commit decision; ``refused`` says why the fence said no."""

    commit: bool
    refused: str | None = None


class GroupChannel:
    """One rank's side of the group rounds, one typed method per round kind.

    Every rank calls the same methods in the same order; rank 0 gathers the
    values on its own loop and decides (joins the lighthouse, asks the fence),
    the others post theirs to rank 0.  Each call returns the one answer every
    rank of the group receives, or raises :class:`GroupError` on all of them.
    """

    def __init__(
        self,
        group_rank: int,
        loop: BackgroundLoop,
        headers: dict[str, str],
        quorum_timeout: float,
        collective_timeout: float,
    ) -> None:
        self._group_rank = group_rank
        self._loop = loop
        self._headers = headers
        self._quorum_timeout = quorum_timeout
        self._collective_timeout = collective_timeout
        self._rounds = 0
        self.gather: GroupGather | None = None
        self._session: aiohttp.ClientSession | None = None
        self._leader_url = ""

    def connect(
        self, gather: GroupGather | None, session: aiohttp.ClientSession, leader_url: str
    ) -> None:
        """Rank 0 passes its gather; the others rank 0's manager address."""
        self.gather, self._session, self._leader_url = gather, session, leader_url

    def quorum(self, ask: QuorumAsk) -> Quorum:
        answer = self._round("quorum", ask.encode(), self._quorum_timeout)
        return protocol.decode_quorum(protocol.read_field(answer, "quorum", dict))

    def vote(self, ok: bool) -> Vote:
        answer = self._round("vote", {"ok": ok}, self._collective_timeout)
        refused = answer.get("refused")
        return Vote(answer.get("commit") is True, refused if isinstance(refused, str) else None)

    def checkpoint(self, save: bool, stop: bool) -> tuple[bool, bool]:
        """Whether any rank asks to save, and whether any rank must stop (SIGTERM)."""
        answer = self._round("checkpoint", {"save": save, "stop": stop}, self._collective_timeout)
        return answer.get("save") is True, answer.get("stop") is True

    def resume(self, steps: list[int]) -> int | None:
        """The newest step every rank holds intact (``steps``: this rank's), if any."""
        step = self._round("resume", {"steps": steps}, self._collective_timeout).get("step")
        return step if type(step) is int else None

    def _round(self, kind: str, value: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._rounds += 1
        round_no = self._rounds
        if self.gather is not None:
            coro = self.gather.contribute(kind, round_no, 0, value, timeout)
        else:
            assert self._session is not None, "GroupChannel.connect first"
            coro = contribute_remote(
                self._session,
                self._leader_url,
                kind,
                round_no,
                self._group_rank,
                value,
                timeout,
                self._headers,
            )
        return self._loop.run(coro, timeout=timeout + 10)


def find_leader(
    config: Config, group_rank: int, group_size: int, address: str
) -> tuple[str, object | None]:
    """Group rank 0's manager address (``address`` on rank 0), shared through torchrun's store.

    Also returns the store on rank 0, which may host it: the caller keeps it
    alive while the other ranks may still read.  The key includes torchrun's
    restart count, so a restarted group never reads its previous leader.
    """
    if group_size == 1:
        return address, None
    from torch._C._distributed_c10d import TCPStore  # the training side only

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"ftdiloco/leader/{attempt}"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = TCPStore(
        config.master_addr,
        config.master_port,
        is_master=group_rank == 0 and not agent_store,
        wait_for_workers=False,
        timeout=timedelta(seconds=config.quorum_timeout),
    )
    if group_rank == 0:
        store.set(key, address)
        return address, store
    return store.get(key).decode(), None
