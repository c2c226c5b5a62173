"""Heal transport: a donor's StateServer and fetch_state, in process on loopback.

Faults are injected by a relay app between receiver and donor, so the
transport is exercised only through its HTTP surface: the relay can damage a
chunk's bytes or its checksum header, cut a response off half way, or run a
hook (e.g. retract) once a chunk has been relayed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import safetensors.torch
import structlog
import structlog.testing
import torch
import xxhash
from aiohttp import web

from ftdiloco.state import heal
from ftdiloco.state.heal import (
    CHECKSUM,
    CHECKSUM_HEADER,
    HealError,
    StateServer,
    fetch_state,
    fetch_state_blocking,
)
from ftwire.protocol import pack, unpack

STEP = 7
# Small chunks, so that chunks straddle tensors and tensors straddle chunks.
CHUNK = 100


def blank_like(state: dict[str, torch.Tensor], fill: int = 0) -> dict[str, torch.Tensor]:
    return {name: torch.full(t.shape, fill, dtype=t.dtype) for name, t in state.items()}


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert raw_bytes(got[name]) == raw_bytes(want[name]), name


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{runner.addresses[0][1]}"


def flip_a_bit(body: bytearray) -> None:
    body[len(body) // 2] ^= 0x01


def swap_two_bytes(body: bytearray) -> None:
    """A damage a sum of the bytes would miss."""
    body[0], body[-1] = body[-1], body[0]


def zero_the_tail(body: bytearray) -> None:
    body[len(body) // 2 :] = bytes(len(body) - len(body) // 2)


@dataclass
class Relay:
    """Forwards heal requests to the donor, with faults on chunk responses."""

    upstream: str
    session: aiohttp.ClientSession
    # chunk index -> how many of its responses to damage
    damage: dict[int, int] = field(default_factory=dict)
    # how: by default one bit in the middle flips
    damage_with: Callable[[bytearray], None] = lambda body: flip_a_bit(body)
    # maps the donor's checksum header to the one sent on (None: no header)
    forge_checksum: Callable[[str | None], str | None] | None = None
    # chunks at or after this index die half way through the body
    die_from: int | None = None
    # called with the chunk index after a chunk has been relayed
    after_chunk: Callable[[int], None] | None = None
    # chunk index whose request is never answered
    hang_on: int | None = None
    requests: dict[int, int] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        index = int(request.match_info["index"]) if "index" in request.match_info else None
        if index is not None:
            self.requests[index] = self.requests.get(index, 0) + 1
            if index == self.hang_on:
                await self.released.wait()
        headers = {k: v for k, v in request.headers.items() if k == "Authorization"}
        async with self.session.get(
            f"http://{self.upstream}{request.path_qs}", headers=headers
        ) as upstream:
            body = bytearray(await upstream.read())
            status, content_type = upstream.status, upstream.content_type
            checksum = upstream.headers.get(CHECKSUM_HEADER)
        if index is not None and status == 200 and self.forge_checksum is not None:
            checksum = self.forge_checksum(checksum)
        forwarded = {} if checksum is None else {CHECKSUM_HEADER: checksum}
        if index is not None and status == 200:
            if self.damage.get(index, 0) > 0:
                self.damage[index] -= 1
                self.damage_with(body)
            if self.die_from is not None and index >= self.die_from:
                response = web.StreamResponse(headers=forwarded)
                response.content_length = len(body)
                await response.prepare(request)
                await response.write(body[: len(body) // 2])
                assert request.transport is not None
                request.transport.close()
                return response
            if self.after_chunk is not None:
                self.after_chunk(index)
        return web.Response(
            status=status, body=bytes(body), content_type=content_type, headers=forwarded
        )


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(33, 17, generator=g),
        "bf16": torch.randn(129, generator=g).bfloat16(),
        "ids": torch.randint(-(2**40), 2**40, (50,), generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "transposed": torch.randn(8, 5, generator=g).t(),
        "mask": torch.rand(13, generator=g) > 0.5,
        "half": torch.randn(7, generator=g).half(),
    }


@pytest.fixture
async def donor(state: dict[str, torch.Tensor]) -> AsyncIterator[tuple[StateServer, str]]:
    server = StateServer(chunk_bytes=CHUNK)
    server.publish(STEP, state)
    app = web.Application()
    server.add_routes(app)
    runner, address = await serve(app)
    yield server, address
    await runner.cleanup()


@pytest.fixture
async def relay(donor: tuple[StateServer, str]) -> AsyncIterator[tuple[Relay, str]]:
    async with aiohttp.ClientSession() as session:
        relay = Relay(donor[1], session)
        app = web.Application()
        app.router.add_get("/v1/heal/manifest", relay.handle)
        app.router.add_get("/v1/heal/chunk/{index}", relay.handle)
        runner, address = await serve(app)
        yield relay, address
        relay.released.set()
        await runner.cleanup()


async def get(address: str, path: str, **headers: str) -> tuple[int, bytes]:
    status, body, _ = await get_with_headers(address, path, **headers)
    return status, body


async def get_with_headers(
    address: str, path: str, **headers: str
) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{address}{path}", headers=headers) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


@pytest.fixture
async def no_unhandled_errors() -> AsyncIterator[None]:
    """Fails a test that leaves an exception nobody retrieved (asyncio logs
    those when the future is collected, in whatever code runs then)."""
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    yield
    gc.collect()
    loop.set_exception_handler(None)
    assert unhandled == []


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The index of every chunk StateServer copies out of its tensors, in order."""
    indices: list[int] = []
    copy_chunk = StateServer._copy_chunk

    def spy(self: StateServer, publication: Any, index: int, out: bytearray) -> bool:
        indices.append(index)
        return copy_chunk(self, publication, index, out)

    monkeypatch.setattr(StateServer, "_copy_chunk", spy)
    yield indices


