"""Heal transport: a replica group that is behind copies a peer's committed state over HTTP.

The donor serves its state as one safetensors stream (8-byte header length,
JSON header, raw little-endian tensor bytes), cut into fixed-size chunks that
a receiver fetches in parallel.  The stream is never built in memory: each
chunk is copied straight out of the published tensors, under a lock, so a
``retract()`` can never let half-old, half-new bytes leave the donor.
Publishing does no work proportional to the state: nothing is read until a
receiver asks for a chunk.  The donor then checksums the bytes it just copied
out and sends the checksum with them, so the receiver can tell a chunk
corrupted on the way (refetched) from a donor that went away
(:class:`HealError`).  The receiver reads each chunk from the socket straight
into the destination tensors and hashes it as it arrives, so a heal costs
each side little more than the socket copy itself.  Concatenating all chunks
yields a file that ``safetensors.torch.load`` reads; no pickle is involved
anywhere.

Endpoints (mounted on the manager's aiohttp app by :meth:`StateServer.add_routes`):

``GET /v1/heal/manifest?step=N``
    200 msgpack manifest (``ftwire.protocol.pack``): ``step``,
    ``chunk_bytes``, ``total_bytes``, ``num_chunks``, ``checksum`` (the
    algorithm of the chunks' checksums) and ``tensors`` (``name``, ``dtype``,
    ``shape``, ``offset`` into the stream, ``nbytes``).
``GET /v1/heal/chunk/{index}?step=N``
    200 ``application/octet-stream``: bytes ``[index * chunk_bytes, ...)`` of
    the stream, with their 64-bit XXH3 hash as a decimal integer in the
    ``X-Ftdiloco-Checksum`` header.

Both answer 400 ``bad_request``, 401 ``unauthorized`` (when the server has a
token, requests need ``Authorization: Bearer <token>``), 409 ``step_mismatch``
(another step is served; the message says which) and 503 ``not_ready``
(nothing is published, or it was retracted), 429 ``busy`` (too many chunk
requests at once: a few are served together, each with a buffer the size of
what it sends, and a bounded number wait), with an ``encode_error`` body
(ftwire.guard: the project's one token check and error answer).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import http.client
import itertools
import json
import math
import queue
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import numpy
import structlog
import torch
import xxhash
from aiohttp import web
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from ftdiloco.state.dtypes import SAFETENSORS_CODES
from ftwire import guard
from ftwire.protocol import (
    ANSWER,
    CONTENT_TYPE,
    MAX_MESSAGE_BYTES,
    ProtocolError,
    decode_error,
    pack,
    unpack,
)

__all__ = ["HealError", "StateServer", "fetch_state", "fetch_state_blocking"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
# The tensors to fill, or a function from the donor's layout to them.
Destination = (
    Mapping[str, torch.Tensor]
    | Callable[[Sequence[tuple[str, torch.dtype, tuple[int, ...]]]], Mapping[str, torch.Tensor]]
)

# safetensors' names for the dtypes it can carry.
_DTYPES = SAFETENSORS_CODES
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}

# XXH3-64 hashes ~30 GB/s from memory on one core (~80 from cache); zlib.crc32
# manages ~6, which cost each side about a fifth of its CPU per heal, and
# blake2b ~0.6.  It catches corruption, which is all it is for: the donor is
# trusted, its bytes are not.  (crc32c, the hardware CRC, is half XXH3's speed
# and falls back to software without SSE4.2 or ARMv8 CRC.)
CHECKSUM = "xxh3_64"
# The response header that carries a chunk's checksum (the manifest names the algorithm).
CHECKSUM_HEADER = "X-Ftdiloco-Checksum"
# A receiver stages a chunk per connection for destinations on a GPU; refuse
# donors that ask for more.
MAX_CHUNK_BYTES = 256 << 20
# Response bodies go out in slices this large, so a slice the socket cannot
# take at once is all the event loop's transport ever buffers (and copies).
_WRITE_BYTES = 1 << 20
# A receiver reads a chunk in slices this large and hashes each as soon as it
# arrives, while it is still in the CPU's cache.  Large, because a recv takes
# all the socket has queued up to its length: reading a loopback stream in
# 256 KiB slices cost the receiver twice the CPU of 4 MiB ones (0.25 against
# 0.12 s/GB), which cost no more than reading whole tensors.
_READ_BYTES = 4 << 20
# Idle chunk buffers a StateServer keeps for the next requests (one per
# connection of a typical heal).
_POOLED_BUFFERS = 4
# Chunks copied out and being sent at once (each holds one buffer), and the
# requests that may wait for a turn; more are refused with 429.
_SENDING_CHUNKS = 4
_MAX_QUEUED_CHUNKS = 64
_CHECKSUM_ATTEMPTS = 3
_ERROR_BODY_LIMIT = 64 << 10
_OCTET_STREAM = "application/octet-stream"


class HealError(Exception):
    """Copying state from a donor failed; ``code`` says how (see :func:`fetch_state`)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class _ChecksumMismatch(HealError):
    """A chunk arrived damaged; worth fetching again."""


