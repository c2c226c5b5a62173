"""The lighthouse daemon over real HTTP and WebSockets on loopback.

Timeouts are short so that the slow paths (stragglers, silent hosts) run in a
fraction of a second; the fast paths are checked against timeouts long enough
that taking the slow path instead would fail the test.
"""

from __future__ import annotations

import asyncio
import time
import zlib

import aiohttp
import pytest

from ftwire import protocol
from ftwire.messages import Member
from lighthouse.quorum import Update
from lighthouse.server import ServerConfig
from lighthouse.timeline import member_pace
from tests.lighthouse_support import (
    connect,
    eventually,
    heartbeat,
    join,
    next_event,
    post,
    quorum_of,
)

# Long enough that a quorum formed "quickly" cannot have waited for it.
SLOW = 30.0


async def send_heartbeats(ws: aiohttp.ClientWebSocketResponse, every: float) -> None:
    """What a live replica does: a frame every interval, for as long as it runs."""
    while True:
        await ws.send_bytes(protocol.pack({"type": protocol.EVENT_HEARTBEAT}))
        await asyncio.sleep(every)


async def test_two_replicas_get_the_same_quorum(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW)
    a, b = await asyncio.gather(
        join(session, server.url, "a", step=3, address="http://a:1", store_address="a:2"),
        join(session, server.url, "b", step=3, address="http://b:1", data={"rank": 0}),
    )
    qa, qb = quorum_of(a), quorum_of(b)
    assert qa == qb
    assert qa.replica_ids == ("a", "b")
    assert qa.quorum_id == server.epoch + 1
    assert qa.members[0].address == "http://a:1"
    assert qa.members[0].store_address == "a:2"
    assert qa.members[1].data == {"rank": 0}
    assert abs(qa.created - time.time()) < 5


async def test_a_large_answer_is_sent_deflated_to_whoever_accepts_it(lighthouses):
    """Compressed once per quorum; a client that does not accept deflate gets it plain."""
    server = await lighthouses.start(min_replicas=3, join_timeout=SLOW)
    accepts = {"a": "gzip, deflate", "b": "identity", "c": "deflate;q=0, gzip"}

    async def raw_join(rid: str) -> tuple[str, bytes]:
        body = protocol.encode_join(Member(rid, address=f"http://{rid * 800}:1"), SLOW)
        headers = {"Content-Type": protocol.CONTENT_TYPE, "Accept-Encoding": accepts[rid]}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as raw,
            raw.post(server.url + "/v1/join", data=body, headers=headers) as response,
        ):
            assert response.status == 200
            return response.headers.get("Content-Encoding", ""), await response.read()

    (enc_a, a), (enc_b, b), (enc_c, c) = await asyncio.gather(*map(raw_join, accepts))
    assert (enc_a, enc_b, enc_c) == ("deflate", "", "")
    assert zlib.decompress(a) == b == c
    assert len(a) < len(b) / 10
    assert protocol.decode_quorum(protocol.unpack(b)["quorum"]).replica_ids == ("a", "b", "c")


async def test_join_timeout_answers_504_with_the_reason(lighthouses, session):
    server = await lighthouses.start(min_replicas=2)
    started = time.monotonic()
    status, body = await join(session, server.url, "a", timeout=0.2)
    assert status == 504
    assert body["error"] == "timeout"
    assert "min_replicas is 2" in body["message"]
    assert 0.2 <= time.monotonic() - started < SLOW
    assert server.core.joiners() == {}  # withdrawn, so it cannot count towards a later quorum


async def test_quorum_forms_without_a_straggler_after_the_join_timeout(lighthouses, session):
    server = await lighthouses.start(join_timeout=0.3, heartbeat_timeout=SLOW)
    assert (await heartbeat(session, server.url, "straggler"))[0] == 200
    started = time.monotonic()
    a, b = await asyncio.gather(join(session, server.url, "a"), join(session, server.url, "b"))
    waited = time.monotonic() - started
    assert quorum_of(a) == quorum_of(b)
    assert quorum_of(a).replica_ids == ("a", "b")
    assert 0.3 <= waited < SLOW


