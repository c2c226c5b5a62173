"""Error bodies a person can read: JSON for a client that prefers it, msgpack by default.

The refusal is made in one place (ftwire.guard) for every server, so the
lighthouse stands in for all of them here; the control endpoints also take a
JSON body, as ``curl -d '{"replica_id": "g1"}'`` sends it.
"""

from __future__ import annotations

import json

import pytest

from ftwire import protocol

JSON = {"Accept": "application/json"}


@pytest.mark.parametrize(
    "accept",
    [
        "application/json",
        "application/json, */*;q=0.5",
        "application/msgpack;q=0.2, application/json",
        "text/html, application/json;q=0.9",
    ],
)
async def test_a_client_preferring_json_reads_a_json_error(lighthouses, session, accept):
    server = await lighthouses.start(token="s3cret")
    async with session.post(server.url + "/v1/join", headers={"Accept": accept}) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        body = json.loads(await response.text())
    assert body["error"] == "unauthorized"
    assert "Authorization: Bearer" in body["message"]


@pytest.mark.parametrize(
    "accept", [None, "*/*", "application/msgpack", "application/json;q=0.5, application/msgpack"]
)
async def test_msgpack_stays_the_default(lighthouses, session, accept):
    server = await lighthouses.start(token="s3cret")
    headers = {} if accept is None else {"Accept": accept}
    async with session.post(server.url + "/v1/kill", headers=headers) as response:
        assert response.status == 401
        assert response.content_type == protocol.CONTENT_TYPE
        assert protocol.decode_error(await response.read())[0] == "unauthorized"


async def test_aiohttp_own_refusals_and_bad_bodies_answer_in_json_too(lighthouses, session):
    server = await lighthouses.start()
    async with session.get(server.url + "/no/such/page", headers=JSON) as response:
        assert response.status == 404
        assert json.loads(await response.text())["error"] == "not_found"
    async with session.post(server.url + "/v1/join", data=b"\xc1", headers=JSON) as response:
        assert response.status == 400
        body = json.loads(await response.text())
    assert body["error"] == "bad_request" and "msgpack" in body["message"]


async def test_kill_takes_a_json_body_and_answers_in_json(lighthouses, session):
    server = await lighthouses.start(token="s3cret")
    headers = {"Authorization": "Bearer s3cret", **JSON}
    async with session.post(
        server.url + "/v1/kill", json={"replica_id": "g1", "reason": "test"}, headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        assert json.loads(await response.text()) == {"v": 1, "ok": True, "known": False}
    # A malformed JSON body is the client's fault, said in JSON.
    async with session.post(
        server.url + "/v1/kill",
        data=b'{"replica_id": ',
        headers={**headers, "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        body = json.loads(await response.text())
    assert body["error"] == "bad_request" and "not valid JSON" in body["message"]
    async with session.post(server.url + "/v1/kill", json={"reason": "x"}, headers=headers) as r:
        assert r.status == 400
        assert "missing field 'replica_id'" in json.loads(await r.text())["message"]
    # Without asking for JSON, the answer to a JSON body is the default msgpack.
    async with session.post(
        server.url + "/v1/kill",
        json={"replica_id": "g2"},
        headers={"Authorization": "Bearer s3cret"},
    ) as r:
        assert r.status == 200
        assert protocol.unpack(await r.read())["ok"] is True
    # Deep nesting is refused at decode time, as in msgpack.
    async with session.post(
        server.url + "/v1/kill",
        data=b"[" * 100_000,
        headers={**headers, **JSON, "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400


async def test_shutdown_takes_a_json_body(lighthouses, session):
    server = await lighthouses.start(token="s3cret")
    async with session.post(
        server.url + "/v1/shutdown", json={}, headers={"Authorization": "Bearer s3cret", **JSON}
    ) as response:
        assert response.status == 200
        assert json.loads(await response.text())["ok"] is True
    await server.wait_stopped()


def test_json_messages_are_held_to_the_limits():
    with pytest.raises(protocol.ProtocolError, match="NaN"):
        protocol.unpack_json(b'{"x": NaN}')
    with pytest.raises(protocol.ProtocolError, match="version"):
        protocol.unpack_json(b'{"v": 2}')
    with pytest.raises(protocol.ProtocolError, match="object"):
        protocol.unpack_json(b"[1]")
    with pytest.raises(protocol.ProtocolError, match="deeper"):
        protocol.unpack_json(b'{"a":' * 20 + b"1" + b"}" * 20)
    assert protocol.unpack_json(b'{"replica_id": "g"}') == {"replica_id": "g", "v": 1}
