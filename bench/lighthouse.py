"""Lighthouse benchmark: quorum latency, death detection and capacity of the real daemon.

    python bench/lighthouse.py [--quick] [--json PATH] [--only SCENARIO] [--no-pin]

The daemon runs as its own process (``python -m lighthouse.cli``) on a free
loopback port; simulated replicas talk to it over loopback.  Three scenarios:

1. quorum latency -- N replicas (2, 16, 256; the full run adds 1000) join
   round after round (the fast path after the first round).  Per round, N-1
   joins are sent and allowed to register (polled on /status), then the last
   one is sent: the latency is from just before that last join is written to
   when every member holds its whole answer.  A "burst" variant sends all N at
   once, so it also counts the daemon ingesting them.  The full run repeats
   this against torchft's lighthouse when a separate venv has torchft
   (``python3 -m venv /tmp/torchft-venv``, then ``pip install torch==2.13.0``
   and ``pip install torchft==0.2.0`` there; see --torchft-python).
2. death detection -- three replica processes keep a liveness WebSocket open
   through the project's client and join rounds (min_replicas 2).  While the
   two survivors wait in a join, the third is SIGKILLed; the time is from just
   before ``os.kill`` to when both survivors' joins have returned a quorum
   without it.  Timeouts are long (heartbeat 5 s, join 30 s), so only the
   closed connection can explain a fast answer; the full run also SIGSTOPs one
   (a frozen host whose socket stays open) to show the heartbeat-timeout path.
3. capacity -- 1000 replicas in 4 client processes keep WebSocket heartbeats
   at 10 Hz while a round of all 1000 runs every second (999 joins spread
   over 300 ms, the last one at 500 ms), the daemon pinned to the first CPU
   and the clients to the others.  Reported: p99 quorum latency, the daemon's
   CPU use, and what broke if it could not keep up (evictions by cause,
   refused joins, rounds left out); a time budget bounds an overloaded run.

Why the replicas use a lean hand-written HTTP/WebSocket client: this box has
two cores.  aiohttp's client spends ~0.15 ms of CPU per join at N=256 (0.3 ms
at 1000) and the project's client another 0.8 ms (4 ms) decoding each answer,
so one process simulating 256 replicas would measure itself.  The lean client
writes pre-encoded requests and parses only status, headers and frame
lengths; its CPU per round is printed next to the latencies.  The daemon
still sees ordinary HTTP/1.1 and RFC 6455 traffic.

On a shared machine the latencies include time the daemon spent waiting for a
CPU that other processes held; /proc/PID/schedstat gives both its time on a
CPU and that wait, and both are printed, so a slow daemon and a busy machine
can be told apart.  Times are ``time.monotonic`` (CLOCK_MONOTONIC), the same
clock in every process, so replica processes can report when answers arrived.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

PIPE = asyncio.subprocess.PIPE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, percentile, print_table, write_json  # noqa: E402
from ftwire import protocol  # noqa: E402
from ftwire.messages import Member  # noqa: E402
from lighthouse.cli import listening_url  # noqa: E402

GOAL_P50_2_MS = 1.0
GOAL_P99_256_MS = 10.0
GOAL_DEATH_MS = 100.0
GOAL_CAPACITY_P99_MS = 50.0

# Long enough that no quorum in scenarios 1 and 3 ever forms by a timeout.
LONG_TIMEOUT_MS = 120_000
CAPACITY_REPLICAS = 1000
CAPACITY_WORKERS = 4
CAPACITY_HEARTBEAT_S = 0.1
# Within a round: 999 joins spread over the first 300 ms, the last member's at 500 ms,
# so that (as in scenario 1) the latency is that of the join completing the quorum
# rather than of a backlog of joins sent in the same instant.
CAPACITY_JOIN_TIMES = {"spread": 0.3, "last_at": 0.5}
# After the time budget for starting rounds, how long answers are still awaited.
CAPACITY_GRACE_S = 5.0


# -- processes ---------------------------------------------------------------------------


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """(daemon CPUs, client CPUs): the first CPU for the daemon, the rest for the clients.

    On one CPU nothing is pinned (there is nothing to separate).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def _pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)


class Share(NamedTuple):
    """A process's use of one CPU over a window: running, and ready but not running."""

    running: float
    waiting: float


def _shares(before: tuple[float, float], after: tuple[float, float], wall: float) -> Share:
    return Share((after[0] - before[0]) / wall, (after[1] - before[1]) / wall)


def _schedstat(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/schedstat") as f:
        on_cpu, waiting, _ = f.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass(frozen=True)
class Daemon:
    pid: int
    url: str

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://").rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def authority(self) -> str:
        return self.url.removeprefix("http://")


@contextlib.contextmanager
def daemon(
    *, min_replicas: int, join_timeout_ms: int, heartbeat_timeout_ms: int, cpus: set[int] | None
) -> Iterator[Daemon]:
    """The real ``lighthouse`` command on a free loopback port; ended by pid on the way out.

    Its logs (one JSON line per quorum, with every member's id) go to a
    temporary file: rendering them is part of the daemon's real cost, and a
    pipe nobody reads would eventually block it.
    """
    command = [
        sys.executable, "-m", "lighthouse.cli", "--bind", "127.0.0.1:0",
        "--min-replicas", str(min_replicas),
        "--join-timeout-ms", str(join_timeout_ms),
        "--heartbeat-timeout-ms", str(heartbeat_timeout_ms),
        "--log-format", "json",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log)
        try:
            _pin(proc.pid, cpus)
            assert proc.stdout is not None
            line = _read_line(proc.stdout, 30.0)
            url = listening_url(line)
            if url is None:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"lighthouse did not start: {line!r}\n{tail}")
            yield Daemon(proc.pid, url)
        finally:
            _end(proc)


