"""The process group that spans one rank of every replica group in a quorum.

It is rebuilt whenever the quorum id changes, on a store prefix unique to
that quorum, so a group that died and came back never meets stale keys, and a
half-built group from an abandoned quorum never meets a new one.  Gloo on CPU,
NCCL on GPU; every operation carries the collective deadline.

The store is ours, not torch's TCPStore: torch's server listens on every
interface whatever host it is given, and serves anyone who connects.  A
group's rank 0 hosts a :class:`RendezvousStore` instead: an aiohttp route
bound to the configured host only, behind the shared token (ftwire.guard),
with bounded keys, values, memory and waiters.  The process groups reach it
through :class:`StoreClient`, a ``torch.distributed.Store`` implemented in
Python, so gloo and NCCL rendezvous on it as on any store.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Protocol, cast

import aiohttp
import structlog
import torch
import torch.distributed as dist
from aiohttp import web
from torch._C._distributed_c10d import (
    PrefixStore,
    ProcessGroupGloo,
    Store,
    Work,
)

from ftwire import guard, protocol
from ftwire.background import BackgroundLoop

log = structlog.get_logger(__name__)


class CrossGroup(Protocol):
    """What the manager uses of a gloo or NCCL backend (the stubs omit collectives)."""

    def allreduce(self, tensors: list[torch.Tensor]) -> Work: ...

    def allgather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor]
    ) -> Work: ...

    def abort(self) -> None: ...


# What the store holds at most: keys and values together.  Old keys (the
# rendezvous of quorums long gone) make room for new ones.
MAX_STORE_BYTES = 16 << 20
MAX_KEY_CHARS = 1024
MAX_VALUE_BYTES = 64 << 10
# Requests that may wait for keys at once; more are refused with 429.
MAX_WAITERS = 1024
STORE_PATH = "/v1/store"
_OPS = ("set", "get", "add", "check", "wait", "compare_set", "delete", "num_keys")

_shared: BackgroundLoop | None = None
_shared_lock = threading.Lock()


def _store_loop() -> BackgroundLoop:
    """One loop per process for every store server and client (created on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = BackgroundLoop("ftdiloco-store")
        return _shared


class RendezvousStore:
    """The key-value store a group's rank 0 hosts for the quorums that pick it.

    ``POST /v1/store`` with a msgpack map: ``op`` (one of set, get, add, check,
    wait, compare_set, delete, num_keys), ``key`` or ``keys``, and the op's
    operands; get and wait wait for the keys up to ``timeout_ms``.  Answers
    are msgpack maps; refusals are guard's 4xx answers.
    """

    def __init__(self, host: str, port: int, timeout: float, token: str | None) -> None:
        self.timeout = timeout
        self._token = token
        self._data: dict[str, bytes] = {}
        self._bytes = 0
        self._changed = asyncio.Event()
        self._waiters = 0
        self._evicted = 0
        self._runner: web.AppRunner | None = None
        self._loop = _store_loop()
        sock = _bind(host, port)  # bound here: a busy port fails in the caller
        self.host = host
        self.port: int = sock.getsockname()[1]
        self._loop.run(self._start(sock), timeout=30)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def _start(self, sock: socket.socket) -> None:
        self._changed = asyncio.Event()
        app = web.Application(client_max_size=protocol.MAX_MESSAGE_BYTES)
        guard.install(app)
        app.router.add_post(STORE_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            self._loop.run(runner.cleanup(), timeout=10)

    # -- the state ---------------------------------------------------------------

    def _put(self, key: str, value: bytes) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= len(key) + len(old)
        self._data[key] = value
        self._bytes += len(key) + len(value)
        while self._bytes > MAX_STORE_BYTES:
            oldest = next(iter(self._data))
            self._bytes -= len(oldest) + len(self._data.pop(oldest))
            self._evicted += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until_present(self, keys: list[str], timeout: float) -> list[str]:
        """Wait until every key is present or ``timeout`` passes; the keys still missing."""
        deadline = asyncio.get_running_loop().time() + timeout
        missing = [k for k in keys if k not in self._data]
        if not missing or timeout <= 0:
            return missing
        if self._waiters >= MAX_WAITERS:
            raise guard.Refused(429, "busy", f"{self._waiters} requests are waiting for keys")
        self._waiters += 1
        try:
            while missing:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
                missing = [k for k in missing if k not in self._data]
        finally:
            self._waiters -= 1
        return missing

    # -- HTTP ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        guard.authorize(request, self._token)
        message = protocol.unpack(await guard.read_body(request))
        op = protocol.read_text(message, "op", 32)
        if op not in _OPS:
            raise protocol.ProtocolError(f"unknown op {protocol.describe(op)}; use one of {_OPS}")
        answer = await getattr(self, f"_op_{op}")(message)
        return web.Response(body=protocol.pack(answer), content_type=protocol.CONTENT_TYPE)

    def _timeout(self, message: dict[str, Any]) -> float:
        ms = protocol.read_count(message, "timeout_ms", 0, int(self.timeout * 1000))
        return float(min(ms, 24 * 3600 * 1000)) / 1000

    async def _op_set(self, message: dict[str, Any]) -> dict[str, Any]:
        self._put(_key(message), _value(message, "value"))
        return {}

    async def _op_get(self, message: dict[str, Any]) -> dict[str, Any]:
        key = _key(message)
        if await self._until_present([key], self._timeout(message)):
            return {"missing": [key]}
        return {"value": self._data[key]}

    async def _op_add(self, message: dict[str, Any]) -> dict[str, Any]:
        key = _key(message)
        amount = protocol.read_field(message, "amount", int)
        try:
            current = int(self._data.get(key, b"0"))
        except ValueError:
            raise guard.Refused(
                409, "not_a_number", f"key {key!r} does not hold a number"
            ) from None
        total = current + amount
        if not -(1 << 63) <= total < 1 << 63:
            raise guard.Refused(409, "overflow", f"key {key!r} would overflow 64 bits")
        self._put(key, str(total).encode())
        return {"value": total}

    async def _op_check(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"present": all(k in self._data for k in _keys(message))}

    async def _op_wait(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"missing": await self._until_present(_keys(message), self._timeout(message))}

    async def _op_compare_set(self, message: dict[str, Any]) -> dict[str, Any]:
        key = _key(message)
        expected, desired = _value(message, "expected"), _value(message, "desired")
        current = self._data.get(key)
        if (current is None and not expected) or current == expected:
            self._put(key, desired)
            return {"value": desired}
        return {"value": current if current is not None else expected}

    async def _op_delete(self, message: dict[str, Any]) -> dict[str, Any]:
        key = _key(message)
        value = self._data.pop(key, None)
        if value is not None:
            self._bytes -= len(key) + len(value)
        return {"deleted": value is not None}

    async def _op_num_keys(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"count": len(self._data)}


def _key(message: dict[str, Any]) -> str:
    return protocol.read_text(message, "key", MAX_KEY_CHARS)


def _keys(message: dict[str, Any]) -> list[str]:
    keys = protocol.read_field(message, "keys", list)
    if not all(type(k) is str and len(k) <= MAX_KEY_CHARS for k in keys):
        raise protocol.ProtocolError(f"field 'keys' must hold strings of <= {MAX_KEY_CHARS}")
    return keys


def _value(message: dict[str, Any], name: str) -> bytes:
    value = protocol.read_field(message, name, bytes)
    if len(value) > MAX_VALUE_BYTES:
        raise protocol.ProtocolError(f"field {name!r} is longer than {MAX_VALUE_BYTES} bytes")
    return value


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family)


def host_store(host: str, port: int, timeout: float, token: str | None = None) -> RendezvousStore:
    """The store a group's rank 0 hosts for the quorums that pick it, on ``host`` only."""
    return RendezvousStore(host, port, timeout, token)


class StoreClient(Store):
    """A ``torch.distributed.Store`` that talks to a :class:`RendezvousStore`.

    gloo and NCCL call it from their own threads; every call blocks on the
    process's store loop with the deadline given here.
    """

    def __init__(self, address: str, timeout: float, token: str | None) -> None:
        super().__init__()
        host, port = split_address(address)
        host = f"[{host}]" if ":" in host else host
        self._url = f"http://{host}:{port}{STORE_PATH}"
        self._deadline = timeout
        self._headers = {"Content-Type": protocol.CONTENT_TYPE}
        if token is not None:
            self._headers.update(guard.authorization(token))
        self._loop = _store_loop()

    def _call(self, op: str, wait: float = 0.0, **fields: Any) -> dict[str, Any]:
        body = protocol.pack({"op": op, **fields})
        return self._loop.run(self._post(op, body, wait), timeout=wait + self._deadline + 5)

    async def _post(self, op: str, body: bytes, wait: float) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=wait + self._deadline)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(self._url, data=body, headers=self._headers, timeout=timeout) as reply,
            ):
                payload = await reply.read()
                if reply.status != 200:
                    code, text = protocol.decode_error(payload)
                    raise dist.DistStoreError(
                        f"store {self._url} refused {op} (HTTP {reply.status} {code}): {text}"
                    )
                return protocol.unpack(payload)
        except (aiohttp.ClientError, TimeoutError, protocol.ProtocolError) as e:
            raise dist.DistStoreError(f"store {self._url}: {op} failed: {e!r}") from e

    def _wait_s(self, timeout: timedelta | None) -> float:
        return self._deadline if timeout is None else timeout.total_seconds()

    def set(self, key: str, value: Any) -> None:
        self._call("set", key=key, value=_as_bytes(value))

    def get(self, key: str) -> bytes:
        answer = self._call("get", self._deadline, key=key, timeout_ms=_ms(self._deadline))
        if "missing" in answer:
            raise dist.DistStoreError(
                f"store {self._url}: key {key!r} not set within {self._deadline:g}s"
            )
        return cast(bytes, answer["value"])

    def add(self, key: str, amount: int) -> int:
        return cast(int, self._call("add", key=key, amount=amount)["value"])

    def check(self, keys: list[str]) -> bool:
        return cast(bool, self._call("check", keys=list(keys))["present"])

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        seconds = self._wait_s(timeout)
        missing = self._call("wait", seconds, keys=list(keys), timeout_ms=_ms(seconds))["missing"]
        if missing:
            raise dist.DistStoreError(
                f"store {self._url}: keys {missing[:8]} not set within {seconds:g}s"
            )

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        answer = self._call(
            "compare_set", key=key, expected=_as_bytes(expected), desired=_as_bytes(desired)
        )
        return cast(bytes, answer["value"])

    def delete_key(self, key: str) -> bool:
        return cast(bool, self._call("delete", key=key)["deleted"])

    def num_keys(self) -> int:
        return cast(int, self._call("num_keys")["count"])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys: list[str], values: Iterable[Any]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"store address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def connect(
    *,
    backend: str,
    store_address: str,
    prefix: str,
    rank: int,
    world_size: int,
    timeout: float,
    host: str,
    token: str | None = None,
) -> CrossGroup:
    """Build the cross-group process group; blocks until every member connects.

    Callers run this off the main thread: a member that died after the quorum
    formed would otherwise hold the caller until the deadline.
    """
    deadline = timedelta(seconds=timeout)
    client = StoreClient(store_address, timeout, token)
    store = PrefixStore(prefix, client)
    if backend == "gloo":
        opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = deadline
        opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        pg = cast(CrossGroup, ProcessGroupGloo(store, rank, world_size, opts))
    elif backend == "nccl":
        from torch._C._distributed_c10d import ProcessGroupNCCL  # absent from CPU builds

        nccl_opts = ProcessGroupNCCL.Options()
        nccl_opts._timeout = deadline
        pg = cast(CrossGroup, ProcessGroupNCCL(store, rank, world_size, nccl_opts))
        # NCCL connects lazily; a first tiny collective makes every member
        # meet now, inside the caller's deadline, not in the first allreduce.
        probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        pg.allreduce([probe]).wait()
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'gloo' or 'nccl'")
    log.debug("process group ready", prefix=prefix, rank=rank, world_size=world_size)
    return pg


def abort(pg: CrossGroup) -> None:
    """Ask the backend to abandon a group whose peers are gone.

    Do not wait for it to release anything: with gloo (torch 2.13) a
    collective stuck on a missing peer still waits until the group's
    deadline after ``abort`` returned.  So callers run it on a side thread,
    never wait for the stuck collective, and never reuse its buffers
    (:meth:`ftdiloco.coordination.collective.Collective.abandon`).
    """
    try:
        pg.abort()
    except Exception as e:  # aborting a broken group may itself fail; nothing to do
        log.debug("process group abort failed", error=repr(e))
