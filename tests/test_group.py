"""ftdiloco.coordination.group on its own: the gather, its HTTP route, the typed channel.

Every rank of a replica group must get the same answer to each round (or the
same error), a malformed contribution must never reach ``decide``, and no rank
may be left waiting.  These tests drive :class:`GroupGather` directly, over
real loopback HTTP, and through two :class:`GroupChannel` s on two threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from ftdiloco.coordination import group
from ftdiloco.coordination.group import (
    GroupChannel,
    GroupError,
    GroupGather,
    QuorumAsk,
    Vote,
    contribute_remote,
)
from ftwire import guard, protocol
from ftwire.background import BackgroundLoop
from ftwire.messages import Member, Quorum

T = TypeVar("T")
TOKEN = "group-secret"
AUTH = guard.authorization(TOKEN)


class Recorder:
    """A ``decide`` that records every call and answers with the sum of the ranks' ``n``."""

    def __init__(self, fail: str | None = None, delay: float = 0.0) -> None:
        self.calls: list[dict[int, dict[str, Any]]] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(dict(values))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise RuntimeError(self.fail)
        return {"total": sum(v.get("n", 0) for v in values.values()), "ranks": sorted(values)}


def without_version(answer: dict[str, Any]) -> dict[str, Any]:
    """A wire answer less the envelope's protocol version (rank 0's own answer has none)."""
    return {k: v for k, v in answer.items() if k != "v"}


# -- GroupGather -------------------------------------------------------------------


async def test_every_rank_gets_the_one_answer_and_decide_runs_once() -> None:
    decide = Recorder()
    gather = GroupGather(3, {"sum": decide})
    answers = await asyncio.gather(
        *(gather.contribute("sum", 1, rank, {"n": rank + 1}, timeout=5) for rank in (2, 0, 1))
    )
    assert answers == [{"total": 6, "ranks": [0, 1, 2]}] * 3
    assert decide.calls == [{0: {"n": 1}, 1: {"n": 2}, 2: {"n": 3}}]


async def test_rounds_are_kept_apart_by_kind_and_number() -> None:
    sums, others = Recorder(), Recorder()
    gather = GroupGather(2, {"sum": sums, "other": others})
    first = asyncio.ensure_future(gather.contribute("sum", 1, 0, {"n": 1}, timeout=5))
    second = asyncio.ensure_future(gather.contribute("sum", 2, 0, {"n": 10}, timeout=5))
    other = asyncio.ensure_future(gather.contribute("other", 1, 0, {"n": 100}, timeout=5))
    assert await gather.contribute("sum", 2, 1, {"n": 20}, timeout=5) == {
        "total": 30,
        "ranks": [0, 1],
    }
    assert await gather.contribute("other", 1, 1, {"n": 200}, timeout=5) == {
        "total": 300,
        "ranks": [0, 1],
    }
    assert not first.done()
    assert await gather.contribute("sum", 1, 1, {"n": 2}, timeout=5) == {
        "total": 3,
        "ranks": [0, 1],
    }
    assert await asyncio.wait_for(first, 5) == {"total": 3, "ranks": [0, 1]}
    assert await asyncio.wait_for(second, 5) == {"total": 30, "ranks": [0, 1]}
    assert await asyncio.wait_for(other, 5) == {"total": 300, "ranks": [0, 1]}
    assert len(sums.calls) == 2 and len(others.calls) == 1


GOOD_QUORUM = {"step": 3, "history": "ab" * 16, "commit_failures": 0, "heal": "", "dirty": False}

# (kind, a value the kind accepts, a malformed one)
MALFORMED = [
    ("quorum", GOOD_QUORUM, {k: v for k, v in GOOD_QUORUM.items() if k != "heal"}),
    ("quorum", GOOD_QUORUM, {**GOOD_QUORUM, "step": -1}),
    ("quorum", GOOD_QUORUM, {**GOOD_QUORUM, "step": True}),
    ("quorum", GOOD_QUORUM, {**GOOD_QUORUM, "history": "x" * 33}),
    ("quorum", GOOD_QUORUM, {**GOOD_QUORUM, "dirty": 0}),
    ("quorum", GOOD_QUORUM, {**GOOD_QUORUM, "heal": "h" * (protocol.MAX_ADDRESS_LEN + 1)}),
    ("vote", {"ok": True}, {"ok": 1}),
    ("vote", {"ok": False}, {}),
    ("checkpoint", {}, {"save": "yes"}),
    ("checkpoint", {"save": True, "stop": True}, {"stop": None}),
    ("resume", {"steps": [0, 7]}, {"steps": [1, -1]}),
    ("resume", {"steps": []}, {"steps": [True]}),
    ("resume", {"steps": [5]}, {"steps": 5}),
]