def _read_line(stream: IO[bytes], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().decode() if ready else ""


# -- a lean HTTP/1.1 client ---------------------------------------------------------------


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


def _check_round(replies: Sequence[Reply], n: int) -> int:
    """Every join answered 200 with the same quorum of n members; returns the quorum id.

    The daemon encodes a quorum once for all its members, so comparing the bytes
    as sent and decoding one answer checks them all, at a cost that does not
    make the bench's many replicas per process the bottleneck.
    """
    if not replies:
        raise RuntimeError("no member was answered")
    for reply in replies:
        if reply.status != 200:
            code, message = protocol.decode_error(reply.decoded())
            raise RuntimeError(f"join answered {reply.status} {code}: {message}")
    first = replies[0]
    if any(r.body != first.body or r.encoding != first.encoding for r in replies):
        raise RuntimeError("members of one round received different quorums")
    quorum = protocol.decode_quorum(protocol.unpack(first.decoded())["quorum"])
    if len(quorum.members) != n:
        raise RuntimeError(f"quorum has {len(quorum.members)} members, expected {n}")
    return quorum.quorum_id


def _member(index: int) -> Member:
    """A replica group as a real one would describe itself (the addresses size the answer)."""
    host = f"10.{index // 250 % 250}.{index % 250}.1"
    return Member(
        replica_id=f"replica-{index:04d}",
        address=f"http://{host}:29512",
        store_address=f"{host}:29500",
        step=100,
        world_size=8,
    )


async def _get_json(conn: HttpConnection, authority: str, path: str) -> Any:
    reply = await conn.request(http_request("GET", authority, path))
    return json.loads(reply.decoded())


# -- scenario 1: quorum latency --------------------------------------------------------------


@dataclass
class LatencyResult:
    n: int
    settled_ms: list[float] = field(default_factory=list)
    burst_ms: list[float] = field(default_factory=list)
    # Per settled round, between the last join and the release: the daemon's time
    # on a CPU, its time waiting for one (other processes had it), and ours.
    daemon_cpu_ms: float = 0.0
    daemon_wait_ms: float = 0.0
    client_cpu_ms: float = 0.0  # the same window, in this process
    answer_bytes: int = 0


async def _latency_rounds(d: Daemon, n: int, rounds: int) -> LatencyResult:
    conns = [await HttpConnection.open(d.host, d.port) for _ in range(n)]
    status_conn = await HttpConnection.open(d.host, d.port)
    try:
        members = [_member(i) for i in range(n)]
        joins = [
            http_request(
                "POST", d.authority, "/v1/join", protocol.encode_join(m, LONG_TIMEOUT_MS / 1000)
            )
            for m in members
        ]
        # Everyone alive before the first join, or the first join alone is a quorum.
        beats = [
            conn.request(
                http_request(
                    "POST", d.authority, "/v1/heartbeat", protocol.encode_heartbeat(m.replica_id)
                )
            )
            for conn, m in zip(conns, members, strict=True)
        ]
        await asyncio.gather(*beats)
        # The first round forms by the ordinary rules; every later one by the fast path.
        _check_round(
            await asyncio.gather(*(c.request(j) for c, j in zip(conns, joins, strict=True))), n
        )

        result = LatencyResult(n)
        daemon_cpu = daemon_wait = client_cpu = 0.0
        for _ in range(rounds):
            waiting = [c.request(j) for c, j in zip(conns[:-1], joins[:-1], strict=True)]
            while len((await _get_json(status_conn, d.authority, "/status"))["joiners"]) < n - 1:
                await asyncio.sleep(0.001)
            sched_before, own_before = _schedstat(d.pid), time.process_time()
            sent = time.monotonic()
            waiting.append(conns[-1].request(joins[-1]))
            replies = await asyncio.gather(*waiting)
            own_after, sched_after = time.process_time(), _schedstat(d.pid)
            result.settled_ms.append((max(r.received for r in replies) - sent) * 1000)
            daemon_cpu += sched_after[0] - sched_before[0]
            daemon_wait += sched_after[1] - sched_before[1]
            client_cpu += own_after - own_before
            _check_round(replies, n)
            result.answer_bytes = len(replies[0].body)

            waiting = [c.request(j) for c, j in zip(conns, joins, strict=True)]
            sent = time.monotonic()
            replies = await asyncio.gather(*waiting)
            result.burst_ms.append((max(r.received for r in replies) - sent) * 1000)
            _check_round(replies, n)
        result.daemon_cpu_ms = daemon_cpu / rounds * 1000
        result.daemon_wait_ms = daemon_wait / rounds * 1000
        result.client_cpu_ms = client_cpu / rounds * 1000
        return result
    finally:
        for conn in [*conns, status_conn]:
            conn.close()


def scenario_latency(sizes: Sequence[tuple[int, int]]) -> list[LatencyResult]:
    """Unpinned: on a shared box a pinned daemon waits for its one CPU while the other is idle."""
    results = []
    for n, rounds in sizes:
        with daemon(
            min_replicas=1,
            join_timeout_ms=LONG_TIMEOUT_MS,
            heartbeat_timeout_ms=LONG_TIMEOUT_MS,
            cpus=None,
        ) as d:
            results.append(asyncio.run(_latency_rounds(d, n, rounds)))
    return results


# -- scenario 2: death detection -------------------------------------------------------------


async def _replica_main(url: str, replica_id: str) -> None:
    """A replica process: liveness through the real client, joins on command.

    stdin: ``connect`` (open the liveness link), ``join``.
    stdout: ``ready``, ``quorum <monotonic> <id> <members>``, ``lost <monotonic> <rid>``,
    ``error <message>``.  The client's logs go to stderr.
    """
    import structlog

    from lighthouse.client import AsyncLighthouseClient

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == protocol.EVENT_MEMBER_LOST:
            say(f"lost {time.monotonic():.6f} {event.get('replica_id')}")

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    say("started")
    async with AsyncLighthouseClient(url) as client:
        while command := (await stdin.readline()).decode().strip():
            try:
                if command == "connect":
                    await client.liveness(replica_id, on_event, interval=0.1).start()
                    say("ready")
                elif command == "join":
                    quorum = await client.join(Member(replica_id), timeout=30.0)
                    received = time.monotonic()
                    say(f"quorum {received:.6f} {quorum.quorum_id} {','.join(quorum.replica_ids)}")
            except Exception as e:
                say(f"error {type(e).__name__}: {e}")


class ReplicaProcess:
    """The bench's handle on one replica process and the lines it reports."""

    def __init__(self, replica_id: str, proc: asyncio.subprocess.Process) -> None:
        self.replica_id = replica_id
        self.proc = proc
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.lost: list[tuple[float, str]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, url: str, replica_id: str) -> ReplicaProcess:
        command = [sys.executable, __file__, "--_replica", url, replica_id]
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=PIPE, stdout=PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT
        )
        return cls(replica_id, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            if line.startswith("lost "):
                _, when, rid = line.split()
                self.lost.append((float(when), rid))
            else:
                await self.lines.put(line.strip())
        await self.lines.put("exited")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    async def expect(self, word: str, timeout: float = 60.0) -> list[str]:
        line = await asyncio.wait_for(self.lines.get(), timeout)
        parts = line.split(" ")
        if parts[0] != word:
            raise RuntimeError(f"{self.replica_id}: expected {word!r}, got {line!r}")
        return parts

    async def quorum(self, timeout: float = 60.0) -> tuple[float, list[str]]:
        """(receive time, member ids) of the next quorum this replica reports."""
        _, when, _, members = await self.expect("quorum", timeout)
        return float(when), members.split(",")

    async def end(self) -> None:
        """Ends the process by its pid (it may already be dead) and waits for it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        self._reader.cancel()


@dataclass
class DeathResult:
    detect_ms: list[float] = field(default_factory=list)
    lost_event_ms: list[float] = field(default_factory=list)
    frozen_ms: float | None = None  # a SIGSTOPped replica: only the heartbeat timeout finds it


async def _until_joined(conn: HttpConnection, d: Daemon, replica_ids: Sequence[str]) -> None:
    """Poll /status until every one of replica_ids is waiting in a join."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = await _get_json(conn, d.authority, "/status")
        if set(replica_ids) <= {j["replica_id"] for j in status["joiners"]}:
            return
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{replica_ids} did not join within 30 s")


async def _death_trials(d: Daemon, trials: int, frozen: bool) -> DeathResult:
    status = await HttpConnection.open(d.host, d.port)
    started: list[ReplicaProcess] = []  # every process, to end them all whatever happens

    async def spawn(replica_id: str) -> ReplicaProcess:
        started.append(await ReplicaProcess.spawn(d.url, replica_id))
        return started[-1]

    result = DeathResult()
    try:
        survivors = [await spawn("alive-a"), await spawn("alive-b")]
        # Spawned one trial ahead: a Python start takes ~1 s, which is not what is measured.
        upcoming = await spawn("victim-0")
        for replica in survivors:
            await replica.expect("started")
            replica.send("connect")
            await replica.expect("ready")
        for trial in range(trials + int(frozen)):
            victim = upcoming
            if trial + 1 < trials + int(frozen):
                upcoming = await spawn(f"victim-{trial + 1}")
            await victim.expect("started")
            victim.send("connect")
            await victim.expect("ready")
            # The victim joins first: with the survivors alone the fast path would form
            # a quorum over the previous members without it.
            victim.send("join")
            await _until_joined(status, d, [victim.replica_id])
            for replica in survivors:
                replica.send("join")
            everyone = {victim.replica_id, *(r.replica_id for r in survivors)}
            for replica in [victim, *survivors]:
                _, members = await replica.quorum()
                if set(members) != everyone:
                    raise RuntimeError(f"expected a quorum of {everyone}, got {members}")

            for replica in survivors:
                replica.send("join")
            await _until_joined(status, d, [r.replica_id for r in survivors])
            await asyncio.sleep(0.05)  # they are waiting for the victim, not about to be answered
            is_frozen = frozen and trial == trials
            killed = time.monotonic()
            os.kill(victim.proc.pid, signal.SIGSTOP if is_frozen else signal.SIGKILL)
            received = []
            for replica in survivors:
                when, members = await replica.quorum(timeout=60.0)
                if victim.replica_id in members:
                    raise RuntimeError(f"quorum after the kill still has {victim.replica_id}")
                received.append(when)
            took_ms = (max(received) - killed) * 1000
            if is_frozen:
                result.frozen_ms = took_ms
            else:
                result.detect_ms.append(took_ms)
                # The event travels on the WebSocket, independently of the join's answer.
                lost: list[float] = []
                for _ in range(200):
                    lost = [t for r in survivors for t, rid in r.lost if rid == victim.replica_id]
                    if len(lost) == len(survivors):
                        result.lost_event_ms.append((max(lost) - killed) * 1000)
                        break
                    await asyncio.sleep(0.01)
            await victim.end()
        return result
    finally:
        for replica in started:
            await replica.end()
        status.close()


def scenario_death(trials: int, frozen: bool) -> DeathResult:
    with daemon(min_replicas=2, join_timeout_ms=30_000, heartbeat_timeout_ms=5_000, cpus=None) as d:
        return asyncio.run(_death_trials(d, trials, frozen))


# -- a lean WebSocket client (scenario 3) ------------------------------------------------------

_WS_BINARY, _WS_CLOSE, _WS_PING, _WS_PONG = 0x2, 0x8, 0x9, 0xA


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (RFC 6455 5.2); payloads here are under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


class WsConnection(asyncio.Protocol):
    """A replica's liveness socket: sends heartbeat frames, answers pings, skips events.

    The same masked heartbeat frame is written every time (a fixed mask is
    enough for a benchmark on loopback).  Pushed events -- the quorum, each
    as large as a join answer -- are counted and skipped without being copied.
    """

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.heartbeat = _masked_frame(_WS_BINARY, protocol.pack({"type": "heartbeat"}))
        self.events = 0
        self.received_bytes = 0
        self.closed = False
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of a data frame still to be discarded

    @classmethod
    async def open(cls, host: str, port: int, replica_id: str) -> WsConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(replica_id), host, port)
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


