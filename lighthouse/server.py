"""The lighthouse daemon: an aiohttp adapter around the pure :class:`QuorumCore`.

The core decides; this module only carries its decisions out.  Every request,
WebSocket frame, closed connection and timer expiry becomes one core call on
the event loop's monotonic clock, and the returned :class:`Update` is acted on
at once: waiting joins are answered, events are pushed to the replicas'
WebSockets, evictions are logged and counted.  Forming a quorum therefore costs
one event-loop turn after the event that completes it; a single timer, re-armed
from each update, covers the deadlines (join and heartbeat timeouts).

Everything an outsider can send is bounded (body size, frame size, number of
waiting joins and sockets) and every failure becomes a 4xx/5xx with a message,
so hostile or broken clients cannot crash, hang or exhaust the daemon.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ftwire import guard, protocol
from ftwire.history import healing
from ftwire.messages import SETTINGS, Member, Quorum
from lighthouse.answer import JoinAnswer, msgpack_response
from lighthouse.lease import Lease
from lighthouse.metrics import LighthouseMetrics
from lighthouse.quorum import Eviction, EvictionCause, QuorumConfig, QuorumCore, Update
from lighthouse.settings import LiveSettings, quorum_step
from lighthouse.timeline import PACE_KEYS, Timeline, member_pace

_log = structlog.get_logger()


# Replica frames are tiny heartbeats; anything near this is an attack or a bug.
WS_MAX_FRAME_BYTES = 64 * 1024
# Events a replica may leave unread before its socket is closed as stuck.
_OUTBOX_FRAMES = 256
# Bounds on how long stop() may take when peers do not cooperate.
_WS_CLOSE_TIMEOUT = 2.0
_SHUTDOWN_TIMEOUT = 5.0
# A WebSocket close reason must fit in one control frame (125 bytes with the code).
_CLOSE_REASON_BYTES = 120
# Groups that left cleanly, shown as finished on /status until they come back.
_FINISHED_KEPT = 256
# How long a group's manager gets to answer a forwarded checkpoint request.
_CHECKPOINT_ASK_S = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """Daemon settings; times are in seconds."""

    min_replicas: int = 1
    join_timeout: float = 60.0
    heartbeat_timeout: float = 5.0
    # Longest the timer sleeps while a deadline is pending or already past.
    quorum_tick: float = 0.1
    token: str | None = None
    max_body_bytes: int = protocol.MAX_MESSAGE_BYTES
    # Open WebSockets plus waiting joins: what bounds the daemon's memory.
    max_connections: int = 4096
    # None: derive from the wall clock so that a restart never reuses an id.
    first_quorum_id: int | None = None
    # A file shared by every lighthouse of one job: only the holder of its
    # lock serves (lighthouse.lease).  None: this lighthouse always serves.
    lease: str | None = None

    def __post_init__(self) -> None:
        self.quorum_config()  # validates the quorum settings
        if not self.quorum_tick > 0:  # also refuses NaN
            raise ValueError(f"quorum_tick must be > 0, got {self.quorum_tick}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.token == "":
            raise ValueError("token must not be empty (use None for no token)")

    def quorum_config(self) -> QuorumConfig:
        return QuorumConfig(self.min_replicas, self.join_timeout, self.heartbeat_timeout)

    def public(self) -> dict[str, Any]:
        """The settings an operator may see: everything but the token itself."""
        shown = asdict(self)
        del shown["token"]
        shown["token_required"] = self.token is not None
        return shown


def wall_clock_epoch() -> int:
    """A quorum-id base above every id an earlier run could have handed out.

    Milliseconds since 1970 shifted left by 20 bits: a run would need a
    million quorums per millisecond of downtime to catch up with its successor.
    """
    return int(time.time() * 1000) << 20


# A refusal with its status, machine-readable code and human message.
_HttpError = guard.Refused


@dataclass(frozen=True)
class _Waiter:
    """A join long-poll: resolved with the quorum's answer, or with the refusal to raise."""

    future: asyncio.Future[JoinAnswer | _HttpError]
    arrived: float

    def settle(self, outcome: JoinAnswer | _HttpError) -> None:
        # A client that hung up cancelled the future (its handler withdraws the join
        # once it runs); whatever is decided in between has nobody left to hear it.
        if not self.future.done():
            self.future.set_result(outcome)