# -- happy paths ---------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 4])
async def test_round_trip_is_byte_identical(
    donor: tuple[StateServer, str], state: dict[str, torch.Tensor], parallel: int
) -> None:
    server, address = donor
    assert server.step == STEP
    into = blank_like(state)
    await fetch_state(f"http://{address}", STEP, into, parallel=parallel)
    assert_identical(into, state)


async def test_round_trip_with_parameters_and_a_shared_session(
    donor: tuple[StateServer, str], state: dict[str, torch.Tensor]
) -> None:
    """Destinations may be leaves that require grad (a model's parameters)."""
    into = {
        name: torch.nn.Parameter(t, requires_grad=t.is_floating_point())
        for name, t in blank_like(state).items()
    }
    async with aiohttp.ClientSession() as session:
        await fetch_state(donor[1], STEP, into, session=session)
        await fetch_state(donor[1], STEP, into, session=session)
    assert_identical({k: v.detach() for k, v in into.items()}, state)


async def test_two_receivers_at_once(
    donor: tuple[StateServer, str], state: dict[str, torch.Tensor]
) -> None:
    first, second = blank_like(state), blank_like(state)
    await asyncio.gather(fetch_state(donor[1], STEP, first), fetch_state(donor[1], STEP, second))
    assert_identical(first, state)
    assert_identical(second, state)