# -- scenario 3: capacity ------------------------------------------------------------------------


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _capacity_worker_main(url: str, first: int, count: int) -> None:
    """One of the client processes of scenario 3: ``count`` replicas, each with a
    WebSocket (heartbeat every 100 ms) and a keep-alive HTTP connection for joins.

    stdout: ``{"ready": ...}`` once connected, then one result line after the
    rounds.  stdin: the plan (start time, period, spread, rounds) as JSON.
    """
    authority = url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    indices = range(first, first + count)
    # A few connects at a time: a burst of 1000 overflows the daemon's listen backlog.
    gate = asyncio.Semaphore(32)

    async def connect(index: int) -> tuple[WsConnection, HttpConnection]:
        async with gate:
            ws = await WsConnection.open(host, int(port), _member(index).replica_id)
            return ws, await HttpConnection.open(host, int(port))

    pairs = await asyncio.gather(*(connect(i) for i in indices))
    sockets = [ws for ws, _ in pairs]
    conns = [conn for _, conn in pairs]

    def received_bytes() -> int:
        return sum(ws.received_bytes for ws in sockets) + sum(c.received_bytes for c in conns)

    # Heartbeats: a tenth of the sockets every 10 ms, each socket every 100 ms.
    slices = 10
    beat_gap = [0.0]
    beats_sent = [0]

    async def heartbeats() -> None:
        tick = CAPACITY_HEARTBEAT_S / slices
        last = [time.monotonic()] * slices
        began = time.monotonic()
        k = 0
        while True:
            now = time.monotonic()
            part = k % slices
            beat_gap[0] = max(beat_gap[0], now - last[part])
            last[part] = now
            for ws in sockets[part::slices]:
                ws.beat()
            beats_sent[0] += len(sockets[part::slices])
            k += 1
            await asyncio.sleep(max(0.0, began + k * tick - time.monotonic()))

    beating = asyncio.create_task(heartbeats())
    _emit({"ready": True})

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    plan = json.loads(await stdin.readline())
    start, period, rounds = plan["start"], plan["period"], plan["rounds"]
    stop_at = start + plan["budget"]  # no round starts later; answers are awaited a bit more
    spread, last_at = plan["spread"], plan["last_at"]
    beat_gap[0] = beats_sent[0] = 0
    cpu_before, wall_before = time.process_time(), time.monotonic()
    bytes_before = received_bytes()
    joins = [
        http_request(
            "POST", authority, "/v1/join", protocol.encode_join(_member(i), LONG_TIMEOUT_MS / 1000)
        )
        for i in indices
    ]
    sent = [[0.0] * count for _ in range(rounds)]
    replies: list[list[Reply | None]] = [[None] * count for _ in range(rounds)]
    refusals: dict[str, int] = {}

    async def replica(slot: int) -> None:
        # Groups finish their inner steps at different times, and one finishes last.
        index = first + slot
        offset = last_at if index == CAPACITY_REPLICAS - 1 else spread * (index * 0.618034 % 1.0)
        for k in range(rounds):
            delay = start + k * period + offset - time.monotonic()
            if time.monotonic() + max(delay, 0.0) > stop_at:
                return
            if delay > 0:
                await asyncio.sleep(delay)
            # Like the client library: a refused join (evicted while waiting, superseded)
            # is sent again at once.  An overloaded daemon shows up here, not as a crash.
            for _ in range(10):
                sent[k][slot] = time.monotonic()
                reply = await conns[slot].request(joins[slot])
                replies[k][slot] = reply
                if reply.status == 200:
                    break
                code = f"{reply.status} {protocol.decode_error(reply.decoded())[0]}"
                refusals[code] = refusals.get(code, 0) + 1

    tasks = [asyncio.create_task(replica(slot)) for slot in range(count)]
    _, late = await asyncio.wait(tasks, timeout=stop_at + CAPACITY_GRACE_S - time.monotonic())
    for task in late:  # an answer that has not come by now is not coming in time
        task.cancel()
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
    received = received_bytes() - bytes_before
    summary = []
    for k in range(rounds):
        got = [r for r in replies[k] if r is not None and r.status == 200]
        try:
            _check_round(got, CAPACITY_REPLICAS)
            complete = len(got) == count
        except RuntimeError:  # a quorum without some members, or two quorums in one round
            complete = False
        arrived = [r.received for r in got] or [math.nan]
        ran = all(t > 0 for t in sent[k])
        summary.append([max(sent[k]), max(arrived), min(arrived), complete, ran])
    _emit(
        {
            "rounds": summary,
            "cpu_s": cpu,
            "wall_s": wall,
            "heartbeat_max_gap_ms": beat_gap[0] * 1000,
            "heartbeats_per_s": beats_sent[0] / wall,
            "events": sum(ws.events for ws in sockets),
            "received_bytes": received,
            "refusals": refusals,
        }
    )
    # Stay alive (and beating) until the bench has read the daemon's counters and
    # closes our stdin.
    await stdin.read()
    beating.cancel()
    for ws in sockets:
        ws.close()
    for conn in conns:
        conn.close()


