"""DESIGN invariant I6: any bytes sent to any endpoint get a clear error, never a
crash, a hang or unbounded memory -- and the daemon serves a normal join afterwards."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest

from lighthouse import protocol
from lighthouse.server import WS_MAX_FRAME_BYTES, LighthouseServer, _Connection
from tests.lighthouse_support import (
    Lighthouses,
    connect,
    eventually,
    heartbeat,
    join,
    post,
    quorum_of,
)


@pytest.fixture
async def server(lighthouses: Lighthouses) -> LighthouseServer:
    return await lighthouses.start(max_body_bytes=4096)


async def still_serves(session: aiohttp.ClientSession, server: LighthouseServer) -> None:
    assert quorum_of(await join(session, server.url, "healthy")).replica_ids == ("healthy",)


def raw(message: object) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def join_fields(**fields: object) -> bytes:
    return raw({"v": 1, "replica_id": "r", **fields})


BAD_BODIES = {
    "empty": (b"", "not valid msgpack"),
    "not msgpack": (b"\xc1\xc1\xc1", "not valid msgpack"),
    "truncated": (protocol.encode_join(protocol.Member("r"), 1.0)[:-3], "not valid msgpack"),
    "trailing bytes": (protocol.pack({"replica_id": "r"}) + b"\x00", "not valid msgpack"),
    "not a map": (raw([1, 2, 3]), "must be a map"),
    "no version": (raw({"replica_id": "r"}), "unsupported protocol version None"),
    "future version": (raw({"v": 2, "replica_id": "r"}), "unsupported protocol version 2"),
    "missing replica_id": (raw({"v": 1}), "missing field 'replica_id'"),
    "empty replica_id": (join_fields(replica_id=""), "must not be empty"),
    "replica_id too long": (join_fields(replica_id="x" * 300), "longer than 256"),
    "replica_id not text": (join_fields(replica_id=7), "'replica_id' must be str, got int"),
    "step is a bool": (join_fields(step=True), "'step' must be int, got bool"),
    "negative step": (join_fields(step=-1), "'step' must be >= 0"),
    "timeout is text": (join_fields(timeout_ms="soon"), "'timeout_ms' must be int"),
    "zero timeout": (join_fields(timeout_ms=0), "'timeout_ms' must be >= 1"),
    "data not a map": (join_fields(data=[1]), "'data' must be dict"),
    "non-string map key": (raw({1: 2, "v": 1}), "not valid msgpack"),
}


@pytest.mark.parametrize("body, expected", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_a_malformed_join_gets_400_with_the_reason(session, server, body, expected):
    status, answer = await post(session, server.url, "/v1/join", body)
    assert (status, answer["error"]) == (400, "bad_request")
    assert expected in answer["message"]
    await still_serves(session, server)


async def test_json_instead_of_msgpack_names_the_content_type(session, server):
    status, answer = await post(
        session,
        server.url,
        "/v1/join",
        b'{"v": 1, "replica_id": "r"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    assert "application/json" in answer["message"]
    assert protocol.CONTENT_TYPE in answer["message"]
    await still_serves(session, server)


@pytest.mark.parametrize("path", ["/v1/join", "/v1/heartbeat", "/v1/kill", "/v1/shutdown"])
async def test_an_oversized_body_gets_413(session, server, path):
    status, answer = await post(session, server.url, path, b"\x00" * 4097)
    assert (status, answer["error"]) == (413, "too_large")
    assert "4096" in answer["message"]
    await still_serves(session, server)


async def test_an_oversized_chunked_body_without_a_length_gets_413(session, server):
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"\x00" * 1024

    async with session.post(server.url + "/v1/join", data=chunks()) as response:
        assert response.status == 413
        assert protocol.decode_error(await response.read())[0] == "too_large"
    await still_serves(session, server)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/heartbeat", b"garbage"),
        ("/v1/heartbeat", protocol.pack({})),
        ("/v1/kill", protocol.pack({"replica_id": 3})),
        ("/v1/kill", protocol.pack({"replica_id": "r", "reason": "x" * 2000})),
        ("/v1/shutdown", b"\xff\xff"),
    ],
)
async def test_malformed_control_and_heartbeat_bodies_get_400(session, server, path, body):
    status, answer = await post(session, server.url, path, body)
    assert (status, answer["error"]) == (400, "bad_request")
    assert answer["message"]
    assert not server.stopped.is_set()
    await still_serves(session, server)


async def test_random_bytes_never_get_anything_but_400(session, server):
    rng = random.Random(6)
    valid = protocol.encode_join(protocol.Member("r", step=3, data={"k": [1, 2]}), 5.0)
    for _ in range(200):
        if rng.random() < 0.5:
            body = rng.randbytes(rng.randrange(64))
        else:  # a valid message with a few bytes flipped: the nastier case
            flipped = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            body = bytes(flipped)
        status, answer = await post(session, server.url, "/v1/heartbeat", body)
        assert status in (200, 400), (body, answer)
    # Some flipped messages are valid heartbeats of made-up replicas, which a
    # join would wait for as stragglers; a heartbeat shows the daemon is fine.
    assert (await heartbeat(session, server.url, "healthy"))[0] == 200


async def test_bad_http_and_unknown_routes_get_4xx(session, server):
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x16\x03\x01 not http at all\r\n\r\n")
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"400"

    async with session.get(server.url + "/v1/nope") as response:
        assert response.status == 404
    async with session.get(server.url + "/v1/join") as response:
        assert response.status == 405
    await still_serves(session, server)


async def test_an_unexpected_error_gets_500_with_a_message(session, server, monkeypatch):
    def broken(rid: str, now: float, **liveness: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.core, "heartbeat", broken)
    status, answer = await post(
        session, server.url, "/v1/heartbeat", protocol.encode_heartbeat("r")
    )
    assert (status, answer["error"]) == (500, "internal")
    assert "RuntimeError: disk on fire" in answer["message"]
    await still_serves(session, server)


@pytest.mark.parametrize(
    "query, expected",
    [({}, "missing query parameter 'replica_id'"), ({"replica_id": "x" * 300}, "longer than 256")],
)
async def test_a_websocket_without_a_valid_replica_id_gets_400(session, server, query, expected):
    async with session.get(server.url + "/v1/ws", params=query) as response:
        assert response.status == 400
        assert expected in protocol.decode_error(await response.read())[1]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(server.url + "/v1/ws", params=query)
    assert refused.value.status == 400
    await still_serves(session, server)


@pytest.mark.parametrize(
    "frame, code",
    [
        ("text, not binary", aiohttp.WSCloseCode.POLICY_VIOLATION),
        (b"\xc1 not msgpack", aiohttp.WSCloseCode.POLICY_VIOLATION),
        (raw({"v": 9, "type": "heartbeat"}), aiohttp.WSCloseCode.POLICY_VIOLATION),
        (b"\x00" * (WS_MAX_FRAME_BYTES + 1), aiohttp.WSCloseCode.MESSAGE_TOO_BIG),
    ],
    ids=["text", "garbage", "bad version", "oversized"],
)
async def test_a_malformed_frame_closes_only_that_websocket(session, server, frame, code):
    bystander = await connect(session, server.url, "bystander")
    ws = await connect(session, server.url, "r")
    if isinstance(frame, str):
        await ws.send_str(frame)
    else:
        await ws.send_bytes(frame)
    closing = await ws.receive(timeout=5)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == code
    await eventually(lambda: "r" not in server.core.last_seen())
    assert "bystander" in server.core.last_seen()
    assert not bystander.closed
    await bystander.close()
    await still_serves(session, server)


async def test_a_websocket_flood_is_capped_and_released(lighthouses, session):
    server = await lighthouses.start(max_connections=50)
    attempts = await asyncio.gather(
        *(connect(session, server.url, f"r{i}") for i in range(100)), return_exceptions=True
    )
    opened = [ws for ws in attempts if isinstance(ws, aiohttp.ClientWebSocketResponse)]
    refused = [e for e in attempts if isinstance(e, aiohttp.WSServerHandshakeError)]
    assert (len(opened), len(refused)) == (50, 50)
    assert {e.status for e in refused} == {503}
    async with session.get(server.url + "/v1/ws", params={"replica_id": "one more"}) as response:
        assert response.status == 503
        code, message = protocol.decode_error(await response.read())
    assert code == "overloaded"
    assert "the limit is 50" in message

    await asyncio.gather(*(ws.close() for ws in opened))
    await eventually(lambda: server.status()["connections"]["open"] == 0)
    assert server.core.last_seen() == {}  # every closed socket's replica was dropped
    await still_serves(session, server)


async def test_a_join_flood_is_capped_and_every_waiter_is_answered(lighthouses, session):
    server = await lighthouses.start(max_connections=5, min_replicas=10, join_timeout=30.0)
    waiting = [asyncio.create_task(join(session, server.url, f"r{i}")) for i in range(5)]
    await eventually(lambda: len(server.core.joiners()) == 5)
    status, answer = await join(session, server.url, "one too many")
    assert (status, answer["error"]) == (503, "overloaded")

    await server.stop()
    answers = await asyncio.gather(*waiting)
    assert {(status, body["error"]) for status, body in answers} == {(503, "shutting_down")}


class _UnreadSocket:
    """A WebSocket whose peer never reads: every send blocks forever."""

    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def send_bytes(self, frame: bytes) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int, message: bytes) -> bool:
        self.closed_with = code
        return True


async def test_a_replica_that_stops_reading_is_disconnected_not_buffered():
    ws = _UnreadSocket()
    conn = _Connection("r", ws)  # type: ignore[arg-type]
    for _ in range(10_000):
        conn.push(b"event")
    await eventually(lambda: ws.closed_with is not None)
    assert ws.closed_with == aiohttp.WSCloseCode.POLICY_VIOLATION
    conn.discard()
