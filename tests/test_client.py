"""The lighthouse client against the real server on loopback, plus a scripted stub.

The real server shows the client and the server agree on the API contract
(docs/lighthouse-api.md): joins, failover, restarts, liveness.  The stub
answers with exactly the error a test needs, so every status -> typed error
mapping is checked, including the ones a healthy server rarely produces.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from ftwire import protocol
from ftwire.background import BackgroundLoop
from ftwire.messages import Member, Quorum
from lighthouse.client import (
    AsyncLighthouseClient,
    LighthouseClient,
    LighthouseError,
    LighthouseHTTPError,
    LighthouseShuttingDown,
    LighthouseUnavailable,
    QuorumTimeout,
    RequestRejected,
    Unauthorized,
)
from lighthouse.server import LighthouseServer, ServerConfig

RETRY_WARNING = "lighthouse request failed, retrying"


# -- helpers ------------------------------------------------------------------------------


class Recorder:
    """An ``on_event`` that remembers events and lets any thread wait for one kind."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        def first() -> dict[str, Any] | None:
            return next((e for e in self.events if e["type"] == kind), None)

        with self._changed:
            assert self._changed.wait_for(lambda: first() is not None, timeout), (
                f"no {kind!r} event in {timeout}s; got {self.events}"
            )
            event = first()
        assert event is not None
        return event

    async def arrival(self, kind: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_for, kind)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for state another task changes (the server's core), checking every few ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def retries(logs: Sequence[Mapping[str, Any]], request: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == RETRY_WARNING and e["request"] == request]


def server_config(**overrides: Any) -> ServerConfig:
    return ServerConfig(**{"join_timeout": 5.0, "quorum_tick": 0.05, **overrides})


class Lighthouses:
    """Real lighthouse servers on loopback, all stopped at the end of the test."""

    def __init__(self) -> None:
        self.running: list[LighthouseServer] = []

    async def start(self, port: int = 0, **config: Any) -> tuple[LighthouseServer, str]:
        server = LighthouseServer(server_config(**config))
        url = await server.start("127.0.0.1", port)
        self.running.append(server)
        return server, url

    async def stop(self, server: LighthouseServer) -> None:
        self.running.remove(server)
        await server.stop()

    async def restart(self, server: LighthouseServer, **config: Any) -> LighthouseServer:
        """Stop ``server`` and start a fresh one on the same port, as an operator would."""
        port = URL(server.url).port
        assert port is not None
        await self.stop(server)
        fresh, _ = await self.start(port, **config)
        return fresh


@pytest.fixture
async def lighthouses() -> AsyncIterator[Lighthouses]:
    servers = Lighthouses()
    yield servers
    for server in list(servers.running):
        await servers.stop(server)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., AsyncLighthouseClient]]:
    made: list[AsyncLighthouseClient] = []

    def make(addresses: str | list[str], **kwargs: Any) -> AsyncLighthouseClient:
        made.append(AsyncLighthouseClient(addresses, **kwargs))
        return made[-1]

    yield make
    for client in made:
        await client.close()


# -- the real server -------------------------------------------------------------------------