@dataclass
class CapacityResult:
    replicas: int
    latency_ms: list[float]
    first_answer_ms: list[float]  # last join -> the first member holds its answer
    incomplete_rounds: int  # some member refused, or a quorum without every member
    rounds_not_run: int  # the time budget ran out first
    refusals: dict[str, int]  # join answers other than 200, by status and code
    daemon_rounds: Share  # while rounds run
    daemon_idle: Share  # heartbeats only
    client_cpu: float  # all client processes together, in cores
    heartbeat_max_gap_ms: float
    heartbeats_per_s: float  # sent by all clients while the rounds ran
    evictions: dict[str, int]  # by cause, from the daemon's /metrics
    events_per_replica_round: float
    bytes_per_replica_round: float
    round_period_s: float
    daemon_cpu_per_round_ms: float


async def _read_json_line(stream: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), timeout)
    if not line:
        raise RuntimeError("a capacity worker exited early")
    message: dict[str, Any] = json.loads(line)
    return message


async def _capacity(
    d: Daemon, rounds: int, period: float, idle_window: float, budget: float, cpus: set[int] | None
) -> CapacityResult:
    """``rounds`` one ``period`` apart, none started later than ``budget`` after the first."""
    per = CAPACITY_REPLICAS // CAPACITY_WORKERS
    command = [sys.executable, __file__, "--_capacity-worker", d.url]
    workers: list[asyncio.subprocess.Process] = []
    try:
        for lowest in range(0, CAPACITY_REPLICAS, per):
            workers.append(
                await asyncio.create_subprocess_exec(
                    *command, str(lowest), str(per), stdin=PIPE, stdout=PIPE, cwd=ROOT
                )
            )
            _pin(workers[-1].pid, cpus)
        for w in workers:
            assert w.stdout is not None
            await _read_json_line(w.stdout, 120)
        status = await HttpConnection.open(d.host, d.port)
        alive = len((await _get_json(status, d.authority, "/status"))["replicas"])
        if alive != CAPACITY_REPLICAS:
            raise RuntimeError(f"{alive} replicas alive, expected {CAPACITY_REPLICAS}")

        before, t0 = _schedstat(d.pid), time.monotonic()
        await asyncio.sleep(idle_window)
        idle = _shares(before, _schedstat(d.pid), time.monotonic() - t0)

        start = time.monotonic() + 0.3
        plan = {
            "start": start,
            "period": period,
            "rounds": rounds,
            "budget": budget,
            **CAPACITY_JOIN_TIMES,
        }
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(json.dumps(plan).encode() + b"\n")
        # Round 0 forms by the ordinary rules; the CPU window starts with the fast path.
        await asyncio.sleep(max(0.0, start + period - time.monotonic()))
        before, t0 = _schedstat(d.pid), time.monotonic()
        outcomes = []
        for w in workers:
            assert w.stdout is not None
            outcomes.append(await _read_json_line(w.stdout, budget + CAPACITY_GRACE_S + 60))
        after, wall = _schedstat(d.pid), time.monotonic() - t0
        busy = _shares(before, after, wall)
        clients = sum(o["cpu_s"] for o in outcomes) / max(o["wall_s"] for o in outcomes)
        metrics = (await status.request(http_request("GET", d.authority, "/metrics"))).decoded()
        status.close()
        evictions = _evictions_by_cause(metrics.decode())
        replica_rounds = CAPACITY_REPLICAS * rounds
        latency: list[float] = []
        first: list[float] = []
        incomplete = not_run = 0
        for k in range(1, rounds):
            if not all(o["rounds"][k][4] for o in outcomes):
                not_run += 1  # the time budget ran out first
                continue
            if not all(o["rounds"][k][3] for o in outcomes):
                incomplete += 1  # not every member answered with the same full quorum
                continue
            last_sent = max(o["rounds"][k][0] for o in outcomes)
            released = max(o["rounds"][k][1] for o in outcomes)
            latency.append((released - last_sent) * 1000)
            first.append((min(o["rounds"][k][2] for o in outcomes) - last_sent) * 1000)
        # Heartbeats included: under contention the heartbeats-only share is capped by
        # the CPU the daemon got, so subtracting it would not be a measurement.
        per_round = busy.running * wall / max(1, rounds - 1 - not_run)
        return CapacityResult(
            replicas=CAPACITY_REPLICAS,
            latency_ms=latency,
            first_answer_ms=first,
            incomplete_rounds=incomplete,
            rounds_not_run=not_run,
            refusals={
                code: sum(o["refusals"].get(code, 0) for o in outcomes)
                for code in {code for o in outcomes for code in o["refusals"]}
            },
            daemon_rounds=busy,
            daemon_idle=idle,
            client_cpu=clients,
            heartbeat_max_gap_ms=max(o["heartbeat_max_gap_ms"] for o in outcomes),
            heartbeats_per_s=sum(o["heartbeats_per_s"] for o in outcomes),
            evictions=evictions,
            events_per_replica_round=sum(o["events"] for o in outcomes) / replica_rounds,
            bytes_per_replica_round=sum(o["received_bytes"] for o in outcomes) / replica_rounds,
            round_period_s=period,
            daemon_cpu_per_round_ms=per_round * 1000,
        )
    finally:
        await _end_workers(workers)