@pytest.mark.parametrize(("kind", "good", "bad"), MALFORMED)
async def test_a_malformed_value_is_refused_before_decide(
    kind: str, good: dict[str, Any], bad: dict[str, Any]
) -> None:
    assert kind in group.ROUND_VALUES
    decide = Recorder()
    gather = GroupGather(1, {kind: decide})
    with pytest.raises(protocol.ProtocolError, match=kind):
        await gather.contribute(kind, 1, 0, bad, timeout=5)
    assert decide.calls == []
    # The refusal leaves the round open for the rank's well-formed value.
    assert await gather.contribute(kind, 1, 0, good, timeout=5) == {"total": 0, "ranks": [0]}
    assert decide.calls == [{0: good}]


async def test_an_unknown_kind_or_a_rank_outside_the_group_is_refused() -> None:
    decide = Recorder()
    gather = GroupGather(2, {"sum": decide})
    with pytest.raises(protocol.ProtocolError, match="unknown round kind"):
        await gather.contribute("nope", 1, 0, {}, timeout=5)
    with pytest.raises(protocol.ProtocolError, match=r"outside 0\.\.1"):
        await gather.contribute("sum", 1, 2, {}, timeout=5)
    assert decide.calls == []


async def test_a_rank_that_never_arrives_fails_every_waiting_rank() -> None:
    decide = Recorder()
    gather = GroupGather(3, {"sum": decide})
    # Rank 2 would wait a minute; rank 0's deadline ends the round for both.
    patient = asyncio.ensure_future(gather.contribute("sum", 4, 2, {"n": 1}, timeout=60))
    with pytest.raises(GroupError, match=r"sum/4: group ranks \[1\] did not arrive"):
        await gather.contribute("sum", 4, 0, {"n": 1}, timeout=0.2)
    with pytest.raises(GroupError, match=r"group ranks \[1\] did not arrive"):
        await asyncio.wait_for(patient, 5)
    assert decide.calls == []


async def test_a_slow_decision_still_answers_every_rank_after_their_timeout() -> None:
    # Everyone arrived: the decision (a lighthouse join) has its own deadline.
    decide = Recorder(delay=0.5)
    gather = GroupGather(2, {"sum": decide})
    answers = await asyncio.wait_for(
        asyncio.gather(
            gather.contribute("sum", 1, 0, {"n": 1}, timeout=0.05),
            gather.contribute("sum", 1, 1, {"n": 2}, timeout=0.05),
        ),
        5,
    )
    assert answers == [{"total": 3, "ranks": [0, 1]}] * 2
    assert len(decide.calls) == 1


async def test_a_failing_decision_fails_every_rank() -> None:
    decide = Recorder(fail="lighthouse unreachable")
    gather = GroupGather(2, {"sum": decide})
    results = await asyncio.wait_for(
        asyncio.gather(
            gather.contribute("sum", 9, 0, {"n": 1}, timeout=5),
            gather.contribute("sum", 9, 1, {"n": 2}, timeout=5),
            return_exceptions=True,
        ),
        10,
    )
    for result in results:
        assert isinstance(result, GroupError)
        assert str(result) == "sum/9: lighthouse unreachable"
    assert len(decide.calls) == 1


async def test_a_duplicate_contribution_is_refused_and_the_first_value_counts() -> None:
    decide = Recorder()
    gather = GroupGather(2, {"sum": decide})
    first = asyncio.ensure_future(gather.contribute("sum", 1, 0, {"n": 1}, timeout=5))
    await asyncio.sleep(0)  # one turn of the loop: rank 0's value is in
    with pytest.raises(protocol.ProtocolError, match="rank 0 already contributed to sum/1"):
        await gather.contribute("sum", 1, 0, {"n": 100}, timeout=5)
    assert await gather.contribute("sum", 1, 1, {"n": 2}, timeout=5) == {
        "total": 3,
        "ranks": [0, 1],
    }
    assert await asyncio.wait_for(first, 5) == {"total": 3, "ranks": [0, 1]}
    assert decide.calls == [{0: {"n": 1}, 1: {"n": 2}}]


