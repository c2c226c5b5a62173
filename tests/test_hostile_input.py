"""DESIGN invariant I6: any bytes sent to any endpoint get a clear error, never a
crash, a hang or unbounded memory -- and the daemon serves a normal join afterwards."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

import aiohttp
import msgpack
import pytest
import torch
from aiohttp import web

from ftdiloco.coordination.group import GroupGather
from ftdiloco.coordination.process_group import RendezvousStore, host_store
from ftdiloco.state.heal import StateServer
from ftwire import guard, protocol
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
from tests.procs import process_pool, start_lighthouse


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


# -- issue 11: what a fuzzing run found -------------------------------------------------


def nested(depth: int, leaf: object = 0) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


async def test_a_deeply_nested_join_is_refused_and_never_blocks_the_others(lighthouses, session):
    """Finding 1: the hostile join decoded, then its quorum could not be packed."""
    server = await lighthouses.start(min_replicas=2, join_timeout=30.0)
    hostile = join_fields(data={"x": nested(1000)}, timeout_ms=5000)
    status, answer = await post(session, server.url, "/v1/join", hostile)
    assert (status, answer["error"]) == (400, "bad_request")
    assert "nested deeper than" in answer["message"]
    honest = await asyncio.wait_for(
        asyncio.gather(join(session, server.url, "a"), join(session, server.url, "b")), 10
    )
    assert [quorum_of(a).replica_ids for a in honest] == [("a", "b")] * 2


async def test_free_form_data_is_bounded_so_every_quorum_can_be_answered(lighthouses, session):
    server = await lighthouses.start()
    big = {"blob": b"\x00" * (protocol.MAX_DATA_BYTES + 1)}
    status, answer = await post(session, server.url, "/v1/join", join_fields(data=big))
    assert (status, answer["error"]) == (400, "bad_request")
    assert "'data' packs into" in answer["message"]
    await still_serves(session, server)


@pytest.mark.parametrize("path", ["/v1/join", "/v1/heartbeat", "/v1/fence", "/v1/kill"])
async def test_a_deeply_nested_version_gets_400_not_500(session, server, path):
    """Finding 2: formatting the error for a deep "v" raised RecursionError."""
    status, answer = await post(session, server.url, path, raw({"v": nested(1020)}))
    assert (status, answer["error"]) == (400, "bad_request")
    await still_serves(session, server)


@pytest.mark.parametrize("version", [True, 1.0, "1", [1]], ids=["bool", "float", "text", "list"])
async def test_the_version_check_is_type_strict(session, server, version):
    """Finding 7: True and 1.0 passed as version 1."""
    status, answer = await post(
        session, server.url, "/v1/heartbeat", raw({"v": version, "replica_id": "r"})
    )
    assert (status, answer["error"]) == (400, "bad_request")
    assert "unsupported protocol version" in answer["message"]


@pytest.mark.parametrize("path", ["/v1/join", "/v1/heartbeat", "/v1/kill"])
async def test_a_bogus_content_encoding_gets_400(session, server, path):
    """Finding 3: a body that claims gzip and is not."""
    status, answer = await post(
        session, server.url, path, b"not gzip at all", headers={"Content-Encoding": "gzip"}
    )
    assert (status, answer["error"]) == (400, "bad_request")
    assert "content-encoding" in answer["message"].lower()
    await still_serves(session, server)


@pytest.mark.parametrize(
    "limit, message",
    [
        (raw({"v": 1, "replica_id": "r", "data": {"k": list(range(5000))}}), "max_array_len"),
        (raw({"v": 1, "replica_id": "r", "data": {str(i): i for i in range(5000)}}), "max_map_len"),
        (raw({"v": 1, "replica_id": "r", "data": {"s": "x" * 70_000}}), "max_str_len"),
        (b"\x82\xa1v\x01\xa1t\xd6\xff\x00\x00\x00\x00", "not valid msgpack"),
    ],
    ids=["long array", "many keys", "long string", "ext type"],
)
async def test_limits_hold_at_decode_time(lighthouses, session, limit, message):
    server = await lighthouses.start()
    status, answer = await post(session, server.url, "/v1/join", limit)
    assert (status, answer["error"]) == (400, "bad_request")
    assert message in answer["message"]


TOKEN = "s3cret"


class GroupServer:
    """A group rank 0's server as the manager builds it: the group round, the
    heal routes and the rendezvous store, all with the token set."""

    def __init__(self, gather: GroupGather, url: str, store: RendezvousStore) -> None:
        self.gather = gather
        self.url = url
        self.store = store


@pytest.fixture
async def group_server() -> AsyncIterator[GroupServer]:
    async def decide_quorum(values: dict[int, dict[str, object]]) -> dict[str, object]:
        # What the manager's decision reads of the values, unchecked.
        return {"step": max(int(v["step"]) for v in values.values())}  # type: ignore[call-overload]

    async def decide_vote(values: dict[int, dict[str, object]]) -> dict[str, object]:
        return {"commit": all(v["ok"] for v in values.values())}

    gather = GroupGather(2, {"quorum": decide_quorum, "vote": decide_vote})
    app = web.Application()
    StateServer(TOKEN).add_routes(app)
    gather.add_routes(app, lambda request: guard.request_token_ok(request, TOKEN))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    store = await asyncio.to_thread(host_store, "127.0.0.1", 0, 5.0, TOKEN)
    yield GroupServer(gather, f"http://127.0.0.1:{port}", store)
    await asyncio.to_thread(store.close)
    await runner.cleanup()


def group_round(kind: str, rank: int, value: object, timeout_ms: int = 5000) -> bytes:
    return protocol.pack(
        {"kind": kind, "round": 1, "rank": rank, "value": value, "timeout_ms": timeout_ms}
    )


@pytest.mark.parametrize(
    "kind, value, named",
    [
        ("quorum", {"history": "h", "commit_failures": 0, "heal": "x", "dirty": False}, "step"),
        (
            "quorum",
            {"step": "7", "history": "", "commit_failures": 0, "heal": "", "dirty": False},
            "step",
        ),
        ("vote", {}, "ok"),
        ("vote", {"ok": 1}, "ok"),
    ],
)
async def test_a_malformed_round_value_is_that_ranks_400(session, group_server, kind, value, named):
    """Finding 6: the value reached the decision and failed everyone's round with 503."""
    honest_value = (
        {"step": 3, "history": "", "commit_failures": 0, "heal": "x", "dirty": False}
        if kind == "quorum"
        else {"ok": True}
    )
    honest = asyncio.create_task(group_server.gather.contribute(kind, 1, 0, honest_value, 10.0))
    status, answer = await post(
        session, group_server.url, "/v1/group/round", group_round(kind, 1, value), TOKEN
    )
    assert (status, answer["error"]) == (400, "bad_request")
    assert repr(named) in answer["message"]
    # The round is not poisoned: the rank sends a good value and both get the answer.
    status, answer = await post(
        session, group_server.url, "/v1/group/round", group_round(kind, 1, honest_value), TOKEN
    )
    assert status == 200, answer
    assert (await asyncio.wait_for(honest, 5)) == {k: v for k, v in answer.items() if k != "v"}