def _evictions_by_cause(metrics: str) -> dict[str, int]:
    """From Prometheus text: ``lighthouse_evictions_total{cause="..."} N`` lines."""
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("lighthouse_evictions_total{"):
            labels, value = line.rsplit(" ", 1)
            cause = labels.split('cause="', 1)[1].split('"', 1)[0]
            counts[cause] = int(float(value))
    return counts


async def _end_workers(workers: Sequence[asyncio.subprocess.Process]) -> None:
    """Each worker leaves when its stdin closes; one that does not is ended by its pid."""
    for w in workers:
        if w.stdin is not None:
            w.stdin.close()
    for w in workers:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and w.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)
            try:
                await asyncio.wait_for(w.wait(), 5)
                break
            except asyncio.TimeoutError:
                continue


def scenario_capacity(
    rounds: int, period: float, idle_window: float, budget: float, pin: bool
) -> CapacityResult:
    daemon_cpus, client_cpus = _cpus() if pin else (None, None)
    with daemon(
        min_replicas=1,
        join_timeout_ms=LONG_TIMEOUT_MS,
        heartbeat_timeout_ms=5_000,
        cpus=daemon_cpus,
    ) as d:
        return asyncio.run(_capacity(d, rounds, period, idle_window, budget, client_cpus))


# -- side by side: torchft's lighthouse ----------------------------------------------------------