async def test_two_clients_join_the_same_quorum(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    _, url = await lighthouses.start(min_replicas=2)
    a, b = clients(url), clients(url)
    qa, qb = await asyncio.gather(
        a.join(Member("a", address="http://a", step=3), timeout=5),
        b.join(Member("b", address="http://b", step=1), timeout=5),
    )
    assert qa == qb
    assert qa.replica_ids == ("a", "b")
    assert [m.step for m in qa.members] == [3, 1]
    assert qa.members[0].address == "http://a"


async def test_fails_over_from_a_dead_address_and_stays_on_the_live_one(
    lighthouses: Lighthouses,
    clients: Callable[..., AsyncLighthouseClient],
    dead_address: str,
    tmp_path: Path,
) -> None:
    # Several addresses are a highly available set: its lighthouses share a lease.
    _, url = await lighthouses.start(lease=str(tmp_path / "lease"))
    client = clients([dead_address, url])
    with capture_logs() as logs:
        quorum = await client.join(Member("a"), timeout=5)
        await client.heartbeat("a")
        status = await client.status()
    assert quorum.replica_ids == ("a",)
    assert status["quorum_id"] == quorum.quorum_id
    # Exactly one retry, logged with the address that failed: later requests
    # start from the address that worked.
    # At debug level: what a person sees is the one line per few seconds on stderr.
    [warning] = [e for e in logs if e["event"] == RETRY_WARNING]
    assert warning["log_level"] == "debug"
    assert (warning["request"], warning["address"], warning["attempt"]) == ("join", dead_address, 1)
    assert "ClientConnectorError" in warning["cause"]


async def test_no_reachable_address_is_unavailable(
    clients: Callable[..., AsyncLighthouseClient], dead_address: str
) -> None:
    client = clients(dead_address.removeprefix("http://"), retry_deadline=0.2)
    with pytest.raises(LighthouseUnavailable) as info:
        await client.heartbeat("a")
    assert info.value.addresses == (dead_address,)
    assert isinstance(info.value.cause, aiohttp.ClientConnectorError)


async def test_wrong_token_is_unauthorized_everywhere(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    _, url = await lighthouses.start(token="s3cret")
    wrong = clients(url, token="wrong")
    with pytest.raises(Unauthorized):
        await wrong.join(Member("a"), timeout=5)
    with pytest.raises(Unauthorized):
        await wrong.heartbeat("a")
    with pytest.raises(Unauthorized):
        await wrong.liveness("a", Recorder()).start()
    right = clients(url, token="s3cret")
    assert (await right.join(Member("a"), timeout=5)).replica_ids == ("a",)


async def test_quorum_timeout_carries_the_servers_reason(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    _, url = await lighthouses.start(min_replicas=2)
    client = clients(url)
    started = time.monotonic()
    with pytest.raises(QuorumTimeout) as info:
        await client.join(Member("a"), timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 2
    assert "min_replicas" in info.value.reason


async def test_join_survives_a_lighthouse_restart(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    first, url = await lighthouses.start(min_replicas=2)
    a, b = clients(url), clients(url)
    with capture_logs() as logs:
        waiting = asyncio.create_task(a.join(Member("a"), timeout=10))
        await until(lambda: "a" in first.core.joiners())
        second = await lighthouses.restart(first, min_replicas=2)
        assert not waiting.done()
        qb = await b.join(Member("b"), timeout=10)
        qa = await waiting
    assert qa == qb
    assert qa.replica_ids == ("a", "b")
    assert qa.quorum_id == second.core.quorum_id
    assert retries(logs, "join")


async def test_shutdown_answers_waiting_joins_which_then_join_its_successor(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    server, url = await lighthouses.start(min_replicas=2)
    client = clients(url)
    with capture_logs() as logs:
        waiting = asyncio.create_task(client.join(Member("a"), timeout=10))
        await until(lambda: "a" in server.core.joiners())
        await client.shutdown()
        await asyncio.wait_for(server.wait_stopped(), 5)
        assert not waiting.done()
        successor = await lighthouses.restart(server, min_replicas=1)
        quorum = await waiting
    assert quorum.quorum_id == successor.core.quorum_id
    first, *_ = retries(logs, "join")
    assert "LighthouseShuttingDown" in first["cause"]


async def test_closing_a_link_tells_the_survivors_at_once(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    _, url = await lighthouses.start(min_replicas=2, heartbeat_timeout=60.0)
    a, b = clients(url), clients(url)
    seen_a, seen_b = Recorder(), Recorder()
    link_a = a.liveness("a", seen_a, interval=0.05)
    await link_a.start()
    await b.liveness("b", seen_b, interval=0.05).start()
    assert link_a.connected.is_set()
    quorum, _ = await asyncio.gather(a.join(Member("a"), 5), b.join(Member("b"), 5))

    await link_a.stop()
    assert not link_a.connected.is_set()
    # heartbeat_timeout is a minute: only the closed socket can explain this.
    lost = protocol.decode_member_lost(await seen_b.arrival(protocol.EVENT_MEMBER_LOST))
    # Stopped cleanly (a close frame): it left; a process that dies says connection_closed.
    assert (lost.replica_id, lost.cause, lost.quorum_id) == ("a", "left", quorum.quorum_id)


async def test_link_reconnects_after_a_lighthouse_restart(
    lighthouses: Lighthouses, clients: Callable[..., AsyncLighthouseClient]
) -> None:
    first, url = await lighthouses.start()
    link = clients(url).liveness("a", Recorder(), interval=0.05)
    await link.start()
    await until(lambda: "a" in first.core.last_seen())
    second = await lighthouses.restart(first)
    # Nothing but the link tells the new lighthouse that "a" exists.  (The
    # server sees the socket a moment before the client marks itself connected.)
    await until(lambda: "a" in second.core.last_seen() and link.connected.is_set())


@pytest.fixture
def threaded_lighthouse() -> Iterator[str]:
    """A real lighthouse on its own loop thread, for tests that are plain synchronous code."""
    loop = BackgroundLoop("test-lighthouse")
    server = LighthouseServer(server_config(token="s3cret"))
    try:
        yield loop.run(server.start("127.0.0.1", 0), timeout=10)
    finally:
        loop.run(server.stop(), timeout=10)
        loop.close()


def test_blocking_client_from_plain_synchronous_code(threaded_lighthouse: str) -> None:
    url, seen = threaded_lighthouse, Recorder()
    with LighthouseClient(url, token="s3cret") as client:
        client.start_liveness("a", seen, interval=0.05)
        quorum = client.join(Member("a", step=7), timeout=5)
        assert quorum.replica_ids == ("a",)
        client.heartbeat("a")
        assert [r["replica_id"] for r in client.status()["replicas"]] == ["a"]
        assert client.kill("a", reason="drill") is True
        assert seen.wait_for("kill")["reason"] == "drill"
        assert client.kill("nobody") is False
        with LighthouseClient(url, token="wrong") as intruder, pytest.raises(Unauthorized):
            intruder.join(Member("x"), timeout=5)
        client.stop_liveness()
    # close() ended the client's loop thread.
    assert "lighthouse-client" not in {t.name for t in threading.enumerate()}


def test_blocking_call_from_an_event_handler_is_refused(threaded_lighthouse: str) -> None:
    refused: list[BaseException] = []
    with LighthouseClient(threaded_lighthouse, token="s3cret") as client:

        def handler(event: dict[str, Any]) -> None:
            try:
                client.heartbeat("a")
            except RuntimeError as e:
                refused.append(e)
            seen(event)

        seen = Recorder()
        client.start_liveness("a", handler)
        client.kill("a", reason="drill")  # pushes a kill event to the handler
        seen.wait_for("kill")
    assert "deadlock" in str(refused[0])


# -- the scripted stub: every error mapping -----------------------------------------------------


class Stub:
    """A fake lighthouse that answers every request with the next scripted (status, body)."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        self.answers = list(answers)
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        status, body = self.answers[min(self.hits, len(self.answers)) - 1]
        return web.Response(status=status, body=body, content_type=protocol.CONTENT_TYPE)


def error(status: int, code: str) -> tuple[int, bytes]:
    return status, protocol.encode_error(code, f"because {code}")


QUORUM_ANSWER = (
    200,
    # As a lighthouse of a highly available set answers (it holds the lease).
    protocol.pack(
        {"quorum": protocol.encode_quorum(Quorum(4, (Member("a"),), 0.0), 1.5), "lease": True}
    ),
)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Any]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def stub_url(serve: Callable[[web.Application], Any]) -> Callable[[Stub], Any]:
    async def start(stub: Stub) -> str:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", stub.handle)
        url: str = await serve(app)
        return url

    return start


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        (error(504, "timeout"), QuorumTimeout),
        (error(401, "unauthorized"), Unauthorized),
        (error(400, "bad_request"), RequestRejected),
        (error(409, "superseded"), RequestRejected),
        (error(413, "too_large"), RequestRejected),
        (error(500, "internal"), LighthouseHTTPError),
    ],
)
async def test_error_answers_become_typed_errors_without_retry(
    stub_url: Callable[[Stub], Any],
    clients: Callable[..., AsyncLighthouseClient],
    answer: tuple[int, bytes],
    raised: type[LighthouseHTTPError],
) -> None:
    stub = Stub(answer, QUORUM_ANSWER)
    client = clients(await stub_url(stub))
    with pytest.raises(raised) as info:
        await client.join(Member("a"), timeout=5)
    assert type(info.value) is raised
    status, code = answer[0], protocol.decode_error(answer[1])[0]
    assert (info.value.status, info.value.code, info.value.message) == (
        status,
        code,
        f"because {code}",
    )
    assert stub.hits == 1


async def test_overloaded_lighthouse_fails_over_to_the_next(
    stub_url: Callable[[Stub], Any], clients: Callable[..., AsyncLighthouseClient]
) -> None:
    busy, healthy = Stub(error(503, "overloaded")), Stub(QUORUM_ANSWER)
    client = clients([await stub_url(busy), await stub_url(healthy)])
    quorum = await client.join(Member("a"), timeout=5)
    assert (quorum.quorum_id, quorum.replica_ids, quorum.created) == (4, ("a",), 1.5)
    assert (busy.hits, healthy.hits) == (1, 1)


async def test_proxy_errors_are_retried_until_the_deadline(
    stub_url: Callable[[Stub], Any], clients: Callable[..., AsyncLighthouseClient]
) -> None:
    stub = Stub((502, b"<html>bad gateway</html>"))
    client = clients(await stub_url(stub), retry_deadline=0.3)
    with pytest.raises(LighthouseUnavailable) as info:
        await client.heartbeat("a")
    assert isinstance(info.value.cause, LighthouseHTTPError)
    assert info.value.cause.status == 502
    assert "bad gateway" in info.value.cause.message
    assert stub.hits > 1


async def test_shutting_down_is_final_for_short_requests_but_not_for_joins(
    stub_url: Callable[[Stub], Any], clients: Callable[..., AsyncLighthouseClient]
) -> None:
    stub = Stub(error(503, "shutting_down"))
    client = clients(await stub_url(stub))
    with pytest.raises(LighthouseShuttingDown):
        await client.heartbeat("a")
    assert stub.hits == 1
    # A join expects the lighthouse back; it keeps trying until its timeout.
    with pytest.raises(LighthouseShuttingDown):
        await client.join(Member("a"), timeout=0.3)
    assert stub.hits > 2

    restarting = Stub(error(503, "shutting_down"), QUORUM_ANSWER)
    client = clients(await stub_url(restarting))
    assert (await client.join(Member("a"), timeout=5)).quorum_id == 4


async def test_evicted_join_joins_again_on_the_same_lighthouse(
    stub_url: Callable[[Stub], Any],
    clients: Callable[..., AsyncLighthouseClient],
    dead_address: str,
) -> None:
    stub = Stub(error(503, "evicted"), QUORUM_ANSWER)
    client = clients([await stub_url(stub), dead_address])
    assert (await client.join(Member("a"), timeout=5)).quorum_id == 4
    assert stub.hits == 2


async def test_unreadable_answer_is_an_error_not_a_crash(
    stub_url: Callable[[Stub], Any], clients: Callable[..., AsyncLighthouseClient]
) -> None:
    client = clients(await stub_url(Stub((200, b"\xc1 not msgpack"))))
    with pytest.raises(LighthouseError, match="unreadable"):
        await client.kill("a")
    client = clients(await stub_url(Stub((200, protocol.pack({"quorum": {"members": 3}})))))
    with pytest.raises(LighthouseError, match="unreadable quorum"):
        await client.join(Member("a"), timeout=5)


async def test_link_survives_bad_frames_and_a_failing_handler(
    serve: Callable[[web.Application], Any], clients: Callable[..., AsyncLighthouseClient]
) -> None:
    heartbeats = asyncio.Event()

    async def pushes_then_listens(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.query["replica_id"] == "a"
        await ws.send_bytes(b"\xc1 not msgpack")
        await ws.send_str("text is not our protocol")
        await ws.send_bytes(protocol.pack({"no": "type"}))
        await ws.send_bytes(protocol.pack({"type": "kill", "reason": "first"}))
        await ws.send_bytes(protocol.pack({"type": "kill", "reason": "second"}))
        async for frame in ws:
            if protocol.unpack(frame.data)["type"] == "heartbeat":
                heartbeats.set()
        return ws

    app = web.Application()
    app.router.add_get("/v1/ws", pushes_then_listens)
    delivered: list[str] = []
    second = asyncio.Event()

    def handler(event: dict[str, Any]) -> None:
        delivered.append(event["reason"])
        if event["reason"] == "first":
            raise RuntimeError("a bug in the caller's handler")
        second.set()

    link = clients(await serve(app)).liveness("a", handler, interval=0.05)
    with capture_logs() as logs:
        await link.start()
        await asyncio.wait_for(asyncio.gather(second.wait(), heartbeats.wait()), 5)
        await link.stop()
    assert delivered == ["first", "second"]
    events = [e["event"] for e in logs]
    assert events.count("ignoring an unreadable event") == 2
    assert "ignoring a non-binary frame" in events
    assert "liveness event handler failed" in events


def test_addresses_accept_host_port_urls_and_lists() -> None:
    client = AsyncLighthouseClient("h1:1, http://h2:2/ ,https://h3")
    assert client.addresses == ("http://h1:1", "http://h2:2", "https://h3")
    with pytest.raises(ValueError, match="no lighthouse address"):
        AsyncLighthouseClient([" "])