async def test_the_group_round_survives_deep_nesting_and_bogus_encodings(session, group_server):
    """Findings 2 and 3 on the manager's server."""
    url = group_server.url + "/v1/group/round"
    status, answer = await post(
        session, group_server.url, "/v1/group/round", raw({"v": nested(1020)}), TOKEN
    )
    assert (status, answer["error"]) == (400, "bad_request")
    async with session.post(
        url, data=b"junk", headers={"Content-Encoding": "gzip", **guard.authorization(TOKEN)}
    ) as response:
        assert response.status == 400
        code, message = protocol.decode_error(await response.read())
    assert code == "bad_request"
    assert "content-encoding" in message.lower()


AUTH_HEADERS = {
    "exact": (f"Bearer {TOKEN}", True),
    "lower-case scheme": (f"bearer {TOKEN}", True),
    "upper-case scheme": (f"BEARER {TOKEN}", True),
    "two spaces": (f"Bearer  {TOKEN}", True),
    "no header": (None, False),
    "no scheme": (TOKEN, False),
    "other scheme": (f"Basic {TOKEN}", False),
    "no space": (f"Bearer{TOKEN}", False),
    "tab": (f"Bearer\t{TOKEN}", False),
    "scheme only": ("Bearer", False),
    "wrong token": ("Bearer guess", False),
    "token prefix": (f"Bearer {TOKEN[:-1]}", False),
    "token and more": (f"Bearer {TOKEN}x", False),
}


@pytest.mark.parametrize("header, accepted", AUTH_HEADERS.values(), ids=AUTH_HEADERS.keys())
async def test_one_token_check_everywhere(lighthouses, session, group_server, header, accepted):
    """Finding 9: the lighthouse took forms the manager and heal servers refused."""
    server = await lighthouses.start(token=TOKEN)
    headers = {} if header is None else {"Authorization": header}
    requests = {
        "lighthouse": ("POST", server.url + "/v1/heartbeat", protocol.encode_heartbeat("r")),
        "group round": (
            "POST",
            group_server.url + "/v1/group/round",
            group_round("vote", 1, {"ok": True}, 1),
        ),
        "heal": ("GET", group_server.url + "/v1/heal/manifest?step=0", None),
        "store": (
            "POST",
            f"http://{group_server.store.address}/v1/store",
            protocol.pack({"op": "num_keys"}),
        ),
    }
    authorized = {}
    for name, (method, url, body) in requests.items():
        async with session.request(method, url, data=body, headers=headers) as response:
            authorized[name] = response.status != 401
    assert authorized == dict.fromkeys(requests, accepted)