# Runs under the torchft venv's Python, which has neither msgpack nor this project, so it is
# a standalone script.  Threads stand in for replicas: the torchft client blocks in Rust with
# the GIL released.  Without /status to poll, the N-1 early joins get a fixed settle time.
_TORCHFT_DRIVER = """
import json, sys, threading, time
from datetime import timedelta
from torchft._torchft import LighthouseClient

address, n, rounds, settle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
clients = [LighthouseClient(address, timedelta(seconds=10)) for _ in range(n)]
def member(i):
    host = f"10.{i // 250 % 250}.{i % 250}.1"
    return dict(replica_id=f"replica-{i:04d}", address=f"http://{host}:29512",
                store_address=f"{host}:29500", step=100, world_size=8)
members = [member(i) for i in range(n)]
for client, m in zip(clients, members):
    client.heartbeat(m["replica_id"])
sent, received, sizes = [0.0] * n, [0.0] * n, [0] * n
def join(i, go):
    go.wait()
    sent[i] = time.monotonic()
    quorum = clients[i].quorum(timeout=timedelta(seconds=120), **members[i])
    received[i] = time.monotonic()
    sizes[i] = len(quorum.participants)
def one_round(settled):
    gos = [threading.Event() for _ in range(n)]
    threads = [threading.Thread(target=join, args=(i, gos[i])) for i in range(n)]
    for t in threads:
        t.start()
    for go in gos[:-1]:
        go.set()
    if settled:
        time.sleep(settle)
    gos[-1].set()
    for t in threads:
        t.join()
    if any(size != n for size in sizes):
        raise SystemExit(f"quorum sizes {set(sizes)}, expected {n}")
    return (max(received) - sent[-1]) * 1000
one_round(False)
print(json.dumps([one_round(True) for _ in range(rounds)]), flush=True)
"""

_TORCHFT_SERVER = """
import sys
from torchft._torchft import LighthouseServer
server = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=120000,
                          quorum_tick_ms=100, heartbeat_timeout_ms=120000)
print(server.address(), flush=True)
sys.stdin.read()
"""


def torchft_python(path: str) -> str | None:
    """The interpreter of the separate torchft venv, if torchft imports there."""
    if not Path(path).exists():
        return None
    probe = subprocess.run(
        [path, "-c", "import torchft._torchft"], capture_output=True, timeout=120, check=False
    )
    return path if probe.returncode == 0 else None