class _Connection:
    """One replica's WebSocket and the events not yet sent on it.

    Events come from synchronous code (the core's updates) and must arrive in
    order, so each socket has one sender task draining a bounded queue; a
    replica that stops reading is disconnected instead of growing the queue.
    """

    def __init__(self, replica_id: str, ws: web.WebSocketResponse) -> None:
        self.replica_id = replica_id
        self.ws = ws
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(_OUTBOX_FRAMES)
        self._sender: asyncio.Task[Any] = asyncio.create_task(self._send_all())
        self._stuck = False

    def push(self, frame: bytes) -> None:
        if self._stuck:
            return
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            _log.warning("websocket stuck, closing", replica=self.replica_id)
            self._stuck = True
            self._sender.cancel()
            self._sender = asyncio.create_task(
                self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many unread events")
            )

    def discard(self) -> None:
        self._sender.cancel()

    async def _send_all(self) -> None:
        while True:
            frame = await self._outbox.get()
            try:
                await self.ws.send_bytes(frame)
            except ConnectionError:
                return  # closing: the receiving side notices and cleans up


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class LighthouseServer:
    """The daemon: start() it, then it answers joins until stop() or /v1/shutdown."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.epoch = (
            self.config.first_quorum_id
            if self.config.first_quorum_id is not None
            else wall_clock_epoch()
        )
        self.core = QuorumCore(self.config.quorum_config(), first_quorum_id=self.epoch)
        self.stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop  # set by start(); every core call runs on it
        self._metrics = LighthouseMetrics(lambda: len(self.core.last_seen()))
        self._waiters: dict[str, _Waiter] = {}
        # The newest socket of each replica (what liveness follows), and all of them.
        self._sockets: dict[str, _Connection] = {}
        self._connections: set[_Connection] = set()
        self._open = 0  # waiting joins + WebSockets, capped at max_connections
        self._formed_unix = 0.0
        # Whether member_lost went out for the quorum formed last (see _evicted).
        self._lost_announced = False
        self._timer: asyncio.TimerHandle | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._url: str | None = None
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self._dashboard = b""
        self._lease = Lease(self.config.lease) if self.config.lease is not None else None
        self._lease_task: asyncio.Task[None] | None = None
        self.settings = LiveSettings()
        self._joining: str | None = None  # the replica whose join the core is handling
        self._timeline = Timeline()
        self._finished: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the lighthouse has not been started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: any free port) and return the URL actually bound."""
        sock = _bind(host, port)  # first: a busy port leaves nothing to clean up
        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[guard.middleware]
        )
        self.serve_on(app)
        # handler_cancellation: a long-poll whose client hung up must withdraw its join.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()
        self._url = _url(sock)
        _log.info("lighthouse started", url=self._url, epoch=self.epoch, **self.config.public())
        if self._lease is not None and not self._take_lease():
            _log.warning(
                "standing by: another lighthouse holds the lease",
                lease=self.config.lease,
                holder=self._lease.holder(),
            )
            self._lease_task = asyncio.create_task(self._wait_for_lease())
        return self._url

    def serve_on(self, app: web.Application) -> None:
        """Answer this lighthouse's endpoints on ``app``, from the running event loop.

        start() calls it for the daemon's own application; lighthouse.rooms
        calls it for each room's sub-application, mounted under a path prefix
        of the same daemon, so that one process serves several quorums.
        """
        self._loop = asyncio.get_running_loop()
        self._fresh_core()
        self._dashboard = (
            importlib.resources.files("lighthouse").joinpath("dashboard.html").read_bytes()
        )
        app.router.add_post("/v1/join", self._join)
        app.router.add_post("/v1/heartbeat", self._heartbeat)
        app.router.add_post("/v1/fence", self._fence)
        app.router.add_get("/v1/ws", self._websocket)
        app.router.add_post("/v1/kill", self._kill)
        app.router.add_post("/v1/shutdown", self._shutdown)
        app.router.add_post("/v1/settings", self._set_settings)
        app.router.add_post("/v1/checkpoint", self._checkpoint_all)
        app.router.add_get("/status", self._status)
        app.router.add_get("/", self._dashboard_page)
        app.router.add_get("/metrics", self._metrics_page)

    def _take_lease(self) -> bool:
        assert self._lease is not None
        if not self._lease.try_acquire(f"{self._url} pid {os.getpid()}"):
            return False
        # Quorums formed before the takeover are another lighthouse's: start
        # this one's ids above anything handed out until now, and give every
        # live replica time to reconnect and tell its step.
        self.epoch = max(self.epoch + 1, wall_clock_epoch())
        self._fresh_core()
        _log.info("lease acquired: serving", lease=self.config.lease, epoch=self.epoch)
        return True

    def _fresh_core(self) -> None:
        """A core that starts now, in this epoch: a job under way gets time to reconnect."""
        self.core = QuorumCore(
            self.config.quorum_config(), first_quorum_id=self.epoch, started=self._loop.time()
        )

    async def _wait_for_lease(self) -> None:
        while not self._stopping and not self._take_lease():
            await asyncio.sleep(self.config.quorum_tick)

    def _refuse_if_standby(self) -> None:
        if self._lease is not None and not self._lease.held:
            raise _HttpError(
                503,
                "standby",
                f"this lighthouse is standing by; the lease {self.config.lease} is held by"
                f" {self._lease.holder() or 'another lighthouse'}",
            )

    def request_stop(self) -> None:
        """Stop in the background (for signal handlers and /v1/shutdown); idempotent."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self.stop())

    async def stop(self) -> None:
        """Answer every waiting join with 503, close every socket, stop listening."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        if self._lease_task is not None:
            self._lease_task.cancel()
        for rid in list(self._waiters):
            self._resolve(rid, _HttpError(503, "shutting_down", "the lighthouse is shutting down"))
        if self._site is not None:
            # Before the sockets close: a replica that reconnects at once must be
            # refused, not accepted by a server that is about to drop its connections.
            await self._site.stop()
        await asyncio.gather(
            *(
                c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"lighthouse shutting down")
                for c in list(self._connections)
            ),
            return_exceptions=True,
        )
        if self._runner is not None:
            await self._runner.cleanup()
        if self._lease is not None:
            self._lease.release()
        _log.info("lighthouse stopped", url=self._url)
        self.stopped.set()

    async def wait_stopped(self) -> None:
        await self.stopped.wait()

    # -- driving the core --------------------------------------------------------

    def _drive(self, event: Callable[[float], Update]) -> Update:
        """Feed one event to the core and carry out what it decided."""
        before = self.core.previous
        update = event(self._loop.time())
        for eviction in update.evicted:
            self._evicted(eviction, before)
        if update.formed is not None:
            self._release(update.formed, update.reason)
        if update.discarded is not None:
            discard = update.discarded
            self._metrics.discarded.inc(discard.last_step - discard.first_step + 1)
            _log.warning("history abandoned", detail=discard.describe())
            self._timeline.add(
                "discarded", discard.describe(), replica_ids=list(discard.replica_ids)
            )
        self._schedule(update)
        return update

    def _evicted(self, eviction: Eviction, quorum: Quorum | None) -> None:
        """Count and log it, answer its waiting join, warn the quorum it was in."""
        rid, cause = eviction.replica_id, eviction.cause.value
        self._metrics.evictions.labels(cause).inc()
        _log.info("replica evicted", replica=rid, cause=cause, in_quorum=eviction.in_quorum)
        if eviction.cause is EvictionCause.LEFT:
            self._finished[rid] = time.time()
            while len(self._finished) > _FINISHED_KEPT:
                del self._finished[next(iter(self._finished))]
            self._timeline.add("left", f"{rid} left (closed cleanly)", replica_id=rid)
        else:
            self._timeline.add("eviction", f"{rid} evicted: {cause}", replica_id=rid, cause=cause)
        replaced = eviction.cause is EvictionCause.RESTARTED and rid == self._joining
        if rid in self._waiters and not replaced:
            # Its join no longer counts; without an answer it would wait out its
            # timeout while the others form quorums without it.
            message = f"replica {rid} was evicted while waiting ({cause}); join again"
            self._resolve(rid, _HttpError(503, "evicted", message, replica=rid))
        if eviction.in_quorum and quorum is not None and not self._lost_announced:
            # The first loss breaks the quorum for all of its members; telling
            # them of every later loss would only cost O(members) pushes each
            # (1000 x 1000 when a whole job goes at once).  Non-members do not care.
            self._lost_announced = True
            lost = protocol.encode_member_lost(rid, cause, quorum.quorum_id)
            for member in quorum.replica_ids:
                conn = self._sockets.get(member)
                if conn is not None:
                    conn.push(lost)

    def _release(self, quorum: Quorum, reason: str) -> None:
        """Hand the quorum to every member's waiting join, encoded once for all of them.

        Only the join carries it: every member of a quorum is a joiner waiting
        for this answer, so a copy pushed on its WebSocket as well would only
        double what the lighthouse writes (1000 x 180 kB per round at 1000
        replicas).
        """
        self._formed_unix = time.time() - (self._loop.time() - quorum.created)
        self._lost_announced = False
        try:
            step = quorum_step(quorum)
            changes = self.settings.for_quorum(step)
            encoded = protocol.encode_quorum(quorum, self._formed_unix, changes)
            answer = JoinAnswer.of(
                protocol.pack({"quorum": encoded, "lease": self._lease is not None})
            )
        except Exception as e:
            # Joins are checked so that this cannot happen; if it ever does,
            # every member still gets an answer now instead of a timeout.
            _log.error("quorum cannot be encoded", quorum_id=quorum.quorum_id, error=repr(e))
            for rid in quorum.replica_ids:
                if rid in self._waiters:
                    message = f"quorum {quorum.quorum_id} could not be encoded: {e!r}"
                    self._resolve(rid, _HttpError(500, "internal", message, replica=rid))
            return
        last_arrival = float("-inf")
        for rid in quorum.replica_ids:
            waiter = self._waiters.pop(rid, None)
            if waiter is not None:
                waiter.settle(answer)
                last_arrival = max(last_arrival, waiter.arrived)
        if last_arrival > float("-inf"):
            self._metrics.latency.observe(self._loop.time() - last_arrival)
        self._metrics.quorums.inc()
        self._metrics.quorum_size.set(len(quorum.replica_ids))
        self._timeline.quorum(quorum, step, self._formed_unix)
        _log.info(
            "quorum formed",
            quorum_id=quorum.quorum_id,
            members=list(quorum.replica_ids),
            reason=reason,
        )

    def _schedule(self, update: Update) -> None:
        """Keep one timer armed for the core's next deadline, at most quorum_tick away.

        A deadline that is already due asks for an immediate tick (members
        left out of the quorum just formed may form the next one at once).  If
        nothing was formed, though, acting now cannot help -- an earlier core
        reports a passed join timeout that way -- so the timer re-checks one
        tick later instead of spinning.
        """
        if update.deadline is None or self._stopping:
            return
        now = self._loop.time()
        when = min(update.deadline, now + self.config.quorum_tick)
        if when <= now and update.formed is None:
            when = now + self.config.quorum_tick
        if self._timer is not None:
            if self._timer.when() <= when:
                return  # an earlier tick re-evaluates and re-arms anyway
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._drive(self.core.tick)

    def _resolve(self, rid: str, outcome: _HttpError) -> None:
        self._waiters.pop(rid).settle(outcome)

    # -- request plumbing ----------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        guard.authorize(request, self.config.token)

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise _HttpError(503, "shutting_down", "the lighthouse is shutting down")

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold one of the max_connections places for a long-lived request."""
        limit = self.config.max_connections
        if self._open >= limit:
            raise _HttpError(
                503,
                "overloaded",
                f"{self._open} waiting joins and WebSockets, the limit is {limit}",
            )
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1

    async def _read_body(self, request: web.Request) -> bytes:
        return await guard.read_body(request, self.config.max_body_bytes)

    # -- replica endpoints -----------------------------------------------------------

    async def _join(self, request: web.Request) -> web.Response:
        arrived = self._loop.time()
        self._metrics.joins.inc()
        try:
            self._authorize(request)
            self._refuse_if_standby()
            with self._slot():
                join = protocol.decode_join(await self._read_body(request))
                outcome = await self._wait_for_quorum(join.member, join.timeout, arrived)
        except protocol.ProtocolError:
            self._metrics.joins_refused.labels("bad_request").inc()
            raise
        except _HttpError as e:
            outcome = e
        if isinstance(outcome, _HttpError):
            if outcome.code == "timeout":
                self._metrics.joins_timed_out.inc()
            else:
                self._metrics.joins_refused.labels(outcome.code).inc()
            raise outcome
        return outcome.response(request)

    async def _wait_for_quorum(
        self, member: Member, timeout: float, arrived: float
    ) -> JoinAnswer | _HttpError:
        """Register the join, then wait for a quorum; always ends with an outcome."""
        # Checked here, with no await before registering, so stop() cannot miss it.
        self._refuse_if_stopping()
        rid = member.replica_id
        self._refuse_if_stale(rid, member.incarnation)
        self._finished.pop(rid, None)
        if rid in self._waiters:
            self._resolve(
                rid,
                _HttpError(
                    409, "superseded", f"a newer join from {rid} replaced this one", replica=rid
                ),
            )
        future: asyncio.Future[JoinAnswer | _HttpError] = self._loop.create_future()
        waiter = self._waiters[rid] = _Waiter(future, arrived)
        # A join from a new incarnation evicts the old one (RESTARTED) in this
        # very call: that eviction must not answer this join's own waiter.
        self._joining = rid
        try:
            self._drive(lambda now: self.core.join(member, now))
        finally:
            self._joining = None
        # The future itself is awaited, with a plain timer for the timeout: a
        # release wakes each of up to thousands of handlers in one loop step,
        # where asyncio.wait would add a waiter future and callbacks per join.
        timer = self._loop.call_later(timeout, self._time_out, waiter, rid, timeout)
        try:
            return await future
        finally:
            timer.cancel()
            if future.cancelled() and self._waiters.get(rid) is waiter:  # the client hung up
                del self._waiters[rid]
                self._drive(lambda now: self.core.withdraw(rid, now))

    def _time_out(self, waiter: _Waiter, rid: str, timeout: float) -> None:
        """The join's own timeout: answer 504 and withdraw it, unless it was answered."""
        if self._waiters.get(rid) is waiter:
            message = f"no quorum within {timeout:g}s: {self.core.reason}"
            self._resolve(rid, _HttpError(504, "timeout", message, replica=rid))
            self._drive(lambda now: self.core.withdraw(rid, now))

    def _refuse_if_stale(self, rid: str, incarnation: str) -> None:
        if self.core.is_stale(rid, incarnation):
            raise _HttpError(
                409,
                "stale_incarnation",
                f"replica {rid} has restarted since incarnation {incarnation} started;"
                " this process is a leftover and may not take part",
                replica=rid,
            )

    def _beat(self, rid: str, liveness: protocol.Liveness) -> None:
        self._finished.pop(rid, None)
        self._drive(
            lambda now: self.core.heartbeat(
                rid, now, incarnation=liveness.incarnation, committed=liveness.committed
            )
        )

    async def _heartbeat(self, request: web.Request) -> web.Response:
        self._authorize(request)
        self._refuse_if_standby()
        rid, liveness = protocol.decode_heartbeat(await self._read_body(request))
        self._refuse_if_stale(rid, liveness.incarnation)
        self._beat(rid, liveness)
        return msgpack_response(protocol.pack({"ok": True}))

    async def _fence(self, request: web.Request) -> web.Response:
        """``POST /v1/fence``: may this replica commit its quorum's step? (Always 200.)"""
        self._authorize(request)
        self._refuse_if_standby()
        rid, quorum_id, step = protocol.decode_fence(await self._read_body(request))
        fence = self.core.fence(rid, quorum_id, step, self._loop.time())
        self._metrics.fences.labels("true" if fence.commit else "false").inc()
        if not fence.commit:
            _log.warning("commit refused", replica=rid, quorum_id=quorum_id, reason=fence.reason)
            self._timeline.add(
                "rollback", f"{rid} may not commit: {fence.reason}", replica_id=rid, step=step
            )
        # A fence may have expired silent replicas: keep the timer right.
        self._drive(self.core.tick)
        return msgpack_response(protocol.encode_fence_answer(fence))

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._authorize(request)
        self._refuse_if_stopping()
        self._refuse_if_standby()
        if "replica_id" not in request.query:
            raise _HttpError(400, "bad_request", "missing query parameter 'replica_id'")
        rid = protocol.replica_id({"replica_id": request.query["replica_id"]})
        first = protocol.decode_liveness({"incarnation": request.query.get("incarnation", "")})
        self._refuse_if_stale(rid, first.incarnation)
        with self._slot():
            ws = web.WebSocketResponse(
                max_msg_size=WS_MAX_FRAME_BYTES,
                # Pings only free the sockets of vanished hosts (the core already
                # evicted them), so they get twice the grace of app heartbeats.
                heartbeat=2 * self.config.heartbeat_timeout,
                timeout=_WS_CLOSE_TIMEOUT,
                compress=False,
            )
            await ws.prepare(request)
            if self._stopping:  # stop() began during the upgrade and did not see this one
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"lighthouse shutting down")
                return ws
            conn = _Connection(rid, ws)
            self._connections.add(conn)
            self._sockets[rid] = conn
            try:
                self._beat(rid, first)
                await self._receive(conn, request.remote)
            finally:
                self._disconnected(conn)
        return ws

    async def _receive(self, conn: _Connection, peer: str | None) -> None:
        """Every well-formed frame is a heartbeat; a malformed one ends the connection."""
        rid, ws = conn.replica_id, conn.ws
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                return  # aiohttp has already closed it (e.g. 1009 for an oversized frame)
            try:
                if msg.type is not WSMsgType.BINARY:
                    raise protocol.ProtocolError("frames must be binary msgpack")
                liveness = protocol.decode_liveness(protocol.unpack(msg.data))
                if self.core.is_stale(rid, liveness.incarnation):
                    raise protocol.ProtocolError(f"replica {rid} has restarted; stale incarnation")
            except protocol.ProtocolError as e:
                _log.warning("websocket frame refused", replica=rid, error=str(e), peer=peer)
                reason = str(e).encode()[:_CLOSE_REASON_BYTES].decode(errors="ignore").encode()
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason)
                return
            self._beat(rid, liveness)

    def _disconnected(self, conn: _Connection) -> None:
        """A closed socket kills its replica at once, unless a newer one took over."""
        conn.discard()
        self._connections.discard(conn)
        rid = conn.replica_id
        if self._sockets.get(rid) is not conn:
            return
        del self._sockets[rid]
        if not self._stopping:
            # A close frame with 1000 is a Manager closing; a reset or a missing
            # frame is a process that died.
            left = conn.ws.close_code == WSCloseCode.OK
            cause = EvictionCause.LEFT if left else EvictionCause.CONNECTION_CLOSED
            self._drive(lambda now: self.core.lost(rid, now, cause))

    # -- control endpoints -------------------------------------------------------------

    async def _kill(self, request: web.Request) -> web.Response:
        self._authorize(request)
        self._refuse_if_standby()
        message = await guard.read_message(request, self.config.max_body_bytes)
        rid, reason = protocol.kill_fields(message)
        conn = self._sockets.get(rid)
        if conn is not None:
            conn.push(protocol.pack({"type": "kill", "reason": reason}))
        update = self._drive(lambda now: self.core.lost(rid, now, EvictionCause.KILLED))
        _log.warning("replica killed by operator", replica=rid, reason=reason, peer=request.remote)
        self._timeline.add(
            "kill", f"{rid} killed by operator: {reason or 'no reason given'}", replica_id=rid
        )
        known = bool(update.evicted) or conn is not None
        return guard.reply(request, {"ok": True, "known": known})

    async def _shutdown(self, request: web.Request) -> web.Response:
        self._authorize(request)
        await guard.read_message(request, self.config.max_body_bytes)
        _log.warning("shutdown requested", peer=request.remote)
        self._timeline.add("shutdown", "shutdown requested by operator")
        self.request_stop()
        return guard.reply(request, {"ok": True})

    async def _checkpoint_all(self, request: web.Request) -> web.Response:
        """``POST /v1/checkpoint``: ask every connected group's manager to save a checkpoint.

        Each group saves at its next outer step boundary; the answer says, per
        group, what its manager replied.  The managers share the job's token,
        so the lighthouse forwards its own.
        """
        self._authorize(request)
        self._refuse_if_standby()
        await guard.read_message(request, self.config.max_body_bytes)
        prev = self.core.previous
        members = {m.replica_id: m for m in prev.members} if prev is not None else {}
        members.update({rid: m for rid, (m, _) in self.core.joiners().items()})
        groups = {
            rid: members[rid].address if rid in members else None for rid in sorted(self._sockets)
        }
        answers = await asyncio.gather(
            *(self._ask_checkpoint(address) for address in groups.values())
        )
        self._timeline.add("checkpoint", f"checkpoint asked of {len(groups)} groups")
        return guard.reply(request, {"groups": dict(zip(groups, answers, strict=True))})

    async def _ask_checkpoint(self, address: str | None) -> str:
        if not address:
            return "no manager address known"
        headers = {"Content-Type": protocol.CONTENT_TYPE}
        if self.config.token is not None:
            headers.update(guard.authorization(self.config.token))
        timeout = aiohttp.ClientTimeout(total=_CHECKPOINT_ASK_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    f"{address.rstrip('/')}/v1/checkpoint", data=protocol.pack({}), headers=headers
                ) as response,
            ):
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"cannot reach {address}: {e or type(e).__name__}"
        if response.status == 202:
            try:
                step = protocol.unpack(body).get("step")
            except protocol.ProtocolError:
                step = None
            return f"checkpoint requested (at step {step})"
        code, message = protocol.decode_error(body)
        return f"refused ({response.status} {code}): {message}"

    async def _set_settings(self, request: web.Request) -> web.Response:
        """``POST /v1/settings`` {"outer_lr": x, "outer_momentum": y}: a live change.

        It applies from the step after the next quorum's, on every group at once.
        """
        self._authorize(request)
        self._refuse_if_standby()
        message = await guard.read_message(request, self.config.max_body_bytes)
        values = protocol.settings_values(message)
        if not values:
            raise _HttpError(400, "bad_request", f"give at least one of {', '.join(SETTINGS)}")
        pending = self.settings.request(values)
        _log.warning("settings changed by operator", peer=request.remote, **pending)
        shown = ", ".join(f"{k} {v:g}" for k, v in sorted(pending.items()))
        self._timeline.add(
            "settings", f"settings changed: {shown} (from the step after the next quorum's)"
        )
        return guard.reply(
            request,
            {
                "ok": True,
                "pending": pending,
                "applies": "from the step after the next quorum's, on every group",
            },
        )

    # -- read-only pages ----------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """The /status document: what the quorum is, who is waiting and why."""
        now = self._loop.time()
        prev = self.core.previous
        in_quorum = {m.replica_id: m for m in prev.members} if prev is not None else {}
        # The groups' own rule (with their default init_sync), so the page shows what they do.
        heals = healing(in_quorum.values()) if in_quorum else None
        recovering = set(heals.recovering) if heals is not None else set(in_quorum)
        joiners = self.core.joiners()
        seen = self.core.last_seen()
        committed = self.core.committed()
        replicas = []
        for rid in sorted(
            seen.keys() | in_quorum.keys() | self._sockets.keys() | self._finished.keys()
        ):
            latest = joiners[rid][0] if rid in joiners else in_quorum.get(rid)
            pace = member_pace(latest) if latest is not None else {}
            replicas.append(
                {
                    "replica_id": rid,
                    "heartbeat_age_s": now - seen[rid] if rid in seen else None,
                    "connected": rid in self._sockets,
                    "in_quorum": rid in in_quorum,
                    "step": latest.step if latest is not None else None,
                    "address": latest.address if latest is not None else None,
                    "recovering": rid in recovering,
                    "committed_step": committed[rid][0] if rid in committed else None,
                    "history": committed[rid][1] if rid in committed else None,
                    "incarnation": latest.incarnation if latest is not None else None,
                    "finished": rid in self._finished and rid not in seen,
                    # Groups of unequal speed (None: the group does not say).
                    **{name: pace.get(name) for name in PACE_KEYS.values()},
                }
            )
        return {
            "quorum_id": self.core.quorum_id,
            "epoch": self.epoch,
            "role": "single"
            if self._lease is None
            else ("serving" if self._lease.held else "standby"),
            "reason": self.core.reason,
            "previous_quorum": None
            if prev is None
            else {
                "quorum_id": prev.quorum_id,
                "created": self._formed_unix,
                "members": [_member_summary(m) for m in prev.members],
            },
            "joiners": [
                {
                    "replica_id": rid,
                    "step": m.step,
                    "address": m.address,
                    "joined_ago_s": now - joined,
                }
                for rid, (m, joined) in joiners.items()
            ],
            "replicas": replicas,
            "discarded_steps": self.core.discarded_steps,
            "discarded": [
                {
                    "replica_ids": list(d.replica_ids),
                    "first_step": d.first_step,
                    "last_step": d.last_step,
                    "continued_from_step": d.continued_from_step,
                    "quorum_id": d.quorum_id,
                    "text": d.describe(),
                }
                for d in self.core.discards()
            ],
            "connections": {"open": self._open, "limit": self.config.max_connections},
            "settings": self.settings.status(),
            "events": list(self._timeline.events),
            "step_history": list(self._timeline.step_history),
            "config": self.config.public(),
        }

    async def _dashboard_page(self, request: web.Request) -> web.Response:
        return guard.page(self._dashboard)

    @property
    def registry(self) -> CollectorRegistry:
        """This lighthouse's Prometheus metrics (lighthouse.rooms labels each room's)."""
        return self._metrics.registry

    def metrics_text(self) -> bytes:
        """The ``/metrics`` page: the Prometheus text of :attr:`registry`."""
        return generate_latest(self._metrics.registry)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics_text(),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


def _member_summary(member: Member) -> dict[str, Any]:
    """A member for JSON: its free-form ``data`` may hold bytes, so it is left out."""
    summary = protocol.encode_member(member)
    del summary["data"]
    return summary