def outward_address() -> str | None:
    """This machine's address on its default route, if it has one besides loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


async def test_the_store_listens_only_on_the_configured_host(group_server):
    """Finding 5: torch's TCPStore listened on every interface despite FTDILOCO_HOST."""
    outward = outward_address()
    if outward is None:
        pytest.skip("this machine has no address besides loopback")
    with pytest.raises(OSError):
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(outward, group_server.store.port), 5
        )
        writer.close()


async def test_the_store_serves_nobody_without_the_token(session, group_server):
    """Finding 5: anyone who reached the port could read and write the rendezvous keys."""
    url = f"http://{group_server.store.address}/v1/store"
    ops = [
        {"op": "set", "key": "k", "value": b"evil"},
        {"op": "get", "key": "k", "timeout_ms": 0},
        {"op": "add", "key": "n", "amount": 1},
        {"op": "num_keys"},
        {"op": "delete", "key": "k"},
    ]
    for op in ops:
        for headers in ({}, {"Authorization": "Bearer guess"}):
            async with session.post(url, data=protocol.pack(op), headers=headers) as response:
                assert response.status == 401, op
    async with session.post(
        url, data=protocol.pack({"op": "num_keys"}), headers=guard.authorization(TOKEN)
    ) as response:
        assert protocol.unpack(await response.read())["count"] == 0  # nothing was written

    # A process group built with the wrong token fails at once, saying why.
    from ftdiloco.coordination import process_group

    with pytest.raises(Exception, match="401 unauthorized"):
        await asyncio.to_thread(
            process_group.connect,
            backend="gloo",
            store_address=group_server.store.address,
            prefix="q1",
            rank=0,
            world_size=2,
            timeout=5.0,
            host="127.0.0.1",
            token="guess",
        )


def test_the_store_rendezvous_builds_a_working_group_with_the_token():
    from ftdiloco.coordination import process_group

    store = host_store("127.0.0.1", 0, 10.0, TOKEN)
    sums: dict[int, list[float]] = {}

    def member(rank: int) -> None:
        group = process_group.connect(
            backend="gloo",
            store_address=store.address,
            prefix="q7",
            rank=rank,
            world_size=2,
            timeout=10.0,
            host="127.0.0.1",
            token=TOKEN,
        )
        tensor = torch.full((3,), float(rank + 1))
        group.allreduce([tensor]).wait()
        sums[rank] = tensor.tolist()

    try:
        threads = [threading.Thread(target=member, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        store.close()
    assert sums == {0: [3.0] * 3, 1: [3.0] * 3}


def test_json_logs_stay_json_under_hostile_traffic():
    """Finding 8: aiohttp's own error reports were plain-text tracebacks."""
    with process_pool() as procs:
        proc, url = start_lighthouse(procs, "--log-format", "json")

        async def attack() -> None:
            async with aiohttp.ClientSession() as session:
                for path in ("/v1/join", "/v1/heartbeat", "/v1/kill"):
                    for _ in range(3):
                        async with session.post(
                            url + path, data=b"junk", headers={"Content-Encoding": "gzip"}
                        ) as response:
                            assert response.status == 400
                    async with session.post(url + path, data=raw({"v": nested(1020)})) as response:
                        assert response.status == 400
                async with session.post(url + "/v1/join", data=b"\x00" * (2 << 20)) as response:
                    assert response.status == 413
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"\x16\x03\x01 not http\r\n\r\n")
            await reader.read()
            writer.close()

        asyncio.run(attack())
        # Marks the end of the traffic's log lines: this one is logged last.
        asyncio.run(_kill_unknown(url))
        proc.wait_for("replica killed by operator", timeout=10)
        lines = [line for line in proc.output if "listening on" not in line]
    assert lines
    for line in lines:
        json.loads(line)  # raises on anything but one JSON object per line


async def _kill_unknown(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        await post(session, url, "/v1/kill", protocol.encode_kill("nobody", "end of test"))


def test_standard_library_records_are_rendered_as_json():
    code = (
        "import logging; from ftwire import logs; logs.configure('json');"
        "logging.getLogger('aiohttp.server')"
        ".error('Error handling request', exc_info=ValueError('x'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    record = json.loads(result.stderr)
    assert record["logger"] == "aiohttp.server"
    assert record["level"] == "error"
    assert "ValueError: x" in record["exception"]