# -- the stream layout, shared by donor and receiver ------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


def _spec(name: str, tensor: torch.Tensor) -> _Spec:
    if tensor.dtype not in _DTYPES:
        raise ValueError(
            f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot carry"
        )
    if tensor.layout != torch.strided:
        raise ValueError(f"tensor {name!r} is {tensor.layout}; only dense tensors can be healed")
    return _Spec(name, tensor.dtype, tuple(tensor.shape))


@dataclass(frozen=True)
class _Layout:
    """Where each byte of the stream lives: segment 0 is the safetensors header,
    segment ``i + 1`` is tensor ``specs[i]``."""

    specs: tuple[_Spec, ...]
    header: bytes
    starts: tuple[int, ...]
    total: int
    chunk_bytes: int

    @classmethod
    def build(cls, step: int, specs: Sequence[_Spec], chunk_bytes: int) -> _Layout:
        entries: dict[str, Any] = {}
        position = 0
        for spec in specs:
            entries[spec.name] = {
                "dtype": _DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [position, position + spec.nbytes],
            }
            position += spec.nbytes
        entries["__metadata__"] = {"format": "pt", "step": str(step)}
        text = json.dumps(entries, separators=(",", ":")).encode()
        # safetensors pads the header with spaces so tensor data starts 8-aligned.
        text += b" " * (-len(text) % 8)
        header = struct.pack("<Q", len(text)) + text
        starts = tuple(itertools.accumulate((s.nbytes for s in specs), initial=len(header)))
        return cls(tuple(specs), header, (0, *starts[:-1]), starts[-1], chunk_bytes)

    @property
    def num_chunks(self) -> int:
        return -(-self.total // self.chunk_bytes)

    def chunk_span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total)

    def pieces(self, index: int) -> Iterator[tuple[int, int, int, int]]:
        """(segment, offset in segment, offset in chunk, length) for each
        segment that chunk ``index`` overlaps, in stream order."""
        chunk_start, end = self.chunk_span(index)
        position = chunk_start
        segment = bisect.bisect_right(self.starts, position) - 1
        while position < end:
            segment_end = self.starts[segment + 1] if segment + 1 < len(self.starts) else self.total
            length = min(end, segment_end) - position
            if length > 0:
                yield segment, position - self.starts[segment], position - chunk_start, length
                position += length
            segment += 1


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (no copy)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _copy(out: numpy.ndarray[Any, numpy.dtype[numpy.uint8]], source: torch.Tensor) -> None:
    """Copy the bytes of ``source`` into ``out``.  From host memory numpy does
    it (a memmove, without the GIL): torch's ``copy_`` splits a copy this
    large over its intra-op threads and waits for the slowest, which on a busy
    2-core machine made it 20x slower than one core alone."""
    if source.device.type == "cpu":
        numpy.copyto(out, source.numpy())
    else:
        torch.from_numpy(out).copy_(source)


