"""A lean HTTP/1.1 and WebSocket client for simulating many replicas in one process.

Why not aiohttp's client, or the project's: the bench box has two cores.
aiohttp's client spends ~0.15 ms of CPU per join at N=256 (0.3 ms at 1000) and
the project's client another 0.8 ms (4 ms) decoding each answer, so one
process simulating 256 replicas would measure itself rather than the daemon.
This client writes pre-encoded requests and parses only the status line, two
headers and WebSocket frame lengths; the daemon still sees ordinary HTTP/1.1
and RFC 6455 traffic.  Each answer's arrival time is taken in
``data_received``, the moment its last byte is read, so the bench's own
scheduling does not inflate the latencies.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import time
import zlib
from typing import Any, NamedTuple

from ftwire import protocol


class Reply(NamedTuple):
    status: int
    body: bytes  # as sent: still compressed if ``encoding`` says so
    received: float  # time.monotonic() when the last byte arrived
    encoding: bytes = b""  # Content-Encoding

    def decoded(self) -> bytes:
        if self.encoding == b"deflate":
            return zlib.decompress(self.body)
        if self.encoding == b"gzip":
            return gzip.decompress(self.body)
        if self.encoding:
            raise ValueError(f"unexpected Content-Encoding {self.encoding!r}")
        return self.body


def http_request(method: str, authority: str, path: str, body: bytes = b"") -> bytes:
    """One pre-encoded request, written as-is every round."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"
        f"Content-Type: {protocol.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
        # What aiohttp's client sends too; a lighthouse may then compress large answers.
        "Accept-Encoding: gzip, deflate\r\n\r\n"
    )
    return head.encode() + body


class HttpConnection(asyncio.Protocol):
    """A keep-alive connection with one request in flight; the answer's time is taken on arrival."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._status = 0
        self._encoding = b""
        self._body_at = -1
        self._end = -1
        self._waiter: asyncio.Future[Reply] | None = None
        self.received_bytes = 0

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"lighthouse closed the connection: {exc}"))

    def request(self, raw: bytes) -> asyncio.Future[Reply]:
        assert self._transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return self._waiter

    async def get_json(self, authority: str, path: str) -> Any:
        reply = await self.request(http_request("GET", authority, path))
        return json.loads(reply.decoded())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self._buffer += data
        if self._end < 0:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            self._status, length, self._encoding = _parse_head(bytes(self._buffer[:head_end]))
            self._body_at = head_end + 4
            self._end = self._body_at + length
        if len(self._buffer) < self._end:
            return
        received = time.monotonic()
        body = bytes(self._buffer[self._body_at : self._end])
        del self._buffer[: self._end]
        self._end = -1
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Reply(self._status, body, received, self._encoding))


def _parse_head(head: bytes) -> tuple[int, int, bytes]:
    """(status, Content-Length, Content-Encoding or b"")."""
    lines = head.split(b"\r\n")
    status, length, encoding = int(lines[0].split()[1]), -1, b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"content-encoding":
            encoding = value.strip().lower()
    if length < 0:
        raise ValueError(f"answer without Content-Length: {lines[0]!r}")
    return status, length, encoding


# -- WebSocket --------------------------------------------------------------------------------

_WS_BINARY, _WS_CLOSE, _WS_PING, _WS_PONG = 0x2, 0x8, 0x9, 0xA


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (RFC 6455 5.2); payloads here are under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


class WsConnection(asyncio.Protocol):
    """A replica's liveness socket: sends heartbeat frames, answers pings, skips events.

    ``beat`` is the heartbeat frame's payload; the same masked frame is
    written every time (a fixed mask is enough for a benchmark on loopback).
    Pushed events are counted and skipped without being copied.
    """

    def __init__(self, replica_id: str, beat: bytes) -> None:
        self.replica_id = replica_id
        self.heartbeat = _masked_frame(_WS_BINARY, beat)
        self.events = 0
        self.received_bytes = 0
        self.closed = False
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of a data frame still to be discarded

    @classmethod
    async def open(cls, host: str, port: int, replica_id: str, beat: bytes) -> WsConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(replica_id, beat), host, port)
        assert conn._transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        conn._transport.write(
            (
                f"GET /v1/ws?replica_id={replica_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await conn.upgraded
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"WebSocket upgrade failed: {exc}"))

    def beat(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(self.heartbeat)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buffer += data
        if not self.upgraded.done():
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            if not self._buffer.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(ConnectionError(bytes(self._buffer[:200]).decode()))
                return
            del self._buffer[: head_end + 4]
            self.upgraded.set_result(None)
        while self._frame():
            pass

    def _frame(self) -> bool:
        """Consume one frame from the buffer; False when more bytes are needed."""
        buf = self._buffer
        if len(buf) < 2:
            return False
        opcode, length, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return False
            length, at = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return False
            length, at = int.from_bytes(buf[2:10], "big"), 10
        if opcode < 0x8:  # data: count it, drop the payload as it streams past
            self.events += 1
            available = len(buf) - at
            if available < length:
                self._skip = length - available
                buf.clear()
                return False
            del buf[: at + length]
            return True
        if len(buf) < at + length:
            return False
        payload = bytes(buf[at : at + length])
        del buf[: at + length]
        if opcode == _WS_PING and self._transport is not None:
            self._transport.write(_masked_frame(_WS_PONG, payload))
        elif opcode == _WS_CLOSE:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        return True