def scenario_torchft(python: str, sizes: Sequence[tuple[int, int]]) -> dict[int, list[float]]:
    """Scenario 1 against torchft's lighthouse (a Rust gRPC server), same rounds and members."""
    results = {}
    for n, rounds in sizes:
        server = subprocess.Popen(
            [python, "-c", _TORCHFT_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert server.stdout is not None
            announced = _read_line(server.stdout, 120.0).strip()
            if not announced:
                raise RuntimeError("torchft lighthouse did not start")
            # It announces its host name; it is bound to 127.0.0.1.
            address = f"http://127.0.0.1:{announced.rsplit(':', 1)[1]}"
            settle = 0.05 + 0.0005 * n
            driver = subprocess.run(
                [python, "-c", _TORCHFT_DRIVER, address, str(n), str(rounds), str(settle)],
                capture_output=True,
                timeout=600,
                check=True,
            )
            results[n] = json.loads(driver.stdout.decode().strip().splitlines()[-1])
        finally:
            _end(server)
    return results


# -- report --------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} ms"


Report = tuple[list[Row], dict[str, Any]]


def _latency_report(results: Sequence[LatencyResult]) -> Report:
    rows: list[Row] = []
    metrics: dict[str, Any] = {}
    for r in results:
        p50, p99 = statistics.median(r.settled_ms), percentile(r.settled_ms, 99)
        b50, b99 = statistics.median(r.burst_ms), percentile(r.burst_ms, 99)
        scenario = f"quorum N={r.n}"
        goal_p50 = f"<= {GOAL_P50_2_MS:g} ms" if r.n == 2 else ""
        goal_p99 = f"<= {GOAL_P99_256_MS:g} ms" if r.n == 256 else ""
        rows += [
            Row(scenario, f"last join -> all released, p50 of {len(r.settled_ms)} rounds",
                _ms(p50), goal_p50, p50 <= GOAL_P50_2_MS if r.n == 2 else None),
            Row(scenario, "last join -> all released, p99", _ms(p99), goal_p99,
                p99 <= GOAL_P99_256_MS if r.n == 256 else None),
            Row(scenario, "  in that window: daemon on CPU / waiting for CPU / client CPU",
                f"{r.daemon_cpu_ms:.2f} / {r.daemon_wait_ms:.2f} / {r.client_cpu_ms:.2f} ms"),
            Row(scenario, "burst: all N sent at once, p50 / p99", f"{b50:.2f} / {b99:.2f} ms"),
            Row(scenario, "join answer size, as sent", f"{r.answer_bytes} B"),
        ]  # fmt: skip
        metrics |= {
            f"quorum_latency_ms_p50_{r.n}": round(p50, 3),
            f"quorum_latency_ms_p99_{r.n}": round(p99, 3),
            f"quorum_burst_ms_p50_{r.n}": round(b50, 3),
            f"quorum_burst_ms_p99_{r.n}": round(b99, 3),
            f"quorum_daemon_cpu_ms_per_release_{r.n}": round(r.daemon_cpu_ms, 3),
            f"quorum_daemon_wait_ms_per_release_{r.n}": round(r.daemon_wait_ms, 3),
            f"quorum_client_cpu_ms_per_release_{r.n}": round(r.client_cpu_ms, 3),
            f"quorum_answer_bytes_{r.n}": r.answer_bytes,
        }
    return rows, metrics


def _death_report(death: DeathResult) -> Report:
    median, worst = statistics.median(death.detect_ms), max(death.detect_ms)
    goal = f"<= {GOAL_DEATH_MS:g} ms"
    lost = statistics.median(death.lost_event_ms) if death.lost_event_ms else math.nan
    frozen = _ms(death.frozen_ms) if death.frozen_ms is not None else "not run (--quick)"
    rows = [
        Row("death (SIGKILL)", f"kill -> both survivors' quorum, median of {len(death.detect_ms)}",
            _ms(median), goal, median <= GOAL_DEATH_MS),
        Row("death (SIGKILL)", "kill -> both survivors' quorum, max", _ms(worst), goal,
            worst <= GOAL_DEATH_MS),
        Row("death (SIGKILL)", "kill -> member_lost pushed to both, median", _ms(lost)),
        Row("death (SIGSTOP)", "frozen -> survivors' quorum (heartbeat timeout 5 s)", frozen),
    ]  # fmt: skip
    metrics: dict[str, Any] = {
        "death_detection_ms": round(median, 3),
        "death_detection_ms_max": round(worst, 3),
        "death_member_lost_ms": None if math.isnan(lost) else round(lost, 3),
    }
    if death.frozen_ms is not None:
        metrics["death_frozen_ms"] = round(death.frozen_ms, 1)
    return rows, metrics


def _capacity_report(c: CapacityResult) -> Report:
    p50 = statistics.median(c.latency_ms) if c.latency_ms else math.nan
    p99 = percentile(c.latency_ms, 99)
    first = statistics.median(c.first_answer_ms) if c.first_answer_ms else math.nan
    met = p99 <= GOAL_CAPACITY_P99_MS and c.incomplete_rounds == 0
    refusals = ", ".join(f"{n} x {code}" for code, n in sorted(c.refusals.items())) or "none"
    scenario = f"capacity {c.replicas}"
    rows = [
        Row(scenario, f"last join -> all released, p99 of {len(c.latency_ms)} rounds", _ms(p99),
            f"<= {GOAL_CAPACITY_P99_MS:g} ms", met),
        Row(scenario, "last join -> all released, p50", _ms(p50)),
        Row(scenario, "last join -> first member released, p50", _ms(first)),
        Row(scenario, "rounds left out: a member refused or missing", str(c.incomplete_rounds),
            "0", c.incomplete_rounds == 0),
        Row(scenario, "rounds not run: the time budget ran out", str(c.rounds_not_run)),
        Row(scenario, "join refusals (the replica joined again)", refusals),
        Row(scenario, "daemon CPU, heartbeats only: running / waiting for its core",
            f"{c.daemon_idle.running:.0%} / {c.daemon_idle.waiting:.0%}"),
        Row(scenario, "daemon CPU, during rounds: running / waiting for its core",
            f"{c.daemon_rounds.running:.0%} / {c.daemon_rounds.waiting:.0%}"),
        Row(scenario, "daemon CPU per round, heartbeats included",
            f"{c.daemon_cpu_per_round_ms:.0f} ms"),
        Row(scenario, f"client CPU ({CAPACITY_WORKERS} processes, same machine)",
            f"{c.client_cpu:.2f} cores"),
        Row(scenario, "heartbeat frames sent per second (goal of the load: 10000)",
            f"{c.heartbeats_per_s:.0f}"),
        Row(scenario, "worst heartbeat gap at a client (every 100 ms)",
            _ms(c.heartbeat_max_gap_ms)),
        Row(scenario, "evictions during the run, by cause",
            ", ".join(f"{n} {cause}" for cause, n in sorted(c.evictions.items()) if n) or "none",
            "none", not any(c.evictions.values())),
        Row(scenario, "per replica per round: WebSocket events; bytes received",
            f"{c.events_per_replica_round:.2f}; {c.bytes_per_replica_round / 1000:.0f} kB"),
    ]  # fmt: skip
    metrics = {
        "capacity_quorum_ms_p99_1000": None if math.isnan(p99) else round(p99, 3),
        "capacity_quorum_ms_p50_1000": None if math.isnan(p50) else round(p50, 3),
        "capacity_incomplete_rounds": c.incomplete_rounds,
        "capacity_rounds_not_run": c.rounds_not_run,
        "capacity_join_refusals": sum(c.refusals.values()),
        "capacity_daemon_cpu_rounds": round(c.daemon_rounds.running, 3),
        "capacity_daemon_cpu_wait_rounds": round(c.daemon_rounds.waiting, 3),
        "capacity_daemon_cpu_heartbeats_only": round(c.daemon_idle.running, 3),
        "capacity_daemon_cpu_wait_heartbeats_only": round(c.daemon_idle.waiting, 3),
        "capacity_client_cpu_cores": round(c.client_cpu, 3),
        "capacity_daemon_cpu_ms_per_round": round(c.daemon_cpu_per_round_ms, 1),
        "capacity_evictions": sum(c.evictions.values()),
        "capacity_bytes_per_replica_round": round(c.bytes_per_replica_round),
    }
    return rows, metrics


def _torchft_report(
    ours: Sequence[LatencyResult], theirs: dict[int, list[float]] | None, why_not: str
) -> Report:
    rows: list[Row] = []
    metrics: dict[str, Any] = {}
    for r in ours:
        if theirs is not None and r.n not in theirs:
            continue  # a size torchft was not asked to run
        if theirs is None:
            rows.append(
                Row(f"torchft N={r.n}", "last join -> all released", f"not measured ({why_not})")
            )
            continue
        tp50, tp99 = statistics.median(theirs[r.n]), percentile(theirs[r.n], 99)
        p50, p99 = statistics.median(r.settled_ms), percentile(r.settled_ms, 99)
        rows += [
            Row(f"torchft N={r.n}", f"last join -> all released, p50 / p99 of {len(theirs[r.n])}",
                f"{tp50:.2f} / {tp99:.2f} ms"),
            Row(f"torchft N={r.n}", "ours / torchft, p50 and p99",
                f"{p50 / tp50:.2f}x / {p99 / tp99:.2f}x"),
        ]  # fmt: skip
        metrics |= {
            f"torchft_quorum_latency_ms_p50_{r.n}": round(tp50, 3),
            f"torchft_quorum_latency_ms_p99_{r.n}": round(tp99, 3),
        }
    return rows, metrics


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_replica":
        asyncio.run(_replica_main(sys.argv[2], sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--_capacity-worker":
        asyncio.run(_capacity_worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    cli = parser(__doc__.split("\n")[0])
    cli.add_argument(
        "--only",
        choices=("latency", "death", "capacity"),
        action="append",
        help="run only this scenario (repeatable); the JSON then lacks the others' keys",
    )
    cli.add_argument(
        "--torchft-python",
        default="/tmp/torchft-venv/bin/python",
        metavar="PATH",
        help="Python of a separate venv with torchft, for a side-by-side (skipped if absent)",
    )
    cli.add_argument(
        "--no-pin",
        action="store_true",
        help="capacity: let the scheduler place the daemon (on a busy shared machine)",
    )
    args = cli.parse_args()
    wanted = set(args.only or ("latency", "death", "capacity"))
    quick: bool = args.quick
    began = time.monotonic()
    load_before = _loadavg()

    reports: list[Report] = []
    if "latency" in wanted:
        sizes = [(2, 50), (16, 30), (256, 10)]
        if not quick:  # and 1000, for the capacity scenario's cost without heartbeats
            sizes = [(2, 200), (16, 100), (256, 30), (1000, 10)]
        latency = scenario_latency(sizes)
        reports.append(_latency_report(latency))
        # torchft's client turns every answer into Python objects under the GIL, so at
        # N=1000 it would measure the client; and --quick has no time for a second daemon.
        python = None if quick else torchft_python(args.torchft_python)
        torchft_sizes = [(n, rounds) for n, rounds in sizes if n <= 256]
        theirs = scenario_torchft(python, torchft_sizes) if python is not None else None
        reports.append(_torchft_report(latency, theirs, "--quick" if quick else "no torchft"))
    if "death" in wanted:
        reports.append(_death_report(scenario_death(3 if quick else 7, frozen=not quick)))
    if "capacity" in wanted:
        # A time budget keeps an overloaded run (a busy shared machine) bounded.
        rounds, idle_window, budget = (8, 0.5, 12.0) if quick else (30, 2.0, 90.0)
        capacity = scenario_capacity(rounds, 1.0, idle_window, budget, pin=not args.no_pin)
        reports.append(_capacity_report(capacity))

    rows = [row for report_rows, _ in reports for row in report_rows]
    metrics: dict[str, Any] = {
        k: v for _, report_metrics in reports for k, v in report_metrics.items()
    }
    print_table(rows)
    daemon_cpus, client_cpus = _cpus() if not args.no_pin else (None, None)
    pinning = (
        f"capacity: daemon pinned to CPU {sorted(daemon_cpus)}, replicas to {sorted(client_cpus)};"
        " latency and death: not pinned"
        if daemon_cpus is not None and client_cpus is not None
        else "nothing pinned"
    )
    print(
        f"\n{os.cpu_count()} CPUs; {pinning}; load average {load_before} before,"
        f" {_loadavg()} after; {time.monotonic() - began:.0f} s{' (--quick)' if quick else ''}"
    )
    if any(key.startswith("torchft_") for key in metrics):
        print(
            "torchft: timed through its own client (Rust gRPC, a thread per replica, answers"
            " turned into Python objects); its early joins get a fixed settle time, not a poll"
        )
    metrics["load_average_before"] = load_before
    metrics["quick"] = quick
    write_json(args.json, metrics)


if __name__ == "__main__":
    main()