# -- donor ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Publication:
    step: int
    layout: _Layout
    # Per segment, the bytes to serve: the header, then each tensor.
    sources: list[torch.Tensor]
    manifest: bytes | None = None


# A request this server will not serve; becomes an error answer.
_Refused = guard.Refused


class StateServer:
    """Serves this group's committed state, for exactly the committed step.

    ``publish`` and ``retract`` are called from the training thread while the
    routes run on an event loop in another thread; one lock orders them with
    every copy out of the tensors.  Publishing reads none of the state (it
    happens every outer step, heals are rare): each chunk is copied out and
    checksummed only when a receiver asks for it.
    """

    def __init__(self, token: str | None = None, chunk_bytes: int = 8 << 20) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self._token = token
        self._chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._published: _Publication | None = None
        # Used on the event loop's thread only.
        self._buffers: list[bytearray] = []
        self._sending = asyncio.Semaphore(_SENDING_CHUNKS)
        self._queued = 0

    def add_routes(self, app: web.Application) -> None:
        guard.install(app)
        app.router.add_get("/v1/heal/manifest", self._handle_manifest)
        app.router.add_get("/v1/heal/chunk/{index}", self._handle_chunk)

    @property
    def step(self) -> int | None:
        published = self._published
        return None if published is None else published.step

    def publish(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Serve ``tensors`` as the state committed at ``step``, until the next
        ``retract``/``publish``; the caller must not modify them until then.

        Non-contiguous tensors are copied once here (the stream needs them in
        row-major order); contiguous ones, CPU or CUDA, are served in place.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if "__metadata__" in tensors:
            raise ValueError("'__metadata__' is reserved by safetensors and cannot name a tensor")
        specs = [_spec(name, tensor) for name, tensor in tensors.items()]
        layout = _Layout.build(step, specs, self._chunk_bytes)
        header = torch.frombuffer(bytearray(layout.header), dtype=torch.uint8)
        sources = [header, *(_bytes_of(t.contiguous()) for t in tensors.values())]
        publication = _Publication(step, layout, sources)
        with self._lock:
            self._published = publication

    def retract(self) -> None:
        """Stop serving.  Returns once no copy out of the tensors is in
        progress; chunk requests still in flight get 503 instead of data."""
        with self._lock:
            self._published = None

    # -- copying out ----------------------------------------------------------------

    def _copy_chunk(self, publication: _Publication, index: int, out: bytearray) -> bool:
        """Copy chunk ``index`` into ``out``; False if it is no longer published."""
        target = numpy.frombuffer(out, dtype=numpy.uint8)
        with self._lock:
            if self._published is not publication:
                return False
            for segment, offset, at, length in publication.layout.pieces(index):
                source = publication.sources[segment][offset : offset + length]
                _copy(target[at : at + length], source)
        return True

    # -- HTTP ------------------------------------------------------------------------

    def _refusal(self, step: int) -> _Refused:
        """Why a request for ``step`` cannot be served right now."""
        published = self._published
        if published is None or published.step == step:
            return _Refused(
                503,
                "not_ready",
                f"no committed state is published for step {step} "
                "(not yet committed, or retracted while being replaced)",
            )
        return _Refused(
            409,
            "step_mismatch",
            f"this replica serves step {published.step}, not step {step}",
        )

    def _accept(self, request: web.Request) -> tuple[int, _Publication]:
        """Authorise the request and find the publication it asks for."""
        guard.authorize(request, self._token)
        step = _query_int(request, "step")
        published = self._published
        if published is None or published.step != step:
            raise self._refusal(step)
        return step, published

    async def _handle_manifest(self, request: web.Request) -> web.Response:
        _, publication = self._accept(request)
        if publication.manifest is None:
            publication.manifest = _encode_manifest(publication)
        return web.Response(body=publication.manifest, content_type=CONTENT_TYPE)

    async def _handle_chunk(self, request: web.Request) -> web.StreamResponse:
        step, publication = self._accept(request)
        index = _path_int(request, "index")
        if index >= publication.layout.num_chunks:
            raise _Refused(
                400,
                "bad_request",
                f"chunk {index} does not exist; step {step} has "
                f"{publication.layout.num_chunks} chunks",
            )
        start, end = publication.layout.chunk_span(index)
        if self._queued >= _MAX_QUEUED_CHUNKS:
            raise _Refused(
                429,
                "busy",
                f"{self._queued} chunk requests are already being served or waiting;"
                f" the limit is {_MAX_QUEUED_CHUNKS}",
            )
        self._queued += 1
        try:
            # The semaphore bounds the buffers alive at once, whatever the requests.
            async with self._sending:
                return await self._send_chunk(request, step, publication, index, end - start)
        finally:
            self._queued -= 1

    async def _send_chunk(
        self, request: web.Request, step: int, publication: _Publication, index: int, length: int
    ) -> web.StreamResponse:
        # Zeroing and faulting in a fresh chunk-sized buffer per request costs
        # as much CPU as the copy itself, hence the pool of full-sized ones; a
        # shorter chunk (the last, or a small state) gets a buffer of its size.
        full = length == self._chunk_bytes
        buffer = self._buffers.pop() if full and self._buffers else bytearray(length)

        def copy_out() -> int | None:
            """The chunk's checksum once it is in ``buffer``; None if retracted.
            The lock covers only the copy: the checksum is of the copy."""
            if not self._copy_chunk(publication, index, buffer):
                return None
            return xxhash.xxh3_64_intdigest(memoryview(buffer)[:length])

        try:
            checksum = await asyncio.to_thread(copy_out)
            if checksum is None:
                raise self._refusal(step)
            response = web.StreamResponse(
                headers={"Content-Type": _OCTET_STREAM, CHECKSUM_HEADER: str(checksum)}
            )
            response.content_length = length
            await response.prepare(request)
            view = memoryview(buffer)
            try:
                for offset in range(0, length, _WRITE_BYTES):
                    await response.write(view[offset : min(offset + _WRITE_BYTES, length)])
                await response.write_eof()
            except ConnectionError as e:
                # The receiver gave up (its deadline) or died; nothing to answer.
                log.info("heal receiver went away", peer=request.remote, chunk=index, error=str(e))
            return response
        finally:
            # Since Python 3.12 the transport queues views of what it could not
            # send yet instead of copying it; such a buffer must not be reused.
            transport = request.transport
            if (
                full
                and transport is not None
                and transport.get_write_buffer_size() == 0
                and len(self._buffers) < _POOLED_BUFFERS
            ):
                self._buffers.append(buffer)


def _parse_int(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise _Refused(400, "bad_request", f"{what} must be a non-negative integer")
    return int(text)


def _query_int(request: web.Request, name: str) -> int:
    if name not in request.query:
        raise _Refused(400, "bad_request", f"missing query parameter {name!r}")
    return _parse_int(request.query[name], f"query parameter {name!r}")


def _path_int(request: web.Request, name: str) -> int:
    return _parse_int(request.match_info[name], f"path component {name!r}")


def _encode_manifest(publication: _Publication) -> bytes:
    layout = publication.layout
    return pack(
        {
            "step": publication.step,
            "chunk_bytes": layout.chunk_bytes,
            "total_bytes": layout.total,
            "num_chunks": layout.num_chunks,
            "checksum": CHECKSUM,
            "tensors": [
                {
                    "name": spec.name,
                    "dtype": _DTYPES[spec.dtype],
                    "shape": list(spec.shape),
                    "offset": start,
                    "nbytes": spec.nbytes,
                }
                for spec, start in zip(layout.specs, layout.starts[1:], strict=True)
            ],
        }
    )


# -- receiver ------------------------------------------------------------------------


def _typed(message: Mapping[str, Any], name: str, kind: type[T]) -> T:
    value = message.get(name)
    # bool is an int subclass; a step must not be True.
    if type(value) is not kind:
        raise HealError(
            f"malformed manifest: field {name!r} must be {kind.__name__}, "
            f"got {type(value).__name__}",
            "protocol",
        )
    return value


def _int_list(message: Mapping[str, Any], name: str) -> list[int]:
    values = _typed(message, name, list)
    if not all(type(v) is int and v >= 0 for v in values):
        raise HealError(f"malformed manifest: {name!r} must hold non-negative ints", "protocol")
    return values


def _donor_specs(manifest: Mapping[str, Any]) -> list[tuple[_Spec, int]]:
    """The donor's tensors with their stream offsets, in stream order."""
    specs = []
    for entry in _typed(manifest, "tensors", list):
        if not isinstance(entry, dict):
            raise HealError("malformed manifest: 'tensors' must be a list of maps", "protocol")
        name = _typed(entry, "name", str)
        dtype = _TORCH_DTYPES.get(_typed(entry, "dtype", str))
        if dtype is None:
            raise HealError(
                f"donor's tensor {name!r} has unknown dtype {entry['dtype']!r}", "protocol"
            )
        spec = _Spec(name, dtype, tuple(_int_list(entry, "shape")))
        specs.append((spec, _typed(entry, "offset", int)))
    return specs


def _match(donor: Sequence[_Spec], into: Mapping[str, torch.Tensor]) -> None:
    """Raise HealError naming the first difference between the donor's tensors and ``into``."""
    names = {spec.name for spec in donor}
    if len(names) != len(donor):
        raise HealError("malformed manifest: a tensor name appears twice", "protocol")
    for spec in donor:
        if spec.name not in into:
            raise HealError(
                f"donor has tensor {spec.name!r}, which the destination lacks", "layout_mismatch"
            )
        tensor = into[spec.name]
        ours = _Spec(spec.name, tensor.dtype, tuple(tensor.shape))
        if ours != spec:
            raise HealError(
                f"tensor {spec.name!r}: donor has {spec.describe()}, "
                f"destination has {ours.describe()}",
                "layout_mismatch",
            )
        if tensor.layout != torch.strided or not tensor.is_contiguous():
            raise HealError(
                f"destination tensor {spec.name!r} is not contiguous; chunks are written "
                "into its memory in place",
                "layout_mismatch",
            )
    for name in into:
        if name not in names:
            raise HealError(
                f"destination has tensor {name!r}, which the donor lacks", "layout_mismatch"
            )


def _read_manifest(
    body: bytes, step: int, into: Destination
) -> tuple[_Layout, Mapping[str, torch.Tensor]]:
    """Check the manifest against ``into``; nothing has been written yet."""
    try:
        manifest = unpack(body, ANSWER)
    except ProtocolError as e:
        raise HealError(f"malformed manifest: {e}", "protocol") from None
    if _typed(manifest, "step", int) != step:
        raise HealError(
            f"asked for step {step}, donor's manifest is for step {manifest['step']}",
            "step_mismatch",
        )
    if _typed(manifest, "checksum", str) != CHECKSUM:
        raise HealError(f"donor uses checksum {manifest['checksum']!r}, not {CHECKSUM}", "protocol")
    chunk_bytes = _typed(manifest, "chunk_bytes", int)
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise HealError(
            f"donor's chunk size {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES}", "protocol"
        )
    donor = _donor_specs(manifest)
    if callable(into):
        into = into([(spec.name, spec.dtype, spec.shape) for spec, _ in donor])
    _match([spec for spec, _ in donor], into)
    layout = _Layout.build(step, [spec for spec, _ in donor], chunk_bytes)
    claimed = (
        [offset for _, offset in donor],
        _typed(manifest, "total_bytes", int),
        _typed(manifest, "num_chunks", int),
    )
    if claimed != (list(layout.starts[1:]), layout.total, layout.num_chunks):
        raise HealError(
            "donor's manifest does not describe the stream its tensors imply "
            "(offsets, total size or chunk count differ)",
            "protocol",
        )
    return layout, into


async def _read_body(response: aiohttp.ClientResponse, limit: int, address: str) -> bytes:
    body = bytearray()
    async for data in response.content.iter_any():
        body += data
        if len(body) > limit:
            raise HealError(f"donor {address} sent a reply over {limit} bytes", "protocol")
    return bytes(body)


def _refusal(status: int, body: bytes, what: str, address: str) -> HealError:
    code, message = decode_error(body)
    return HealError(f"donor {address} refused {what} (HTTP {status} {code}): {message}", code)


def _checksum_header(text: str | None, index: int, address: str) -> int:
    """The checksum the donor sent with chunk ``index``: an XXH3-64, 0 .. 2**64 - 1."""
    if text is None or not (
        text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 1 << 64
    ):
        raise HealError(
            f"donor {address} sent chunk {index} without a valid {CHECKSUM_HEADER} "
            f"header (got {text!r})",
            "protocol",
        )
    return int(text)


def _landing(tensor: torch.Tensor) -> memoryview | None:
    """The memory of a destination tensor that a socket can read into, or None
    for one it cannot reach (on a GPU: its bytes go through a host buffer)."""
    if tensor.device.type != "cpu":
        return None
    return _bytes_of(tensor).numpy().data


class _Fetch:
    """One fetch_state call: where from, what into, and the connections that fetch chunks.

    The manifest comes over the caller's aiohttp session; the chunks over
    blocking ``http.client`` connections, one thread each, that read the body
    with ``readinto`` straight into the destination's memory.  An event loop
    cost more than the copy it fed: aiohttp hands over each received block as
    a fresh ``bytes`` (allocated, faulted in, then copied again), and every
    block is another trip through the loop.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        address: str,
        step: int,
        into: Destination,
        token: str | None,
        timeout: float,
    ) -> None:
        self.session = session
        self.address = address
        self.base = address if "://" in address else f"http://{address}"
        url = urllib.parse.urlsplit(self.base)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"a donor's address is host:port or an http:// URL, got {address!r}")
        self.host, self.port, self.path = url.hostname, url.port or 80, url.path.rstrip("/")
        self.step = step
        self.destination = into
        self.into: Mapping[str, torch.Tensor] = {}
        self.headers = {} if token is None else guard.authorization(token)
        # A bound on any one blocking socket call; the deadline of the whole
        # fetch is enforced by stop(), which shuts every connection down.
        self.timeout = timeout
        self.refetches = 0
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] | None = []

    async def manifest(self) -> _Layout:
        async with self.session.get(
            f"{self.base}/v1/heal/manifest", params={"step": self.step}, headers=self.headers
        ) as response:
            body = await _read_body(
                response,
                MAX_MESSAGE_BYTES if response.status == 200 else _ERROR_BODY_LIMIT,
                self.address,
            )
            if response.status != 200:
                raise _refusal(response.status, body, "the manifest", self.address)
        layout, self.into = _read_manifest(body, self.step, self.destination)
        return layout

    async def chunks(self, layout: _Layout, parallel: int) -> None:
        """Fetch every chunk over ``parallel`` connections.  Returns or raises
        only once no thread writes into the destination any more."""
        tensors = [_bytes_of(self.into[spec.name]) for spec in layout.specs]
        # Per segment: the tensor, and the memory a socket reads it into.
        # Segment 0, the safetensors header, is already known: it goes to scratch.
        targets = [None, *tensors]
        landings = [memoryview(bytearray(len(layout.header))), *map(_landing, tensors)]
        pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(layout.num_chunks):
            pending.put(index)
        workers = min(parallel, layout.num_chunks)
        with concurrent.futures.ThreadPoolExecutor(workers, "ftdiloco-heal") as pool:
            futures = [
                asyncio.wrap_future(pool.submit(self.worker, layout, pending, targets, landings))
                for _ in range(workers)
            ]
            try:
                done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                self.stop()
                # Even when cancelled (the deadline): stop() ends their reads at once.
                await asyncio.wait(futures)
                # What stop() made the other threads raise is expected, not
                # lost: mark it retrieved (asyncio would log it as unhandled).
                for future in futures:
                    future.exception()
        # The first failures, not those stop() caused in the other threads.
        for future in done:
            future.result()
        self.refetches = sum(future.result() for future in futures)

    def stop(self) -> None:
        """Shut every chunk connection down, so that a thread blocked on one
        returns at once, and let no thread open another."""
        with self._lock:
            connections, self._connections = self._connections or [], None
        for connection in connections:
            if connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)

    def worker(
        self,
        layout: _Layout,
        pending: queue.SimpleQueue[int],
        targets: Sequence[torch.Tensor | None],
        landings: Sequence[memoryview | None],
    ) -> int:
        """Fetch chunks over a connection of its own until none is left (or
        stop()); returns how many it had to fetch again."""
        # For destinations a socket cannot reach; allocated only if there are any.
        staging = bytearray(layout.chunk_bytes if None in landings else 0)
        refetches = 0
        # The timeout bounds connecting (again too, should the donor close
        # the connection); stop() ends blocked reads at the deadline.
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        with self._lock:
            if self._connections is None:
                return refetches
            self._connections.append(connection)
        try:
            connection.connect()
            # Reads block without a timeout: with one, every recv first
            # polls the socket (~0.03 CPU-s/GB more).
            connection.sock.settimeout(None)
            # Checked before each chunk: stop() cannot shut down a connection
            # that was not open yet.
            while self._connections is not None:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    break
                for attempt in Retrying(
                    stop=stop_after_attempt(_CHECKSUM_ATTEMPTS),
                    retry=retry_if_exception_type(_ChecksumMismatch),
                    reraise=True,
                ):
                    with attempt:
                        if attempt.retry_state.attempt_number > 1:
                            refetches += 1
                        self.chunk(connection, layout, index, targets, landings, staging)
            return refetches
        except (OSError, http.client.HTTPException) as e:
            raise HealError(
                f"donor {self.address} went away: {type(e).__name__}: {e}", "donor_gone"
            ) from e
        finally:
            connection.close()

    def chunk(
        self,
        connection: http.client.HTTPConnection,
        layout: _Layout,
        index: int,
        targets: Sequence[torch.Tensor | None],
        landings: Sequence[memoryview | None],
        staging: bytearray,
    ) -> None:
        """Read chunk ``index`` into its place and check it against the
        checksum the donor sent with it, hashing each slice just read while
        it is still in the CPU's cache."""
        start, end = layout.chunk_span(index)
        connection.request(
            "GET", f"{self.path}/v1/heal/chunk/{index}?step={self.step}", headers=self.headers
        )
        with connection.getresponse() as response:
            if response.status != 200:
                body = response.read(_ERROR_BODY_LIMIT)
                raise _refusal(response.status, body, f"chunk {index}", self.address)
            if response.length != end - start:
                raise HealError(
                    f"donor {self.address} sent chunk {index} with length "
                    f"{response.length}, expected {end - start}",
                    "protocol",
                )
            expected = _checksum_header(response.getheader(CHECKSUM_HEADER), index, self.address)
            hasher = xxhash.xxh3_64()
            for segment, offset, at, length in layout.pieces(index):
                landing = landings[segment]
                into = (
                    memoryview(staging)[at : at + length]
                    if landing is None
                    else landing[offset : offset + length]
                )
                for begin in range(0, length, _READ_BYTES):
                    piece = into[begin : begin + _READ_BYTES]
                    if response.readinto(piece) != len(piece):
                        raise HealError(
                            f"donor {self.address} went away in the middle of chunk {index}",
                            "donor_gone",
                        )
                    hasher.update(piece)
                target = targets[segment]
                if landing is None and target is not None:
                    staged = torch.frombuffer(staging, dtype=torch.uint8)[at : at + length]
                    target[offset : offset + length].copy_(staged)
        if hasher.intdigest() != expected:
            raise _ChecksumMismatch(
                f"chunk {index} from donor {self.address} failed its {CHECKSUM} check "
                f"{_CHECKSUM_ATTEMPTS} times",
                "checksum",
            )


async def fetch_state(
    address: str,
    step: int,
    into: Destination,
    *,
    token: str | None = None,
    parallel: int = 4,
    timeout: float = 60.0,
    session: aiohttp.ClientSession | None = None,
) -> Mapping[str, torch.Tensor]:
    """Copy the state a donor committed at ``step`` into the tensors of ``into``.

    ``into`` may also be a function that, given the donor's tensors as
    (name, dtype, shape), returns the destination: how a receiver whose state
    is laid out lazily (an optimizer before its first step) allocates what
    it lacks.  Returns the destination that was filled.

    ``address`` is the donor's manager server, ``host:port`` or a URL.  The
    donor's tensor names, dtypes and shapes must equal ``into``'s (whose
    tensors must be contiguous); otherwise HealError names the first
    difference before anything is written.  Chunks are fetched over
    ``parallel`` connections, checked against the checksum the donor sends
    with each (a damaged chunk is fetched again, a few times).  They are
    read straight into ``into``'s memory, so the extra memory is a few
    buffers per connection; only a destination on a GPU is staged through
    one chunk per connection.  ``session``, if given, carries the manifest
    request; the chunks go over connections of their own.

    Contract: on HealError (``code``: ``step_mismatch``, ``not_ready``,
    ``unauthorized``, ``layout_mismatch``, ``checksum``, ``donor_gone``,
    ``timeout``, ``protocol``) the tensors of ``into`` may hold a mix of
    old and new bytes and must not be treated as committed state: heal again,
    from this or another donor, before using them.  When this returns or
    raises, nothing is writing into them any more.  ``timeout`` bounds the
    whole call.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    began = time.perf_counter()
    try:
        if session is None:
            # No session-wide deadline: wait_for below is the one that counts.
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as own:
                fetch = _Fetch(own, address, step, into, token, timeout)
                total = await asyncio.wait_for(_run(fetch, parallel), timeout)
        else:
            fetch = _Fetch(session, address, step, into, token, timeout)
            total = await asyncio.wait_for(_run(fetch, parallel), timeout)
    except asyncio.TimeoutError:
        error = HealError(f"heal from {address} took longer than {timeout:g}s", "timeout")
        log.warning("heal failed", donor=address, step=step, code=error.code, error=str(error))
        raise error from None
    except HealError as error:
        log.warning("heal failed", donor=address, step=step, code=error.code, error=str(error))
        raise
    seconds = time.perf_counter() - began
    log.info(
        "heal fetched",
        donor=address,
        step=step,
        bytes=total,
        seconds=round(seconds, 3),
        gbps=round(total / seconds / 1e9, 3),
        refetched_chunks=fetch.refetches,
    )
    return fetch.into


async def _run(fetch: _Fetch, parallel: int) -> int:
    try:
        layout = await fetch.manifest()
        await fetch.chunks(layout, parallel)
    except (aiohttp.ClientError, OSError) as e:
        raise HealError(
            f"donor {fetch.address} went away: {type(e).__name__}: {e}", "donor_gone"
        ) from e
    return layout.total


def fetch_state_blocking(
    address: str,
    step: int,
    into: Destination,
    *,
    token: str | None = None,
    parallel: int = 4,
    timeout: float = 60.0,
) -> Mapping[str, torch.Tensor]:
    """:func:`fetch_state` for a thread without a running event loop."""
    return asyncio.run(
        fetch_state(address, step, into, token=token, parallel=parallel, timeout=timeout)
    )
