"""Talking to the lighthouse from a replica group: asyncio for the library, blocking for training.

The lighthouse keeps soft state only, so it may restart, and a job may list a
standby at another address.  This client hides both: a request that could not
reach a lighthouse (refused, dropped, 502, 503 overloaded) moves on to the next
address and is retried by tenacity with jittered exponential backoff, and a
join whose long-poll breaks -- the lighthouse restarted under it -- joins again
within what is left of its timeout.  That is how a lighthouse restart costs a
replica at most one retry instead of an outer step.

What a caller must act on arrives as a typed :class:`LighthouseError`: the
quorum did not form (:class:`QuorumTimeout`), the token is wrong
(:class:`Unauthorized`), the request itself is wrong or was superseded
(:class:`RequestRejected`), or no lighthouse could be reached at all
(:class:`LighthouseUnavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    stop_never,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from ftwire import protocol
from ftwire.background import BackgroundLoop
from ftwire.messages import Fence, Member, Quorum

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "AsyncLighthouseClient",
    "LighthouseClient",
    "LighthouseError",
    "LighthouseHTTPError",
    "LighthouseShuttingDown",
    "LighthouseUnavailable",
    "LivenessLink",
    "QuorumTimeout",
    "RequestRejected",
    "Unauthorized",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Backoff between attempts: the first retry comes within 50 ms (a lighthouse
# restart is over in about a second), later ones at most 2 s apart.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0
# How often a replica that cannot reach the lighthouse says so (one line each time).
WAITING_REPORT_EVERY_S = 5.0
# Seconds between a liveness link's heartbeats, a fifth of the lighthouse's default
# heartbeat timeout (5 s).  The heartbeat only has to catch a host that froze with its
# socket open; a process that dies closes the socket and is evicted at once, so a
# faster beat buys nothing and costs the lighthouse CPU for every replica.
DEFAULT_HEARTBEAT_INTERVAL = 1.0

PushedEvent = dict[str, Any]


# -- errors -------------------------------------------------------------------------


class LighthouseError(Exception):
    """Anything this client raises about the lighthouse."""


class LighthouseUnavailable(LighthouseError):
    """No address gave an answer before the retries ran out; ``cause`` is the last failure."""

    def __init__(self, addresses: Sequence[str], cause: BaseException) -> None:
        super().__init__(f"no lighthouse reachable at {', '.join(addresses)}: {_reason(cause)}")
        self.addresses = tuple(addresses)
        self.cause = cause


class LighthouseHTTPError(LighthouseError):
    """The lighthouse answered with an error; ``code`` and ``message`` are its own words."""

    def __init__(self, address: str, status: int, code: str, message: str) -> None:
        super().__init__(f"{address} answered {status} {code}: {message}")
        self.address = address
        self.status = status
        self.code = code
        self.message = message


class QuorumTimeout(LighthouseHTTPError):
    """The quorum did not form within the join's timeout; retrying the same join won't help."""

    @property
    def reason(self) -> str:
        """The lighthouse's account of why the quorum did not form."""
        return self.message


class Unauthorized(LighthouseHTTPError):
    """The token is missing or wrong; a retry cannot fix that."""


class RequestRejected(LighthouseHTTPError):
    """The request was malformed, too large, or superseded by a newer one from the same replica."""


class LighthouseShuttingDown(LighthouseHTTPError):
    """The lighthouse is stopping (an operator's shutdown or a restart)."""


class _Failover(Exception):
    """This address failed in a way that another address, or a later try, may not.

    ``move_on`` is False when the lighthouse itself is fine and only this
    request must be repeated: moving to another lighthouse would then split
    the replicas between two of them.
    """

    def __init__(self, address: str, cause: BaseException, *, move_on: bool = True) -> None:
        super().__init__(f"{address}: {_describe(cause)}")
        self.address = address
        self.cause = cause
        self.move_on = move_on