async def test_too_many_open_rounds_end_the_oldest() -> None:
    decide = Recorder()
    gather = GroupGather(2, {"sum": decide})
    limit = group.MAX_OPEN_ROUNDS
    waiting = [
        asyncio.ensure_future(gather.contribute("sum", n, 0, {"n": n}, timeout=30))
        for n in range(limit + 1)
    ]
    try:
        oldest, rest = waiting[0], waiting[1:]
        with pytest.raises(GroupError, match=f"sum/0: ended, {limit} newer rounds are open"):
            await asyncio.wait_for(oldest, 5)
        assert not any(task.done() for task in rest)
        # The rounds still open complete as usual.
        for n, task in enumerate(rest, start=1):
            answer = await gather.contribute("sum", n, 1, {"n": 1}, timeout=5)
            assert answer == {"total": n + 1, "ranks": [0, 1]}
            assert await asyncio.wait_for(task, 5) == answer
        assert len(decide.calls) == limit
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


# -- the HTTP route -------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[GroupGather, str | None], Awaitable[str]]]:
    """Serves a gather's route on 127.0.0.1 (the route rank 0 mounts on its manager)."""
    runners: list[web.AppRunner] = []

    async def start(gather: GroupGather, token: str | None) -> str:
        app = web.Application()
        gather.add_routes(app, lambda request: guard.request_token_ok(request, token))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def round_body(**fields: Any) -> bytes:
    message = {"kind": "sum", "round": 1, "rank": 1, "value": {"n": 1}, "timeout_ms": 5000}
    message.update(fields)
    return protocol.pack(message)


@pytest.mark.parametrize(
    "headers", [{}, guard.authorization("wrong"), {protocol.TOKEN_HEADER: TOKEN}]
)
async def test_the_route_refuses_a_request_without_the_token(
    serve: Callable[[GroupGather, str | None], Awaitable[str]],
    session: aiohttp.ClientSession,
    headers: dict[str, str],
) -> None:
    decide = Recorder()
    url = await serve(GroupGather(1, {"sum": decide}), TOKEN)
    async with session.post(
        f"{url}/v1/group/round", data=round_body(rank=0), headers=headers
    ) as resp:
        assert resp.status == 401
        assert protocol.decode_error(await resp.read())[0] == "unauthorized"
    with pytest.raises(GroupError, match="401 unauthorized"):
        await contribute_remote(session, url, "sum", 1, 0, {"n": 1}, 5, headers)
    assert decide.calls == []


@pytest.mark.parametrize("token", [TOKEN, None])
async def test_a_remote_rank_gets_the_same_answer_as_rank_zero(
    serve: Callable[[GroupGather, str | None], Awaitable[str]],
    session: aiohttp.ClientSession,
    token: str | None,
) -> None:
    decide = Recorder()
    gather = GroupGather(3, {"sum": decide})
    url = await serve(gather, token)
    headers = AUTH if token else {}
    local, remote1, remote2 = await asyncio.wait_for(
        asyncio.gather(
            gather.contribute("sum", 5, 0, {"n": 1}, timeout=5),
            contribute_remote(session, url, "sum", 5, 1, {"n": 2}, 5, headers),
            contribute_remote(session, url, "sum", 5, 2, {"n": 3}, 5, headers),
        ),
        10,
    )
    assert local == {"total": 6, "ranks": [0, 1, 2]}
    assert without_version(remote1) == local
    assert without_version(remote2) == local
    assert decide.calls == [{0: {"n": 1}, 1: {"n": 2}, 2: {"n": 3}}]


async def test_a_remote_malformed_value_is_a_400_and_never_reaches_decide(
    serve: Callable[[GroupGather, str | None], Awaitable[str]],
    session: aiohttp.ClientSession,
) -> None:
    decide = Recorder()
    url = await serve(GroupGather(2, {"vote": decide}), TOKEN)
    with pytest.raises(GroupError, match="400 bad_request: vote round value"):
        await contribute_remote(session, url, "vote", 1, 1, {"ok": "yes"}, 5, AUTH)
    assert decide.calls == []


@pytest.mark.parametrize(
    "body",
    [
        round_body(kind=7),
        round_body(rank=-1),
        round_body(value=[1]),
        round_body(timeout_ms=0),
        round_body(timeout_ms=group.MAX_TIMEOUT_MS + 1),
        b"\xc1 not msgpack",
    ],
)
async def test_the_route_refuses_a_malformed_request(
    serve: Callable[[GroupGather, str | None], Awaitable[str]],
    session: aiohttp.ClientSession,
    body: bytes,
) -> None:
    decide = Recorder()
    url = await serve(GroupGather(2, {"sum": decide}), TOKEN)
    headers = {**AUTH, "Content-Type": protocol.CONTENT_TYPE}
    async with session.post(f"{url}/v1/group/round", data=body, headers=headers) as resp:
        assert resp.status == 400
        assert protocol.decode_error(await resp.read())[0] == "bad_request"
    assert decide.calls == []