@pytest.mark.parametrize("parallel", [1, 4])
async def test_slices_and_staged_destinations_land_in_place(
    donor: tuple[StateServer, str],
    state: dict[str, torch.Tensor],
    parallel: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks are read in slices that straddle tensors and chunks; a tensor
    a socket cannot read into (one on a GPU) is staged through host memory."""
    monkeypatch.setattr(heal, "_READ_BYTES", 7)
    into = blank_like(state)
    # Every other tensor plays the GPU's part.
    unreachable = {heal._bytes_of(t).data_ptr() for t in list(into.values())[::2] if t.numel()}
    landing = heal._landing
    staged = []

    def gpu_like(tensor: torch.Tensor) -> memoryview | None:
        if tensor.data_ptr() in unreachable:
            staged.append(tensor)
            return None
        return landing(tensor)

    monkeypatch.setattr(heal, "_landing", gpu_like)
    await fetch_state(donor[1], STEP, into, parallel=parallel)
    assert_identical(into, state)
    assert len(staged) == len(unreachable) > 1


def test_only_http_donors(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="http:// URL"):
        fetch_state_blocking("https://127.0.0.1:1", STEP, blank_like(state))


async def test_blocking_variant(
    donor: tuple[StateServer, str], state: dict[str, torch.Tensor]
) -> None:
    into = blank_like(state)
    await asyncio.to_thread(fetch_state_blocking, donor[1], STEP, into)
    assert_identical(into, state)


async def test_chunks_concatenate_to_a_safetensors_file(
    donor: tuple[StateServer, str], state: dict[str, torch.Tensor]
) -> None:
    address = donor[1]
    status, body = await get(address, f"/v1/heal/manifest?step={STEP}")
    assert status == 200
    manifest = unpack(body)
    assert manifest["step"] == STEP and manifest["chunk_bytes"] == CHUNK
    assert manifest["checksum"] == CHECKSUM == "xxh3_64" and "checksums" not in manifest
    assert [t["name"] for t in manifest["tensors"]] == list(state)
    chunks = []
    for index in range(manifest["num_chunks"]):
        status, chunk, headers = await get_with_headers(
            address, f"/v1/heal/chunk/{index}?step={STEP}"
        )
        assert status == 200 and int(headers[CHECKSUM_HEADER]) == xxhash.xxh3_64_intdigest(chunk)
        chunks.append(chunk)
    stream = b"".join(chunks)
    assert len(stream) == manifest["total_bytes"]
    assert len(chunks) == manifest["num_chunks"] > len(state)

    loaded = safetensors.torch.load(stream)
    assert_identical({name: loaded[name] for name in state}, state)
    (header_len,) = struct.unpack("<Q", stream[:8])
    assert json.loads(stream[8 : 8 + header_len])["__metadata__"]["step"] == str(STEP)
    for entry in manifest["tensors"]:
        start = entry["offset"]
        assert stream[start : start + entry["nbytes"]] == raw_bytes(state[entry["name"]])


async def test_republish_serves_the_new_step(donor: tuple[StateServer, str]) -> None:
    server, address = donor
    newer = {"w": torch.arange(10.0)}
    server.publish(STEP + 1, newer)
    into = {"w": torch.zeros(10)}
    await fetch_state(address, STEP + 1, into)
    assert torch.equal(into["w"], newer["w"])


# -- refusals ------------------------------------------------------------------------


async def test_step_mismatch_is_409(
    donor: tuple[StateServer, str], state: dict[str, torch.Tensor]
) -> None:
    address = donor[1]
    status, body = await get(address, f"/v1/heal/manifest?step={STEP - 1}")
    assert status == 409 and unpack(body)["error"] == "step_mismatch"
    status, _ = await get(address, f"/v1/heal/chunk/0?step={STEP + 1}")
    assert status == 409
    with pytest.raises(HealError, match=f"serves step {STEP}, not step {STEP - 1}") as e:
        await fetch_state(address, STEP - 1, blank_like(state))
    assert e.value.code == "step_mismatch"


async def test_nothing_published_is_503(state: dict[str, torch.Tensor]) -> None:
    app = web.Application()
    StateServer().add_routes(app)
    runner, address = await serve(app)
    try:
        status, body = await get(address, f"/v1/heal/chunk/0?step={STEP}")
        assert status == 503 and unpack(body)["error"] == "not_ready"
        with pytest.raises(HealError) as e:
            await fetch_state(address, STEP, blank_like(state))
        assert e.value.code == "not_ready"
    finally:
        await runner.cleanup()


async def test_token_is_required_when_set(state: dict[str, torch.Tensor]) -> None:
    server = StateServer(token="s3cret", chunk_bytes=CHUNK)
    server.publish(STEP, state)
    app = web.Application()
    server.add_routes(app)
    runner, address = await serve(app)
    try:
        for token in (None, "wrong"):
            with pytest.raises(HealError, match="HTTP 401") as e:
                await fetch_state(address, STEP, blank_like(state), token=token)
            assert e.value.code == "unauthorized"
        status, _ = await get(address, f"/v1/heal/chunk/0?step={STEP}", Authorization="s3cret")
        assert status == 401
        into = blank_like(state)
        await fetch_state(address, STEP, into, token="s3cret")
        assert_identical(into, state)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/heal/manifest",
        "/v1/heal/manifest?step=abc",
        "/v1/heal/manifest?step=-1",
        "/v1/heal/chunk/x?step=7",
        "/v1/heal/chunk/99999999?step=7",
        f"/v1/heal/chunk/{10**30}?step=7",
    ],
)
async def test_bad_requests_are_400(donor: tuple[StateServer, str], path: str) -> None:
    status, body = await get(donor[1], path)
    assert status == 400 and unpack(body)["error"] == "bad_request"


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def drop(into: dict[str, torch.Tensor]) -> None:
        del into[name]

    return drop


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop("ids"), "donor has tensor 'ids', which the destination lacks"),
        (lambda into: into.update(extra=torch.zeros(2)), "destination has tensor 'extra'"),
        (
            lambda into: into.update(weight=torch.zeros(17, 33)),
            r"tensor 'weight': donor has float32\[33, 17\], destination has float32\[17, 33\]",
        ),
        (lambda into: into.update(bf16=torch.zeros(129)), "donor has bfloat16"),
        (lambda into: into.update(weight=torch.zeros(17, 33).t()), "not contiguous"),
    ],
)
async def test_layout_mismatch_fails_before_writing(
    donor: tuple[StateServer, str],
    state: dict[str, torch.Tensor],
    change: Callable[[dict[str, torch.Tensor]], None],
    message: str,
) -> None:
    into = blank_like(state, fill=1)
    change(into)
    before = {name: t.clone() for name, t in into.items()}
    with pytest.raises(HealError, match=message) as e:
        await fetch_state(donor[1], STEP, into)
    assert e.value.code == "layout_mismatch"
    assert_identical(into, before)


async def test_hostile_manifest_is_a_heal_error(state: dict[str, torch.Tensor]) -> None:
    twice = {"name": "scalar", "dtype": "F64", "shape": [], "offset": 0, "nbytes": 8}
    replies = iter(
        [
            b"\xc1 not msgpack",
            pack({"step": STEP}),
            pack({"step": STEP, "checksum": "crc32"}),
            pack({"step": STEP, "checksum": CHECKSUM, "chunk_bytes": 1 << 40}),
            pack({"step": True, "checksum": CHECKSUM}),
            pack(
                {"step": STEP, "checksum": CHECKSUM, "chunk_bytes": CHUNK, "tensors": [twice] * 2}
            ),
        ]
    )

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=next(replies))

    app = web.Application()
    app.router.add_get("/v1/heal/manifest", manifest)
    runner, address = await serve(app)
    try:
        for expected in (
            "not valid msgpack",
            "'checksum'",
            "donor uses checksum 'crc32', not xxh3_64",
            "chunk size",
            "'step' must be int",
            "appears twice",
        ):
            with pytest.raises(HealError, match=expected) as e:
                await fetch_state(address, STEP, blank_like(state))
            assert e.value.code == "protocol"
    finally:
        await runner.cleanup()


# -- faults during a transfer --------------------------------------------------------


async def test_damaged_chunk_is_fetched_again(
    relay: tuple[Relay, str], state: dict[str, torch.Tensor]
) -> None:
    faults, address = relay
    faults.damage = {0: 1, 5: 2}
    into = blank_like(state)
    await fetch_state(address, STEP, into, parallel=4)
    assert_identical(into, state)
    assert faults.requests[0] == 2 and faults.requests[5] == 3 and faults.requests[1] == 1


@pytest.mark.parametrize("damage", [flip_a_bit, swap_two_bytes, zero_the_tail])
@pytest.mark.usefixtures("no_unhandled_errors")
async def test_chunk_damaged_every_time_fails(
    relay: tuple[Relay, str],
    state: dict[str, torch.Tensor],
    damage: Callable[[bytearray], None],
) -> None:
    faults, address = relay
    faults.damage = {3: 100}
    faults.damage_with = damage
    with pytest.raises(HealError, match=r"chunk 3 .* failed its xxh3_64 check") as e:
        await fetch_state(address, STEP, blank_like(state))
    assert e.value.code == "checksum"
    assert faults.requests[3] == 3


async def test_damaged_checksum_header_is_fetched_again(
    relay: tuple[Relay, str], state: dict[str, torch.Tensor]
) -> None:
    """The header is checked like the body: a wrong but well-formed one is a mismatch."""
    faults, address = relay
    forgeries = iter(range(2))

    def forge(checksum: str | None) -> str | None:
        assert checksum is not None
        return checksum if next(forgeries, None) is None else str(int(checksum) ^ 1)

    faults.forge_checksum = forge
    into = blank_like(state)
    await fetch_state(address, STEP, into, parallel=1)
    assert_identical(into, state)
    assert faults.requests[0] == 3 and faults.requests[1] == 1


@pytest.mark.parametrize("header", [None, "", "abc", "-1", "0x1f", str(1 << 64), "1" * 21])
async def test_missing_or_garbled_checksum_header_is_a_protocol_error(
    relay: tuple[Relay, str], state: dict[str, torch.Tensor], header: str | None
) -> None:
    faults, address = relay
    faults.forge_checksum = lambda checksum: header
    with pytest.raises(HealError, match=f"chunk 0 .*{CHECKSUM_HEADER}") as e:
        await fetch_state(address, STEP, blank_like(state), parallel=1)
    assert e.value.code == "protocol"
    assert faults.requests == {0: 1}


@pytest.mark.usefixtures("no_unhandled_errors")
async def test_donor_dying_mid_transfer(
    relay: tuple[Relay, str], state: dict[str, torch.Tensor]
) -> None:
    faults, address = relay
    faults.die_from = 1
    with pytest.raises(HealError, match="went away") as e:
        await fetch_state(address, STEP, blank_like(state), parallel=4)
    assert e.value.code == "donor_gone"


async def test_unreachable_donor(state: dict[str, torch.Tensor]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HealError) as e:
        await fetch_state(f"127.0.0.1:{port}", STEP, blank_like(state))
    assert e.value.code == "donor_gone"


async def test_retract_during_transfer_fails_later_chunks(
    donor: tuple[StateServer, str], relay: tuple[Relay, str], state: dict[str, torch.Tensor]
) -> None:
    server, donor_address = donor
    faults, address = relay
    faults.after_chunk = lambda index: server.retract()
    with pytest.raises(HealError, match="HTTP 503") as e:
        await fetch_state(address, STEP, blank_like(state), parallel=1)
    assert e.value.code == "not_ready"
    assert faults.requests == {0: 1, 1: 1}
    assert server.step is None
    status, _ = await get(donor_address, f"/v1/heal/chunk/0?step={STEP}")
    assert status == 503


async def test_publish_of_another_step_during_transfer(
    donor: tuple[StateServer, str], relay: tuple[Relay, str], state: dict[str, torch.Tensor]
) -> None:
    server, _ = donor
    faults, address = relay
    faults.after_chunk = lambda index: server.publish(STEP + 1, state)
    with pytest.raises(HealError, match=f"serves step {STEP + 1}") as e:
        await fetch_state(address, STEP, blank_like(state), parallel=1)
    assert e.value.code == "step_mismatch"


@pytest.mark.usefixtures("no_unhandled_errors")
async def test_timeout_bounds_the_whole_fetch(
    relay: tuple[Relay, str], state: dict[str, torch.Tensor]
) -> None:
    faults, address = relay
    faults.hang_on = 2
    with pytest.raises(HealError, match=r"longer than 0\.3s") as e:
        await fetch_state(address, STEP, blank_like(state), timeout=0.3)
    assert e.value.code == "timeout"
    # The thread blocked on the hanging chunk was released, not left writing.
    assert not [t for t in threading.enumerate() if t.name.startswith("ftdiloco-heal")]


async def test_receiver_leaving_mid_chunk_does_not_disturb_the_donor() -> None:
    server = StateServer(chunk_bytes=32 << 20)
    big = {"w": torch.ones(16 << 20)}
    server.publish(STEP, big)
    app = web.Application()
    server.add_routes(app)
    runner, address = await serve(app)
    try:
        with structlog.testing.capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                response = await session.get(f"http://{address}/v1/heal/chunk/0?step={STEP}")
                assert len(await response.content.readexactly(1 << 20)) == 1 << 20
                response.close()

            async def noticed() -> None:
                while not any(e["event"] == "heal receiver went away" for e in logs):
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(noticed(), 10)
        into = {"w": torch.zeros(16 << 20)}
        await fetch_state(address, STEP, into)
        assert torch.equal(into["w"], big["w"])
    finally:
        await runner.cleanup()


# -- publish -------------------------------------------------------------------------


async def test_publish_copies_nothing_until_a_chunk_is_asked_for(
    state: dict[str, torch.Tensor], copies: list[int]
) -> None:
    """Publishing happens every outer step and heals are rare: neither publish,
    retract nor the manifest may read the state; each chunk request reads its chunk."""
    server = StateServer(chunk_bytes=CHUNK)
    for step in range(3):
        server.publish(step, state)
        server.retract()
    server.publish(STEP, state)
    await asyncio.sleep(0.1)  # anything started in the background would have run by now
    assert copies == []

    app = web.Application()
    server.add_routes(app)
    runner, address = await serve(app)
    try:
        status, body = await get(address, f"/v1/heal/manifest?step={STEP}")
        assert status == 200 and copies == []
        status, _ = await get(address, f"/v1/heal/chunk/3?step={STEP}")
        assert status == 200 and copies == [3]
        into = blank_like(state)
        await fetch_state(address, STEP, into, parallel=1)
        assert_identical(into, state)
        assert copies == [3, *range(unpack(body)["num_chunks"])]
        server.retract()
        status, _ = await get(address, f"/v1/heal/chunk/0?step={STEP}")
        assert status == 503 and len(copies) == 1 + unpack(body)["num_chunks"]
    finally:
        await runner.cleanup()


def test_publish_rejects_what_safetensors_cannot_carry() -> None:
    server = StateServer()
    with pytest.raises(ValueError, match="complex64"):
        server.publish(1, {"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="reserved"):
        server.publish(1, {"__metadata__": torch.zeros(2)})
    assert server.step is None


async def test_concurrent_chunk_requests_hold_memory_for_what_they_send() -> None:
    """Issue 11 finding 4: each request allocated a whole chunk (8 MiB by
    default) even for a 200 KB state; 64 at once held ~460 MB."""
    import tracemalloc

    state = {"w": torch.arange(50_000, dtype=torch.float32)}  # 200 KB
    server = StateServer()  # the default chunk size
    server.publish(3, state)
    app = web.Application()
    server.add_routes(app)
    runner, address = await serve(app)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def chunk() -> tuple[int, bytes]:
                async with session.get(f"http://{address}/v1/heal/chunk/0?step=3") as response:
                    return response.status, await response.read()

            answers = await asyncio.gather(*(chunk() for _ in range(64)))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
        await runner.cleanup()
    assert {status for status, _ in answers} == {200}
    assert len({body for _, body in answers}) == 1
    # 64 receivers' bodies (13 MB) are in this process too; the server's
    # buffers add at most a few chunks of 200 KB.
    assert peak < 64 * 210_000 + (8 << 20), f"peak {peak / 1e6:.0f} MB"