def _describe(error: BaseException) -> str:
    # Several aiohttp errors have an empty str(); the class name is the useful part.
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _error_for(address: str, status: int, code: str, message: str) -> Exception:
    """Map an error answer to what the caller can act on, or to a failover."""
    if status == 401:
        return Unauthorized(address, status, code, message)
    if status == 504 and code == "timeout":
        return QuorumTimeout(address, status, code, message)
    if status == 503 and code == "shutting_down":
        return _Failover(address, LighthouseShuttingDown(address, status, code, message))
    if status == 503 and code == "evicted":
        # The replica was declared dead while its join waited; the lighthouse
        # asks it to join again, there.
        return _Failover(
            address, LighthouseHTTPError(address, status, code, message), move_on=False
        )
    # 502/503/504 without our error code come from something between us and
    # the lighthouse, or from a lighthouse that is overloaded: try elsewhere.
    if status in (502, 503, 504):
        return _Failover(address, LighthouseHTTPError(address, status, code, message))
    if 400 <= status < 500:
        return RequestRejected(address, status, code, message)
    return LighthouseHTTPError(address, status, code, message)


# Which failovers a request retries.  A join retries through a shutdown: it is
# usually a restart, and the join's timeout bounds the wait anyway.  A shutdown
# request retries only when nothing was sent, so a lost answer can never stop
# a second lighthouse.
def _any_failure(cause: BaseException) -> bool:
    return True


def _not_shutting_down(cause: BaseException) -> bool:
    return not isinstance(cause, LighthouseShuttingDown)


def _nothing_sent(cause: BaseException) -> bool:
    return isinstance(cause, aiohttp.ClientConnectorError)


