"""DESIGN invariant I6, property-based: whatever a client sends to any endpoint,
the answer is a 2xx or a 4xx with a message, and the servers keep serving.

One lighthouse and one group's servers (the group round, the heal routes with
a published state, the rendezvous store), all with a token, run on a
background loop; hypothesis generates bodies (random bytes, messages of
random shape, and well-formed messages with fields of random values) and
headers.  Each endpoint gets a bounded number of examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
import pytest
import torch
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftdiloco.coordination.group import GroupGather
from ftdiloco.coordination.process_group import RendezvousStore, host_store
from ftdiloco.state.heal import StateServer
from ftwire import guard, protocol
from ftwire.background import BackgroundLoop
from lighthouse.server import LighthouseServer, ServerConfig

TOKEN = "fuzz-token"
EXAMPLES = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Targets:
    loop: BackgroundLoop
    session: aiohttp.ClientSession
    lighthouse: LighthouseServer
    group_url: str
    store: RendezvousStore

    def request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        async def send() -> tuple[int, bytes]:
            timeout = aiohttp.ClientTimeout(total=10)
            async with self.session.request(
                method, url, data=body, headers=headers, timeout=timeout
            ) as response:
                return response.status, await response.read()

        return self.loop.run(send(), timeout=15)


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    loop = BackgroundLoop("fuzz")

    async def decide(values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {"ok": True}

    async def start() -> tuple[LighthouseServer, web.AppRunner, str, aiohttp.ClientSession]:
        lighthouse = LighthouseServer(
            ServerConfig(token=TOKEN, join_timeout=0.05, heartbeat_timeout=0.2)
        )
        await lighthouse.start()
        app = web.Application()
        state = StateServer(TOKEN, chunk_bytes=4096)
        state.publish(1, {"w": torch.arange(5000, dtype=torch.float32)})
        state.add_routes(app)
        GroupGather(2, {k: decide for k in ("quorum", "vote", "checkpoint", "resume")}).add_routes(
            app, lambda request: guard.request_token_ok(request, TOKEN)
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return lighthouse, runner, url, aiohttp.ClientSession()

    lighthouse, runner, url, session = loop.run(start(), timeout=30)
    store = host_store("127.0.0.1", 0, 1.0, TOKEN)
    yield Targets(loop, session, lighthouse, url, store)
    store.close()

    async def stop() -> None:
        await session.close()
        await runner.cleanup()
        await lighthouse.stop()

    loop.run(stop(), timeout=30)
    loop.close()


# -- what a hostile or buggy client sends -----------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
ROUND_FIELDS = ("kind", "round", "rank", "value", "timeout_ms")
FIELDS = [
    "v",
    "replica_id",
    "address",
    "store_address",
    "step",
    "world_size",
    "shrink_only",
    "commit_failures",
    "data",
    "incarnation",
    "history",
    "expected_groups",
    "timeout_ms",
    "quorum_id",
    "reason",
    "op",
    "key",
    "keys",
    "value",
    "amount",
    "expected",
    "desired",
]


@st.composite
def messages(draw: st.DrawFn, fields: tuple[str, ...]) -> bytes:
    """A version-1 map with some expected fields holding arbitrary values."""
    message: dict[str, Any] = {"v": 1}
    for name in draw(st.lists(st.sampled_from(fields), max_size=len(fields), unique=True)):
        message[name] = draw(values)
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def bodies(fields: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    shapes = values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    return st.binary(max_size=200) | shapes | messages(fields)


# Documented answers about availability, not faults: a round whose other
# ranks never came (a 1 ms timeout here), a join no quorum answered in time.
AVAILABILITY = {(503, "group_round_failed"), (504, "timeout"), (503, "not_ready")}


def assert_answered(status: int, body: bytes) -> None:
    if status >= 400:
        code, message = protocol.decode_error(body)
        assert code != "unknown" and message, (status, body[:300])
        assert status < 500 or (status, code) in AVAILABILITY, (status, body[:300])


AUTH = guard.authorization(TOKEN)
LIGHTHOUSE_FIELDS = tuple(FIELDS[:16])


@pytest.mark.parametrize("path", ["/v1/join", "/v1/heartbeat", "/v1/fence", "/v1/kill"])
@EXAMPLES
@given(body=bodies(LIGHTHOUSE_FIELDS))
def test_lighthouse_endpoints_answer_any_body(targets: Targets, path: str, body: bytes) -> None:
    status, answer = targets.request("POST", targets.lighthouse.url + path, body, AUTH)
    assert_answered(status, answer)
    assert not targets.lighthouse.stopped.is_set()


@EXAMPLES
@given(body=bodies(ROUND_FIELDS), kind=st.sampled_from(["quorum", "vote", "checkpoint", "resume"]))
def test_the_group_round_answers_any_body(targets: Targets, body: bytes, kind: str) -> None:
    status, answer = targets.request("POST", targets.group_url + "/v1/group/round", body, AUTH)
    assert_answered(status, answer)
    # Well-formed envelopes with fuzzed values, answered at once (1 ms timeout).
    envelope = protocol.pack(
        {"kind": kind, "round": 1, "rank": 1, "timeout_ms": 1, "value": msgpack.unpackb(body)}
        if _is_map(body)
        else {"kind": kind, "round": 1, "rank": 1, "timeout_ms": 1, "value": {}}
    )
    status, answer = targets.request("POST", targets.group_url + "/v1/group/round", envelope, AUTH)
    assert_answered(status, answer)


def _is_map(body: bytes) -> bool:
    try:
        value = msgpack.unpackb(body, strict_map_key=False)
    except Exception:
        return False
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


@EXAMPLES
@given(
    path=st.sampled_from(["/v1/heal/manifest", "/v1/heal/chunk/0", "/v1/heal/chunk/"]),
    suffix=st.text(max_size=12),
    step=st.text(max_size=24) | st.integers(min_value=-5, max_value=5).map(str),
)
def test_the_heal_routes_answer_any_query(
    targets: Targets, path: str, suffix: str, step: str
) -> None:
    url = targets.group_url + path + (suffix if path.endswith("/") else "")
    try:
        status, answer = targets.request("GET", url + "?" + _query(step), None, AUTH)
    except ValueError:  # a URL aiohttp itself refuses to send
        return
    assert_answered(status, answer)


def _query(step: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"step": step})


@EXAMPLES
@given(body=bodies(tuple(FIELDS[13:])), op=st.sampled_from(["set", "get", "add", "wait", "x"]))
def test_the_store_answers_any_body(targets: Targets, body: bytes, op: str) -> None:
    url = f"http://{targets.store.address}/v1/store"
    status, answer = targets.request("POST", url, body, AUTH)
    assert_answered(status, answer)
    if _is_map(body):
        fields = {**msgpack.unpackb(body), "op": op, "timeout_ms": 0}
        status, answer = targets.request("POST", url, protocol.pack(fields), AUTH)
        assert_answered(status, answer)


@EXAMPLES
@given(header=st.text(max_size=40).filter(lambda h: "\n" not in h and "\r" not in h))
def test_no_endpoint_serves_without_the_token(targets: Targets, header: str) -> None:
    headers = {"Authorization": header}
    requests = [
        ("POST", targets.lighthouse.url + "/v1/heartbeat", protocol.encode_heartbeat("r")),
        ("POST", targets.group_url + "/v1/group/round", protocol.pack({})),
        ("GET", targets.group_url + "/v1/heal/manifest?step=1", None),
        ("POST", f"http://{targets.store.address}/v1/store", protocol.pack({"op": "num_keys"})),
    ]
    for method, url, body in requests:
        try:
            status, answer = targets.request(method, url, body, headers)
        except ValueError:  # a header aiohttp itself refuses to send
            return
        if guard.token_ok(header.strip(), TOKEN):
            continue
        assert status == 401, (url, header, answer[:200])