async def test_a_closed_websocket_is_lost_at_once(lighthouses, session):
    server = await lighthouses.start(min_replicas=1, join_timeout=SLOW, heartbeat_timeout=SLOW)
    ws_a = await connect(session, server.url, "a")
    ws_b = await connect(session, server.url, "b")
    first = quorum_of(
        (await asyncio.gather(join(session, server.url, "a"), join(session, server.url, "b")))[0]
    )
    assert first.replica_ids == ("a", "b")

    await ws_b.close()  # a close frame: b left (a dead process sends none: connection_closed)
    # The first event on the socket: the quorum came with the join answer only.
    lost = protocol.decode_member_lost(await next_event(ws_a))
    assert lost == protocol.MemberLost("b", "left", first.quorum_id)
    started = time.monotonic()
    second = quorum_of(await join(session, server.url, "a"))
    assert second.replica_ids == ("a",)
    assert second.quorum_id > first.quorum_id
    assert time.monotonic() - started < SLOW / 10


async def test_a_silent_replica_is_evicted_after_the_heartbeat_timeout(lighthouses, session):
    server = await lighthouses.start(heartbeat_timeout=0.75, join_timeout=SLOW)
    ws = await connect(session, server.url, "alive")
    beating = asyncio.create_task(send_heartbeats(ws, every=0.05))
    try:
        assert (await heartbeat(session, server.url, "silent"))[0] == 200
        answers = await asyncio.gather(
            join(session, server.url, "alive"), join(session, server.url, "silent")
        )
        formed = quorum_of(answers[0])
        assert formed.replica_ids == ("alive", "silent")
        lost = protocol.decode_member_lost(await next_event(ws))
        assert lost == protocol.MemberLost("silent", "heartbeat_timeout", formed.quorum_id)
        assert set(server.core.last_seen()) == {"alive"}
    finally:
        beating.cancel()


async def test_a_newer_join_supersedes_the_waiting_one(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW)
    older = asyncio.create_task(join(session, server.url, "a", step=1))
    await eventually(lambda: "a" in server.core.joiners())
    newer = asyncio.create_task(join(session, server.url, "a", step=2))
    status, body = await older
    assert (status, body["error"]) == (409, "superseded")
    b = await join(session, server.url, "b")
    formed = quorum_of(await newer)
    assert formed == quorum_of(b)
    assert formed.members[0].step == 2


async def test_a_joiner_left_out_by_shrink_only_keeps_waiting(lighthouses, session):
    server = await lighthouses.start(join_timeout=SLOW)
    quorum_of(await join(session, server.url, "a"))
    newcomer = asyncio.create_task(join(session, server.url, "b"))
    await eventually(lambda: "b" in server.core.joiners())
    shrunk = quorum_of(await join(session, server.url, "a", shrink_only=True))
    assert shrunk.replica_ids == ("a",)
    assert not newcomer.done()
    grown = quorum_of(await join(session, server.url, "a"))
    assert grown.replica_ids == ("a", "b")
    assert quorum_of(await newcomer) == grown


async def test_a_waiting_replica_that_is_evicted_is_told_to_join_again(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW)
    ws = await connect(session, server.url, "a")
    waiting = asyncio.create_task(join(session, server.url, "a"))
    await eventually(lambda: "a" in server.core.joiners())
    await ws.close()
    status, body = await waiting
    assert (status, body["error"]) == (503, "evicted")
    assert "(left)" in body["message"]


async def test_a_client_that_hangs_up_withdraws_its_join(lighthouses):
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW)
    impatient = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=impatient) as session:
        with pytest.raises(asyncio.TimeoutError):
            await join(session, server.url, "a", timeout=SLOW)
    await eventually(lambda: not server.core.joiners())
    assert server.status()["connections"]["open"] == 0


