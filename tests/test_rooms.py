"""Rooms: independent quorums under one lighthouse daemon, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest

from ftwire import protocol
from lighthouse.rooms import RoomsLighthouse, parse_rooms, room_url
from lighthouse.server import ServerConfig
from tests.lighthouse_support import connect, eventually, join, quorum_of
from tests.procs import Proc, process_pool, start_lighthouse

SLOW = 30.0


@pytest.fixture
async def rooms():
    servers: list[RoomsLighthouse] = []

    async def start(names: tuple[str, ...] = ("stage0", "stage1"), **config):
        server = RoomsLighthouse(ServerConfig(**config), names)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def test_each_room_forms_its_own_quorum(rooms, session):
    server = await rooms(min_replicas=2, join_timeout=SLOW)
    s0, s1 = room_url(server.url, "stage0"), room_url(server.url, "stage1")
    # Two replicas in each room: each room's quorum holds its own two only,
    # with ids of its own, while the default room stays empty.
    answers = await asyncio.gather(
        join(session, s0, "a", step=1),
        join(session, s0, "b", step=1),
        join(session, s1, "a", step=7),
        join(session, s1, "c", step=7),
    )
    q0a, q0b, q1a, q1c = map(quorum_of, answers)
    assert q0a == q0b and q0a.replica_ids == ("a", "b")
    assert q1a == q1c and q1a.replica_ids == ("a", "c")
    assert {m.step for m in q1a.members} == {7}
    status = await (await session.get(server.url + "/status")).json()
    assert status["previous_quorum"] is None
    assert status["rooms"]["stage0"]["members"] == ["a", "b"]
    assert status["rooms"]["stage1"]["members"] == ["a", "c"]
    assert status["rooms"]["stage1"]["path"] == "/rooms/stage1"
    room_status = await (await session.get(s1 + "/status")).json()
    assert [r["replica_id"] for r in room_status["replicas"]] == ["a", "c"]
    dashboard = await session.get(s0 + "/")
    assert dashboard.status == 200 and "text/html" in dashboard.headers["Content-Type"]


async def test_the_default_room_works_as_a_plain_lighthouse(rooms, session):
    server = await rooms(min_replicas=1, join_timeout=SLOW)
    assert quorum_of(await join(session, server.url, "solo")).replica_ids == ("solo",)


async def test_metrics_label_each_room_and_keep_the_default_unlabelled(rooms, session):
    server = await rooms(min_replicas=1, join_timeout=SLOW)
    quorum_of(await join(session, room_url(server.url, "stage1"), "a"))
    text = await (await session.get(server.url + "/metrics")).text()
    assert text.count("# TYPE lighthouse_quorums_formed_total counter") == 1
    assert "lighthouse_quorums_formed_total 0.0" in text
    assert 'lighthouse_quorums_formed_total{room="stage0"} 0.0' in text
    assert 'lighthouse_quorums_formed_total{room="stage1"} 1.0' in text
    room_text = await (await session.get(room_url(server.url, "stage1") + "/metrics")).text()
    assert "lighthouse_quorums_formed_total 1.0" in room_text


async def test_an_unknown_room_is_a_404_naming_the_rooms(rooms, session):
    server = await rooms()
    body = protocol.encode_join(protocol.decode_member({"replica_id": "a"}), 1.0)
    async with session.post(room_url(server.url, "stag0") + "/v1/join", data=body) as r:
        assert r.status == 404
        answer = protocol.unpack(await r.read())
    assert answer["error"] == "no_such_room"
    assert "stage0, stage1" in answer["message"]


async def test_peers_lists_live_members_with_their_join_info(rooms, session):
    server = await rooms(min_replicas=1, join_timeout=SLOW, token="t")
    s0 = room_url(server.url, "stage0")
    auth = {"Authorization": "Bearer t", "Accept": "application/json"}
    ws = await connect(session, s0, "a", token="t")
    quorum_of(await join(session, s0, "a", token="t", data={"info": {"swarm": "http://a:1"}}))
    async with session.get(s0 + "/v1/peers") as r:
        assert r.status == 401
    peers = await (await session.get(s0 + "/v1/peers", headers=auth)).json()
    assert peers["peers"] == [{"replica_id": "a", "step": 0, "info": {"swarm": "http://a:1"}}]
    # The process dies: its socket closes and it leaves the list at once.
    await ws.close(code=aiohttp.WSCloseCode.ABNORMAL_CLOSURE)

    async def until_gone() -> None:
        while (await (await session.get(s0 + "/v1/peers", headers=auth)).json())["peers"]:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until_gone(), 5)


async def test_a_shutdown_through_a_room_stops_the_daemon(rooms, session):
    server = await rooms(min_replicas=2, join_timeout=SLOW)
    waiting = asyncio.ensure_future(join(session, room_url(server.url, "stage1"), "a"))
    await eventually(lambda: bool(server.rooms["stage1"].core.joiners()))
    async with session.post(room_url(server.url, "stage0") + "/v1/shutdown") as r:
        assert r.status == 200
    await asyncio.wait_for(server.wait_stopped(), 10)
    status, _ = await waiting
    assert status == 503


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "at least one"), ("a,a", "repeat"), ("a/b", "letters"), ("-x", "letters")],
)
def test_bad_room_names_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_rooms(text)


def test_rooms_and_a_lease_are_refused_together(tmp_path):
    with pytest.raises(ValueError, match="lease"):
        RoomsLighthouse(ServerConfig(lease=str(tmp_path / "lease")), ("a",))


def test_the_daemon_serves_the_rooms_given_on_its_command_line():
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--rooms", "stage0,stage1")
        bad = Proc("bad", [sys.executable, "-m", "lighthouse.cli", "--rooms", "a,,a"])
        procs.append(bad)
        assert bad.wait(30) == 2
        assert "--rooms: room names repeat" in bad.tail()

        async def status() -> dict:
            async with aiohttp.ClientSession() as s, s.get(url + "/status") as r:
                return await r.json()

        assert sorted(asyncio.run(status())["rooms"]) == ["stage0", "stage1"]
