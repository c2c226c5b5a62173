"""Scenario 2 of the lighthouse bench: how fast a dead replica is noticed.

Three replica processes keep a liveness WebSocket open through the project's
client and join rounds (min_replicas 2).  While the two survivors wait in a
join, the third is SIGKILLed; the time is from just before ``os.kill`` to when
both survivors' joins have returned a quorum without it.  Timeouts are long
(heartbeat 5 s, join 30 s), so only the closed connection can explain a fast
answer; the full run also SIGSTOPs one (a frozen host whose socket stays open)
to show the heartbeat-timeout path.

    python -m bench._lighthouse_death URL REPLICA_ID   # one replica process
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench._common import Row
from bench._lean_client import HttpConnection
from bench._lighthouse_daemon import PIPE, Daemon, daemon, spawn
from ftdiloco.operate.launch.processes import Child
from ftwire import protocol
from ftwire.messages import Member

GOAL_DEATH_MS = 100.0


async def _replica_main(url: str, replica_id: str) -> None:
    """A replica process: liveness through the real client, joins on command.

    stdin: ``connect`` (open the liveness link), ``join``.
    stdout: ``started``, ``ready``, ``quorum <monotonic> <id> <members>``,
    ``lost <monotonic> <rid>``, ``error <message>``.  The client's logs go to stderr.
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

    def __init__(self, replica_id: str, child: Child) -> None:
        self.replica_id = replica_id
        self.child = child
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.lost: list[tuple[float, str]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, url: str, replica_id: str) -> ReplicaProcess:
        command = [sys.executable, "-m", "bench._lighthouse_death", url, replica_id]
        child = await spawn(
            replica_id, command, stdin=PIPE, stdout=PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        return cls(replica_id, child)

    async def _read(self) -> None:
        assert self.child.proc.stdout is not None
        while line := (await self.child.proc.stdout.readline()).decode():
            if line.startswith("lost "):
                _, when, rid = line.split()
                self.lost.append((float(when), rid))
            else:
                await self.lines.put(line.strip())
        await self.lines.put("exited")

    def send(self, command: str) -> None:
        assert self.child.proc.stdin is not None
        self.child.proc.stdin.write(command.encode() + b"\n")

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
        """Kills the process by its pid (it may already be dead) and waits for it."""
        self.child.kill()
        await self.child.proc.wait()
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
        status = await conn.get_json(d.authority, "/status")
        if set(replica_ids) <= {j["replica_id"] for j in status["joiners"]}:
            return
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{replica_ids} did not join within 30 s")


async def _trials(d: Daemon, trials: int, frozen: bool) -> DeathResult:
    status = await HttpConnection.open(d.host, d.port)
    started: list[ReplicaProcess] = []  # every process, to end them all whatever happens

    async def start(replica_id: str) -> ReplicaProcess:
        started.append(await ReplicaProcess.spawn(d.url, replica_id))
        return started[-1]

    result = DeathResult()
    try:
        survivors = [await start("alive-a"), await start("alive-b")]
        # Spawned one trial ahead: a Python start takes ~1 s, which is not what is measured.
        upcoming = await start("victim-0")
        for replica in survivors:
            await replica.expect("started")
            replica.send("connect")
            await replica.expect("ready")
        for trial in range(trials + int(frozen)):
            victim = upcoming
            if trial + 1 < trials + int(frozen):
                upcoming = await start(f"victim-{trial + 1}")
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
            os.kill(victim.child.pid, signal.SIGSTOP if is_frozen else signal.SIGKILL)
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
                await _member_lost(result, survivors, victim.replica_id, killed)
            await victim.end()
        return result
    finally:
        for replica in started:
            await replica.end()
        status.close()


async def _member_lost(
    result: DeathResult, survivors: Sequence[ReplicaProcess], victim: str, killed: float
) -> None:
    """The event travels on the WebSocket, independently of the join's answer."""
    for _ in range(200):
        lost = [t for r in survivors for t, rid in r.lost if rid == victim]
        if len(lost) == len(survivors):
            result.lost_event_ms.append((max(lost) - killed) * 1000)
            return
        await asyncio.sleep(0.01)


async def scenario_death(trials: int, frozen: bool) -> DeathResult:
    async with daemon(
        min_replicas=2, join_timeout_ms=30_000, heartbeat_timeout_ms=5_000, cpus=None
    ) as d:
        return await _trials(d, trials, frozen)


def death_report(death: DeathResult) -> tuple[list[Row], dict[str, Any]]:
    median, worst = statistics.median(death.detect_ms), max(death.detect_ms)
    goal = f"<= {GOAL_DEATH_MS:g} ms"
    lost = statistics.median(death.lost_event_ms) if death.lost_event_ms else None
    frozen = f"{death.frozen_ms:.2f} ms" if death.frozen_ms is not None else "not run (--quick)"
    rows = [
        Row("death (SIGKILL)", f"kill -> both survivors' quorum, median of {len(death.detect_ms)}",
            f"{median:.2f} ms", goal, median <= GOAL_DEATH_MS),
        Row("death (SIGKILL)", "kill -> both survivors' quorum, max", f"{worst:.2f} ms", goal,
            worst <= GOAL_DEATH_MS),
        Row("death (SIGKILL)", "kill -> member_lost pushed to both, median",
            "n/a" if lost is None else f"{lost:.2f} ms"),
        Row("death (SIGSTOP)", "frozen -> survivors' quorum (heartbeat timeout 5 s)", frozen),
    ]  # fmt: skip
    metrics: dict[str, Any] = {
        "death_detection_ms": round(median, 3),
        "death_detection_ms_max": round(worst, 3),
        "death_member_lost_ms": None if lost is None else round(lost, 3),
    }
    if death.frozen_ms is not None:
        metrics["death_frozen_ms"] = round(death.frozen_ms, 1)
    return rows, metrics


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_replica_main(sys.argv[1], sys.argv[2]))