def _normalize(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """``host:port`` or a URL; one string may hold several, comma-separated (as env vars do)."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    stripped = (item.strip().rstrip("/") for item in items)
    urls = tuple(a if "://" in a else f"http://{a}" for a in stripped if a)
    if not urls:
        raise ValueError(f"no lighthouse address in {addresses!r}")
    return urls


# -- the asyncio client ----------------------------------------------------------------


class AsyncLighthouseClient:
    """One aiohttp session to the lighthouse, shared by every request and liveness link.

    ``connect_timeout`` bounds connecting, and waiting for the answer to a
    short request; a lighthouse slower than that counts as failed and the next
    address is tried.  ``retry_deadline`` bounds the retries of a short request
    and of a liveness link's first connection; a join retries within its own
    timeout instead, since its caller already said how long it will wait.
    ``say_waiting``: while retrying, print "waiting for lighthouse ..." on
    stderr every few seconds (a command that prints its own one line says no).
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        token: str | None = None,
        *,
        connect_timeout: float = 5.0,
        retry_deadline: float = 30.0,
        say_waiting: bool = True,
    ) -> None:
        self.addresses = _normalize(addresses)
        self.connect_timeout = connect_timeout
        self.retry_deadline = retry_deadline
        self.say_waiting = say_waiting
        self._headers = {protocol.TOKEN_HEADER: f"Bearer {token}"} if token else {}
        # Index of the address that last worked; requests start there.
        self._current = 0
        self._http: aiohttp.ClientSession | None = None
        self._closed = False
        self._links: set[LivenessLink] = set()

    async def __aenter__(self) -> AsyncLighthouseClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every liveness link (the lighthouse then drops those replicas) and the session."""
        self._closed = True
        for link in list(self._links):
            await link.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- requests ---------------------------------------------------------------------

    async def join(self, member: Member, timeout: float) -> Quorum:
        """Wait until a quorum forms and return it.

        Raises :class:`QuorumTimeout` when the lighthouse gives up after
        ``timeout``; a lighthouse that vanishes mid-wait is joined again (on
        this or the next address) with the time that is left.
        """
        deadline = time.monotonic() + timeout

        async def attempt(address: str) -> Quorum:
            # Each attempt asks for what is left, so a re-join still ends on time.
            remaining = max(deadline - time.monotonic(), 0.001)
            body = protocol.encode_join(member, remaining)
            reply = await self._exchange("POST", address, "/v1/join", body, wait=remaining)
            message = _decode(address, reply)
            if len(self.addresses) > 1 and message.get("lease") is not True:
                # Two lighthouses serving one job would each form quorums: a fork.
                raise LighthouseError(
                    f"{address} serves without --lease, but this replica was given"
                    f" {len(self.addresses)} lighthouse addresses: start every lighthouse"
                    " of the job with the same --lease PATH, or give one address"
                )
            try:
                return protocol.decode_quorum(_field(message, "quorum"))
            except protocol.ProtocolError as e:
                raise LighthouseError(f"{address} sent an unreadable quorum: {e}") from e

        return await self._with_failover(
            "join", attempt, stop_before_delay(timeout), _any_failure, timeout
        )

    async def heartbeat(self, replica_id: str, liveness: protocol.Liveness | None = None) -> None:
        await self._post("/v1/heartbeat", protocol.encode_heartbeat(replica_id, liveness))

    async def fence(self, replica_id: str, quorum_id: int, step: int) -> Fence:
        """May ``replica_id`` commit the step after ``step`` that quorum ``quorum_id`` ran?

        Asked once, of the lighthouse that answered the join (no other one
        knows the quorum); any failure raises, and the caller must not commit.
        """
        address = self.addresses[self._current]
        body = protocol.encode_fence(replica_id, quorum_id, step)
        try:
            reply = await self._exchange("POST", address, "/v1/fence", body)
        except _Failover as e:
            raise LighthouseUnavailable((address,), e.cause) from e.cause
        try:
            return protocol.decode_fence_answer(_decode(address, reply))
        except protocol.ProtocolError as e:
            raise LighthouseError(f"{address} sent an unreadable fence answer: {e}") from e

    async def kill(self, replica_id: str, reason: str = "") -> bool:
        """Evict a replica and tell it why; False when the lighthouse did not know it."""
        reply = await self._post("/v1/kill", protocol.encode_kill(replica_id, reason))
        return reply.get("known") is True

    async def set_settings(
        self, outer_lr: float | None = None, outer_momentum: float | None = None
    ) -> dict[str, float]:
        """Change the job's outer learning rate and/or momentum live; returns the values
        pending, which every group applies from the step after the next quorum's."""
        given = {"outer_lr": outer_lr, "outer_momentum": outer_momentum}
        reply = await self._post(
            "/v1/settings", protocol.pack({k: v for k, v in given.items() if v is not None})
        )
        pending = reply.get("pending")
        return dict(pending) if isinstance(pending, dict) else {}

    async def checkpoint_all(self) -> dict[str, str]:
        """Ask every connected group to save a checkpoint; what each group's manager said."""
        reply = await self._post("/v1/checkpoint", protocol.pack({}))
        groups = reply.get("groups")
        if not isinstance(groups, dict):
            raise LighthouseError("the lighthouse's checkpoint answer has no map 'groups'")
        return {str(rid): str(answer) for rid, answer in groups.items()}

    async def shutdown(self) -> None:
        """Stop the first lighthouse that answers; waiting joins get 503 shutting_down."""
        await self._post("/v1/shutdown", protocol.pack({}), _nothing_sent)

    async def status(self) -> dict[str, Any]:
        async def attempt(address: str) -> dict[str, Any]:
            body = await self._exchange("GET", address, "/status")
            try:
                status = json.loads(body)
            except ValueError as e:
                raise LighthouseError(f"{address} sent unreadable status JSON: {e}") from e
            if not isinstance(status, dict):
                raise LighthouseError(f"{address} sent status that is not an object")
            return status

        return await self._with_failover(
            "status", attempt, self._short_stop(), _not_shutting_down, self.retry_deadline
        )

    def liveness(
        self,
        replica_id: str,
        on_event: Callable[[PushedEvent], None],
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        state: Callable[[], protocol.Liveness] | None = None,
    ) -> LivenessLink:
        """A link to start: it proves ``replica_id`` alive and delivers pushed events.

        ``state``, called for every heartbeat, tells the lighthouse this
        process's incarnation and committed step (see lighthouse.quorum).
        """
        return LivenessLink(self, replica_id, on_event, interval, state)

    # -- plumbing -------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the lighthouse client is closed")
        if self._http is None:
            # Created on first use, inside the loop that will run every request.
            # Its default timeout is what a WebSocket upgrade gets.
            self._http = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout())
        return self._http

    def _timeout(self, wait: float = 0.0) -> aiohttp.ClientTimeout:
        """``wait``: how long the lighthouse may legitimately hold a request (a long-poll)."""
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.connect_timeout + wait
        )

    def _short_stop(self) -> stop_base:
        return stop_before_delay(self.retry_deadline)

    async def _post(
        self,
        path: str,
        body: bytes,
        retry_on: Callable[[BaseException], bool] = _not_shutting_down,
    ) -> dict[str, Any]:
        async def attempt(address: str) -> dict[str, Any]:
            return _decode(address, await self._exchange("POST", address, path, body))

        return await self._with_failover(
            path, attempt, self._short_stop(), retry_on, self.retry_deadline
        )

    async def _exchange(
        self, method: str, address: str, path: str, body: bytes | None = None, wait: float = 0.0
    ) -> bytes:
        """One HTTP request; returns the body of a 200 and raises for anything else."""
        headers = {"Content-Type": protocol.CONTENT_TYPE} if body is not None else None
        try:
            async with self._session().request(
                method, address + path, data=body, headers=headers, timeout=self._timeout(wait)
            ) as response:
                status, data = response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _Failover(address, e) from e
        if status == 200:
            return data
        raise _error_for(address, status, *protocol.decode_error(data))

    async def _with_failover(
        self,
        what: str,
        attempt: Callable[[str], Awaitable[T]],
        stop: stop_base,
        retry_on: Callable[[BaseException], bool],
        deadline: float | None = None,
    ) -> T:
        """Run ``attempt`` against the current address until it succeeds or ``stop`` says so.

        ``deadline`` (seconds, None for never) is what ``stop`` allows; the
        line that says the lighthouse cannot be reached names it.
        """
        backoff = wait_random_exponential(multiplier=_BACKOFF_FIRST_S, max=_BACKOFF_MAX_S)

        def wait(state: RetryCallState) -> float:
            # The last pause ends at the deadline, so the last try is made there
            # (stop_before_delay would otherwise give up up to one pause early).
            pause = backoff(state)
            if deadline is None:
                return pause
            left = deadline - (state.seconds_since_start or 0.0) - 0.001
            return max(min(pause, left), 0.0)

        retrying = AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, _Failover) and retry_on(e.cause)),
            before_sleep=_Waiting(what, deadline, self.say_waiting),
            reraise=True,
        )
        try:
            result: T = await retrying(self._on_current_address, attempt)
        except _Failover as e:
            if isinstance(e.cause, LighthouseShuttingDown):
                raise e.cause from None
            raise LighthouseUnavailable(self.addresses, e.cause) from e.cause
        return result

    async def _on_current_address(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        index = self._current
        try:
            return await attempt(self.addresses[index])
        except _Failover as e:
            # Concurrent requests failing on the same address move on only once.
            if e.move_on and self._current == index:
                self._current = (index + 1) % len(self.addresses)
            raise


class _Waiting:
    """Says, on one line every few seconds, that the lighthouse cannot be reached yet.

    ``waiting for lighthouse http://h:29510: connection refused (12 s of 60 s)``
    goes to stderr, where a person watching a job looks, instead of a
    structured warning per retry; each retry is still logged at debug level.
    """

    def __init__(self, what: str, deadline: float | None, say: bool = True) -> None:
        self.what = what
        self.deadline = deadline
        self.say = say
        self._said_at: float | None = None

    def __call__(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        assert isinstance(failure, _Failover)  # nothing else is retried
        log.debug(
            "lighthouse request failed, retrying",
            request=self.what,
            address=failure.address,
            attempt=state.attempt_number,
            cause=_describe(failure.cause),
            retry_in_s=round(state.upcoming_sleep, 3),
        )
        if not self.say or not failure.move_on:
            return  # quiet, or the lighthouse answered and asked for this retry (evicted)
        elapsed = state.seconds_since_start or 0.0
        if self._said_at is not None and elapsed - self._said_at < WAITING_REPORT_EVERY_S:
            return
        self._said_at = elapsed
        of = f" of {_seconds(self.deadline)} s" if self.deadline is not None else ""
        print(
            f"waiting for lighthouse {failure.address}: {_reason(failure.cause)}"
            f" ({elapsed:.0f} s{of})",
            file=sys.stderr,
            flush=True,
        )


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def _reason(cause: BaseException) -> str:
    """Why an address failed, in the words a person would use."""
    if isinstance(cause, aiohttp.ClientConnectorError):
        os_error = cause.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(os_error, socket.gaierror):
            return f"cannot resolve {cause.host} ({os_error.strerror})"
        return os_error.strerror or _describe(os_error)
    if isinstance(cause, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "no answer in time"
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return "connection closed by the server"
    if isinstance(cause, LighthouseShuttingDown):
        return "the lighthouse is shutting down"
    if isinstance(cause, LighthouseHTTPError):
        return f"HTTP {cause.status} {cause.code}: {cause.message}"
    return _describe(cause)


def _decode(address: str, body: bytes) -> dict[str, Any]:
    try:
        return protocol.unpack(body, protocol.ANSWER)
    except protocol.ProtocolError as e:
        raise LighthouseError(f"{address} sent an unreadable answer: {e}") from e


def _field(message: dict[str, Any], name: str) -> dict[str, Any]:
    value = message.get(name)
    if not isinstance(value, dict):
        raise protocol.ProtocolError(f"answer has no map {name!r}")
    return value


# -- liveness ------------------------------------------------------------------------------


class LivenessLink:
    """One WebSocket that proves a replica alive and brings the lighthouse's pushed events.

    Closing the socket is how a replica says it is gone: the lighthouse evicts
    it at once and tells the survivors, instead of waiting out a heartbeat
    timeout.  So the link reconnects by itself when the lighthouse restarts,
    and :meth:`stop` is the clean way to leave.

    ``on_event`` runs on the event loop with every decoded event
    (``member_lost``, ``kill``; a quorum comes as a join's answer only); it
    must not block, and an exception from it is logged, never fatal to the link.
    """

    def __init__(
        self,
        client: AsyncLighthouseClient,
        replica_id: str,
        on_event: Callable[[PushedEvent], None],
        interval: float,
        state: Callable[[], protocol.Liveness] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.interval = interval
        self._state = state or protocol.Liveness
        # Set while a socket is open; cleared while reconnecting.
        self.connected = asyncio.Event()
        self._client = client
        self._on_event = on_event
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect (retrying for the client's ``retry_deadline``), then keep the link up.

        Raises what the first connection raised, e.g. :class:`Unauthorized`,
        so a misconfigured replica fails at start rather than being evicted later.
        """
        if self._task is not None:
            raise RuntimeError(f"liveness link for {self.replica_id!r} is already running")
        ws = await self._client._with_failover(
            "liveness",
            self._connect,
            self._client._short_stop(),
            _any_failure,
            self._client.retry_deadline,
        )
        self._task = asyncio.create_task(self._run(ws), name=f"liveness-{self.replica_id}")
        self._client._links.add(self)

    async def stop(self) -> None:
        """Close the socket with a close frame: the lighthouse evicts this replica at once."""
        task, self._task = self._task, None
        if task is None:
            return
        self._client._links.discard(self)
        task.cancel()
        await asyncio.wait([task])
        self.connected.clear()

    async def _connect(self, address: str) -> aiohttp.ClientWebSocketResponse:
        try:
            ws = await self._client._session().ws_connect(
                address + "/v1/ws",
                params={
                    "replica_id": self.replica_id,
                    "incarnation": self._state().incarnation,
                },
                # Pings detect a lighthouse host that vanished without closing the socket.
                heartbeat=self._client.connect_timeout,
                timeout=aiohttp.ClientWSTimeout(ws_close=self._client.connect_timeout),
            )
        except aiohttp.WSServerHandshakeError as e:
            # The upgrade's error body is not kept by aiohttp; the status must do.
            raise _error_for(address, e.status, "unknown", e.message) from e
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise _Failover(address, e) from e
        log.info("liveness link connected", replica_id=self.replica_id, address=address)
        self.connected.set()
        return ws

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        # One pass per connection; reconnecting is tenacity's job, and it never
        # gives up on a lighthouse that may come back -- only stop() ends this.
        while True:
            await self._serve(ws)
            self.connected.clear()
            log.warning("liveness link lost, reconnecting", replica_id=self.replica_id)
            try:
                ws = await self._client._with_failover(
                    "liveness", self._connect, stop_never, _any_failure
                )
            except LighthouseError as e:
                log.error("liveness link gave up", replica_id=self.replica_id, error=str(e))
                return

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        beats = asyncio.create_task(self._beat(ws))
        try:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.BINARY:
                    self._deliver(frame.data)
                else:
                    log.warning("ignoring a non-binary frame", type=frame.type.name)
        finally:
            beats.cancel()
            await ws.close()

    async def _beat(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        # A closing socket refuses writes; the reader notices the close itself.
        with contextlib.suppress(ConnectionResetError):
            while not ws.closed:
                beat = {"type": protocol.EVENT_HEARTBEAT, **self._state().encode()}
                await ws.send_bytes(protocol.pack(beat))
                await asyncio.sleep(self.interval)

    def _deliver(self, data: bytes) -> None:
        try:
            event = protocol.unpack(data, protocol.ANSWER)
            protocol.event_type(event)
        except protocol.ProtocolError as e:
            log.warning("ignoring an unreadable event", replica_id=self.replica_id, error=str(e))
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("liveness event handler failed", replica_id=self.replica_id)


# -- the blocking client ---------------------------------------------------------------


class LighthouseClient:
    """The same client for synchronous training code.

    Requests run on a background event loop (its own, or a shared
    :class:`BackgroundLoop` passed in) and their typed errors are raised in
    the calling thread.  ``on_event`` of the liveness link runs on the loop's
    thread, so it must hand work off rather than block, and it must not call
    this client (that would wait on the very thread it occupies).
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        token: str | None = None,
        *,
        connect_timeout: float = 5.0,
        retry_deadline: float = 30.0,
        background: BackgroundLoop | None = None,
        say_waiting: bool = True,
    ) -> None:
        self._owns_loop = background is None
        self._background = background or BackgroundLoop("lighthouse-client")
        self._client = AsyncLighthouseClient(
            addresses,
            token,
            connect_timeout=connect_timeout,
            retry_deadline=retry_deadline,
            say_waiting=say_waiting,
        )
        self._link: LivenessLink | None = None
        self._closed = False

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._client.addresses

    def __enter__(self) -> LighthouseClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def join(self, member: Member, timeout: float) -> Quorum:
        return self._run(self._client.join(member, timeout))

    def heartbeat(self, replica_id: str) -> None:
        self._run(self._client.heartbeat(replica_id))

    def kill(self, replica_id: str, reason: str = "") -> bool:
        return self._run(self._client.kill(replica_id, reason))

    def set_settings(
        self, outer_lr: float | None = None, outer_momentum: float | None = None
    ) -> dict[str, float]:
        return self._run(self._client.set_settings(outer_lr, outer_momentum))

    def checkpoint_all(self) -> dict[str, str]:
        return self._run(self._client.checkpoint_all())

    def shutdown(self) -> None:
        self._run(self._client.shutdown())

    def status(self) -> dict[str, Any]:
        return self._run(self._client.status())

    def start_liveness(
        self,
        replica_id: str,
        on_event: Callable[[PushedEvent], None],
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        """Open the liveness link; returns once it is connected."""
        if self._link is not None:
            raise RuntimeError(f"a liveness link for {self._link.replica_id!r} is already running")
        link = self._client.liveness(replica_id, on_event, interval)
        self._run(link.start())
        self._link = link

    def stop_liveness(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._run(link.stop())

    def close(self) -> None:
        """Leave (the liveness link closes), close the session, and end our own loop."""
        if self._closed:
            return
        self._closed = True
        self._link = None
        try:
            self._run(self._client.close())
        finally:
            if self._owns_loop:
                self._background.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: the usual case
            running = None
        if running is self._background.loop:
            coro.close()
            raise RuntimeError("a blocking lighthouse call from its own loop would deadlock")
        return self._background.run(coro)