async def test_a_failed_round_reaches_the_remote_rank_as_a_group_error(
    serve: Callable[[GroupGather, str | None], Awaitable[str]],
    session: aiohttp.ClientSession,
) -> None:
    decide = Recorder()
    gather = GroupGather(3, {"sum": decide})
    url = await serve(gather, TOKEN)
    local = asyncio.ensure_future(gather.contribute("sum", 2, 0, {"n": 1}, timeout=60))
    try:
        # Rank 1 asks to wait 0.2 s; rank 2 never comes.
        with pytest.raises(GroupError, match=r"503 group_round_failed: .*ranks \[2\]"):
            await contribute_remote(session, url, "sum", 2, 1, {"n": 1}, 0.2, AUTH)
        with pytest.raises(GroupError, match=r"ranks \[2\] did not arrive"):
            await asyncio.wait_for(local, 5)
    finally:
        local.cancel()
        await asyncio.gather(local, return_exceptions=True)
    assert decide.calls == []


async def test_an_unreachable_rank_zero_is_a_group_error(
    session: aiohttp.ClientSession, dead_address: str
) -> None:
    with pytest.raises(GroupError, match="cannot reach group rank 0"):
        await contribute_remote(session, dead_address, "sum", 1, 1, {"n": 1}, 2, AUTH)


# -- GroupChannel ---------------------------------------------------------------------