async def test_kill_evicts_the_replica_and_tells_it_and_the_others(lighthouses, session):
    server = await lighthouses.start(join_timeout=SLOW, heartbeat_timeout=SLOW)
    victim = await connect(session, server.url, "victim")
    formed = quorum_of(await join(session, server.url, "victim"))

    status, body = await post(
        session, server.url, "/v1/kill", protocol.encode_kill("victim", "bad GPU")
    )
    assert (status, body["ok"], body["known"]) == (200, True, True)
    assert await next_event(victim) == {"v": 1, "type": "kill", "reason": "bad GPU"}
    lost = protocol.decode_member_lost(await next_event(victim))
    assert lost == protocol.MemberLost("victim", "killed", formed.quorum_id)
    assert "victim" not in server.core.last_seen()

    status, body = await post(session, server.url, "/v1/kill", protocol.encode_kill("nobody"))
    assert (status, body["known"]) == (200, False)


async def test_shutdown_answers_waiting_joins_with_503(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW)
    ws = await connect(session, server.url, "b")
    waiting = asyncio.create_task(join(session, server.url, "a"))
    await eventually(lambda: "a" in server.core.joiners())

    status, body = await post(session, server.url, "/v1/shutdown", protocol.pack({}))
    assert (status, body["ok"]) == (200, True)
    status, body = await waiting
    assert (status, body["error"]) == (503, "shutting_down")
    closing = await ws.receive(timeout=5)
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
    await asyncio.wait_for(server.wait_stopped(), 10)
    with pytest.raises(aiohttp.ClientConnectionError):
        await join(session, server.url, "a")


async def test_a_replica_reconnecting_during_shutdown_is_refused_at_once(lighthouses, session):
    server = await lighthouses.start()
    ws = await connect(session, server.url, "a")
    stopping = asyncio.create_task(server.stop())
    assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE
    # What a client's reconnect loop does next; it must fail fast so that the
    # client moves on to the restarted (or another) lighthouse.
    with pytest.raises(aiohttp.ClientConnectorError):
        await asyncio.wait_for(connect(session, server.url, "a"), 5)
    await stopping


async def test_a_token_is_required_when_configured(lighthouses, session):
    server = await lighthouses.start(token="s3cret", join_timeout=SLOW)
    status, body = await join(session, server.url, "a")
    assert (status, body["error"]) == (401, "unauthorized")
    assert "Bearer" in body["message"]
    status, body = await join(session, server.url, "a", token="guess")
    assert (status, body["message"]) == (401, "wrong token")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(session, server.url, "a")
    assert refused.value.status == 401
    status, body = await post(session, server.url, "/v1/shutdown", protocol.pack({}))
    assert status == 401
    assert not server.stopped.is_set()

    assert quorum_of(await join(session, server.url, "a", token="s3cret")).replica_ids == ("a",)
    ws = await connect(session, server.url, "a", token="s3cret")
    await ws.close()
    async with session.get(server.url + "/status") as response:
        assert response.status == 200  # read-only pages stay open


async def test_status_dashboard_and_metrics_describe_the_quorum(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW, heartbeat_timeout=SLOW)
    ws = await connect(session, server.url, "behind")
    formed = quorum_of(
        (
            await asyncio.gather(
                # A job under way on a fresh lighthouse: with every group
                # it expects back, nothing waits for stragglers to reconnect.
                join(
                    session, server.url, "ahead", step=7, address="http://ahead", expected_groups=2
                ),
                join(session, server.url, "behind", step=5, expected_groups=2),
            )
        )[0]
    )
    waiting = asyncio.create_task(join(session, server.url, "late", step=0))
    await eventually(lambda: "late" in server.core.joiners())

    async with session.get(server.url + "/status") as response:
        assert response.status == 200
        status = await response.json()
    assert status["quorum_id"] == formed.quorum_id
    assert status["epoch"] == server.epoch
    assert status["reason"].startswith("waiting")
    assert status["previous_quorum"]["quorum_id"] == formed.quorum_id
    assert [m["replica_id"] for m in status["previous_quorum"]["members"]] == ["ahead", "behind"]
    assert [(j["replica_id"], j["step"]) for j in status["joiners"]] == [("late", 0)]
    replicas = {r["replica_id"]: r for r in status["replicas"]}
    assert set(replicas) == {"ahead", "behind", "late"}
    assert replicas["behind"]["recovering"] and not replicas["ahead"]["recovering"]
    assert replicas["behind"]["connected"] and not replicas["ahead"]["connected"]
    assert replicas["ahead"]["in_quorum"] and not replicas["late"]["in_quorum"]
    assert replicas["ahead"]["address"] == "http://ahead"
    assert 0 <= replicas["ahead"]["heartbeat_age_s"] < SLOW
    assert status["config"]["min_replicas"] == 2
    assert "token" not in status["config"]

    async with session.get(server.url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert "fetch(" in page and "status" in page
    assert "http://" not in page and "https://" not in page  # no external assets

    async with session.get(server.url + "/metrics") as response:
        assert response.status == 200
        metrics = await response.text()
    assert "lighthouse_quorums_formed_total 1.0" in metrics
    assert "lighthouse_quorum_latency_seconds_count 1.0" in metrics
    assert 'lighthouse_quorum_latency_seconds_bucket{le="0.0001"}' in metrics
    assert "lighthouse_members_alive 3.0" in metrics
    assert "lighthouse_join_requests_total 3.0" in metrics
    assert 'lighthouse_evictions_total{cause="connection_closed"} 0.0' in metrics

    await ws.close()
    waiting.cancel()


async def test_status_shows_each_groups_pace(lighthouses, session):
    """DyLU and async groups say their rate, H and staleness in their join info (issue 14)."""
    server = await lighthouses.start(min_replicas=2, join_timeout=SLOW)
    pace = {"rate": 12.5, "h": 10, "staleness": 2, "tokens": 640, "step": 3}
    await asyncio.gather(
        join(session, server.url, "paced", data={"info": pace}),
        join(session, server.url, "plain"),
    )
    async with session.get(server.url + "/status") as response:
        status = await response.json()
    replicas = {r["replica_id"]: r for r in status["replicas"]}
    assert {k: replicas["paced"][k] for k in ("rate", "local_steps", "staleness")} == {
        "rate": 12.5,
        "local_steps": 10,
        "staleness": 2,
    }
    assert [replicas["plain"][k] for k in ("rate", "local_steps", "staleness")] == [None] * 3
    assert status["step_history"][-1]["paces"] == {
        "paced": {"rate": 12.5, "local_steps": 10, "staleness": 2}
    }


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"rate": 3.0, "h": 7}, {"rate": 3.0, "local_steps": 7.0}),
        ({"rate": float("nan"), "h": True, "staleness": "1"}, {}),  # free-form: only numbers
        ("not a map", {}),
        (None, {}),
    ],
)
def test_member_pace_reads_only_finite_numbers(info, expected):
    member = Member("g", data={} if info is None else {"info": info})
    assert member_pace(member) == expected


async def test_http_heartbeat_keeps_a_replica_alive(lighthouses, session):
    server = await lighthouses.start()
    status, body = await heartbeat(session, server.url, "a")
    assert (status, body) == (200, {"v": 1, "ok": True})
    assert "a" in server.core.last_seen()


async def test_a_restarted_lighthouse_hands_out_larger_quorum_ids(lighthouses, session):
    before = await lighthouses.start()
    old = quorum_of(await join(session, before.url, "a")).quorum_id
    await before.stop()
    after = await lighthouses.start()
    new = quorum_of(await join(session, after.url, "a")).quorum_id
    assert after.epoch > old
    assert new > old


async def test_a_passed_join_timeout_does_not_spin_the_timer(lighthouses, session, monkeypatch):
    server = await lighthouses.start(min_replicas=2, join_timeout=0.0, quorum_tick=0.05)
    ticks = 0
    tick = server.core.tick

    def counting_tick(now: float) -> Update:
        nonlocal ticks
        ticks += 1
        return tick(now)

    monkeypatch.setattr(server.core, "tick", counting_tick)
    status, _ = await join(session, server.url, "a", timeout=0.5)
    assert status == 504
    # About 0.5 s / 0.05 s; a timer re-armed in the past would tick thousands of times.
    assert 0 < ticks < 50


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"min_replicas": 0}, "min_replicas"),
        ({"heartbeat_timeout": 0.0}, "heartbeat_timeout"),
        ({"quorum_tick": float("nan")}, "quorum_tick"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"token": ""}, "token"),
    ],
)
def test_a_nonsensical_config_is_refused_at_construction(settings, expected):
    with pytest.raises(ValueError, match=expected):
        ServerConfig(**settings)