class Decisions:
    """What rank 0 decides for each round kind (the manager asks the lighthouse and fence)."""

    def __init__(self) -> None:
        self.fail: str | None = None
        self.seen: list[tuple[str, dict[int, dict[str, Any]]]] = []

    def _record(self, kind: str, values: dict[int, dict[str, Any]]) -> None:
        self.seen.append((kind, dict(values)))
        if self.fail is not None:
            raise RuntimeError(self.fail)

    async def quorum(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        self._record("quorum", values)
        return {"quorum": protocol.encode_quorum(expected_quorum(values), 1_700_000_000.5)}

    async def vote(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        self._record("vote", values)
        against = sorted(rank for rank, v in values.items() if not v["ok"])
        if against:
            return {"commit": False, "refused": f"ranks {against} voted no"}
        return {"commit": True}

    async def checkpoint(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        self._record("checkpoint", values)
        return {
            "save": any(v.get("save", False) for v in values.values()),
            "stop": any(v.get("stop", False) for v in values.values()),
        }

    async def resume(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        self._record("resume", values)
        common = set.intersection(*(set(v["steps"]) for v in values.values()))
        return {"step": max(common)} if common else {}


def expected_quorum(values: dict[int, dict[str, Any]]) -> Quorum:
    member = Member(
        "group-a",
        address=values[0]["heal"],
        step=max(v["step"] for v in values.values()),
        history=values[0]["history"],
    )
    return Quorum(quorum_id=11, members=(member,), created=1_700_000_000.5)


@dataclass
class Pair:
    ranks: tuple[GroupChannel, GroupChannel]
    decisions: Decisions

    def both(
        self, call0: Callable[[GroupChannel], T], call1: Callable[[GroupChannel], T]
    ) -> tuple[T, T]:
        """Each rank's call on its own thread, as each training process makes it."""
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call0, self.ranks[0])
            second = pool.submit(call1, self.ranks[1])
            return first.result(timeout=30), second.result(timeout=30)

    def same(self, call: Callable[[GroupChannel], T]) -> tuple[T, T]:
        return self.both(call, call)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Rank 0 (gather and route on its loop) and rank 1 (posting to it), as two processes."""
    decisions = Decisions()
    gather = GroupGather(
        2,
        {
            "quorum": decisions.quorum,
            "vote": decisions.vote,
            "checkpoint": decisions.checkpoint,
            "resume": decisions.resume,
        },
    )
    loops = (BackgroundLoop("test-group-rank0"), BackgroundLoop("test-group-rank1"))
    runner: web.AppRunner | None = None
    sessions: list[aiohttp.ClientSession | None] = [None, None]

    async def start() -> tuple[web.AppRunner, str]:
        app = web.Application()
        gather.add_routes(app, lambda request: guard.request_token_ok(request, TOKEN))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    async def new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    try:
        runner, url = loops[0].run(start(), timeout=10)
        sessions[0] = loops[0].run(new_session(), timeout=10)
        sessions[1] = loops[1].run(new_session(), timeout=10)
        channels = (
            GroupChannel(0, loops[0], AUTH, quorum_timeout=5, collective_timeout=5),
            GroupChannel(1, loops[1], AUTH, quorum_timeout=5, collective_timeout=5),
        )
        channels[0].connect(gather, sessions[0], "")
        channels[1].connect(None, sessions[1], url)
        yield Pair(channels, decisions)
    finally:
        for loop, session in zip(loops, sessions, strict=True):
            if session is not None:
                loop.run(session.close(), timeout=10)
        if runner is not None:
            loops[0].run(runner.cleanup(), timeout=10)
        for loop in loops:
            loop.close()


def test_the_channel_gives_both_ranks_the_same_quorum(pair: Pair) -> None:
    asks = (
        QuorumAsk(step=40, history="c" * 32, commit_failures=0, heal="http://a:1", dirty=False),
        QuorumAsk(step=41, history="d" * 32, commit_failures=2, heal="http://b:2", dirty=True),
    )
    first, second = pair.both(lambda ch: ch.quorum(asks[0]), lambda ch: ch.quorum(asks[1]))
    expected = expected_quorum({0: asks[0].encode(), 1: asks[1].encode()})
    assert first == second == expected
    assert first.members[0].step == 41
    assert pair.decisions.seen == [("quorum", {0: asks[0].encode(), 1: asks[1].encode()})]


@pytest.mark.parametrize(
    ("oks", "expected"),
    [
        ((True, True), Vote(True, None)),
        ((True, False), Vote(False, "ranks [1] voted no")),
        ((False, True), Vote(False, "ranks [0] voted no")),
    ],
)
def test_the_channel_gives_both_ranks_the_same_vote(
    pair: Pair, oks: tuple[bool, bool], expected: Vote
) -> None:
    assert pair.both(lambda ch: ch.vote(oks[0]), lambda ch: ch.vote(oks[1])) == (
        expected,
        expected,
    )


def test_the_channel_gives_both_ranks_the_same_checkpoint_decision(pair: Pair) -> None:
    # Round after round, in the same order on both ranks.
    assert pair.both(
        lambda ch: ch.checkpoint(save=True, stop=False),
        lambda ch: ch.checkpoint(save=False, stop=False),
    ) == ((True, False), (True, False))
    assert pair.both(
        lambda ch: ch.checkpoint(save=False, stop=False),
        lambda ch: ch.checkpoint(save=False, stop=True),
    ) == ((False, True), (False, True))
    assert pair.same(lambda ch: ch.checkpoint(save=False, stop=False)) == (
        (False, False),
        (False, False),
    )
    assert [kind for kind, _ in pair.decisions.seen] == ["checkpoint"] * 3


def test_the_channel_gives_both_ranks_the_same_resume_step(pair: Pair) -> None:
    assert pair.both(lambda ch: ch.resume([10, 20, 30]), lambda ch: ch.resume([20, 30, 40])) == (
        30,
        30,
    )
    assert pair.both(lambda ch: ch.resume([10]), lambda ch: ch.resume([20])) == (None, None)
    assert pair.decisions.seen[-1] == ("resume", {0: {"steps": [10]}, 1: {"steps": [20]}})


def test_the_channel_runs_mixed_rounds_in_step(pair: Pair) -> None:
    ask = QuorumAsk(step=1, history="", commit_failures=0, heal="", dirty=False)
    q0, q1 = pair.same(lambda ch: ch.quorum(ask))
    assert q0 == q1
    assert pair.same(lambda ch: ch.vote(True)) == (Vote(True), Vote(True))
    assert pair.same(lambda ch: ch.resume([1])) == (1, 1)
    assert pair.same(lambda ch: ch.checkpoint(save=True, stop=True)) == ((True, True),) * 2
    assert [kind for kind, _ in pair.decisions.seen] == ["quorum", "vote", "resume", "checkpoint"]


def test_a_failed_decision_raises_on_both_ranks(pair: Pair) -> None:
    pair.decisions.fail = "fence unreachable"

    def vote(ch: GroupChannel) -> str:
        with pytest.raises(GroupError, match="fence unreachable") as caught:
            ch.vote(True)
        return str(caught.value)

    first, second = pair.same(vote)
    assert first == "vote/1: fence unreachable"
    assert second.endswith("503 group_round_failed: vote/1: fence unreachable")
    # The next round works again on both.
    pair.decisions.fail = None
    assert pair.same(lambda ch: ch.vote(True)) == (Vote(True), Vote(True))
