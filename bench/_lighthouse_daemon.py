"""The lighthouse bench's processes: the daemon under test, its children, their CPU use.

Every process the bench starts is a :class:`Child` of the launcher's own
helpers (a session of its own, ended by PID with a grace period), so a bench
that fails half-way leaves nothing running.  The replicas it simulates are
described here too (:func:`member`, :func:`check_round`), since every scenario
sends the same kind of join.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bench._lean_client import Reply
from ftdiloco.operate.launch.processes import Child
from ftwire import protocol
from ftwire.messages import Member
from lighthouse.cli import listening_url

ROOT = Path(__file__).resolve().parent.parent
PIPE = asyncio.subprocess.PIPE

# Long enough that no quorum in the latency and capacity scenarios forms by a timeout.
LONG_TIMEOUT_MS = 120_000


def cpus() -> tuple[set[int] | None, set[int] | None]:
    """(daemon CPUs, client CPUs): the first CPU for the daemon, the rest for the clients.

    On one CPU nothing is pinned (there is nothing to separate).
    """
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return None, None
    return {mine[0]}, set(mine[1:])


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)


class Share(NamedTuple):
    """A process's use of one CPU over a window: running, and ready but not running."""

    running: float
    waiting: float


def shares(before: tuple[float, float], after: tuple[float, float], wall: float) -> Share:
    return Share((after[0] - before[0]) / wall, (after[1] - before[1]) / wall)


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds ready but waiting for one) since the process started.

    On a shared machine the second tells a slow daemon from a busy machine.
    """
    with open(f"/proc/{pid}/schedstat") as f:
        on_cpu, waiting, _ = f.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def spawn(name: str, command: Sequence[str], **pipes: Any) -> Child:
    """Start ``command`` in a session of its own (so :meth:`Child.stop` reaches its tree)."""
    proc = await asyncio.create_subprocess_exec(*command, cwd=ROOT, start_new_session=True, **pipes)
    return Child(name, proc)


async def read_line(stream: asyncio.StreamReader, timeout: float) -> str:
    """The next line, or "" if none comes in time or the stream ends."""
    with contextlib.suppress(asyncio.TimeoutError):
        return (await asyncio.wait_for(stream.readline(), timeout)).decode()
    return ""


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


@contextlib.asynccontextmanager
async def daemon(
    *,
    min_replicas: int,
    join_timeout_ms: int,
    heartbeat_timeout_ms: int,
    cpus: set[int] | None,
    python: Sequence[str] = (sys.executable,),
    options: Sequence[str] = (),
) -> AsyncIterator[Daemon]:
    """The real ``lighthouse`` command on a free loopback port; stopped by PID on the way out.

    Its logs (one JSON line per quorum, with every member's id) go to a
    temporary file: rendering them is part of the daemon's real cost, and a
    pipe nobody reads would eventually block it.  ``python`` is the command
    that runs a module (e.g. with a profiler in front); ``options`` are more
    flags for the daemon (e.g. ``--event-loop uvloop``).
    """
    command = [
        *python, "-m", "lighthouse.cli", "--bind", "127.0.0.1:0",
        "--min-replicas", str(min_replicas),
        "--join-timeout-ms", str(join_timeout_ms),
        "--heartbeat-timeout-ms", str(heartbeat_timeout_ms),
        "--log-format", "json", *options,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        child = await spawn("lighthouse", command, stdout=PIPE, stderr=log)
        try:
            pin(child.pid, cpus)
            assert child.proc.stdout is not None
            line = await read_line(child.proc.stdout, 30.0)
            url = listening_url(line)
            if url is None:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"lighthouse did not start: {line!r}\n{tail}")
            yield Daemon(child.pid, url)
        finally:
            await child.stop()


# -- the replicas every scenario simulates ----------------------------------------------------


def member(index: int, groups: int) -> Member:
    """Replica group ``index`` of ``groups`` as a real one would describe itself.

    The addresses size the answer.  ``expected_groups`` is what a real group
    sends (NUM_REPLICA_GROUPS): without it, a fresh lighthouse that sees
    step 100 takes the job for one under way and waits a whole heartbeat
    timeout before its first quorum, for replicas that might still reconnect.
    """
    host = f"10.{index // 250 % 250}.{index % 250}.1"
    return Member(
        replica_id=f"replica-{index:04d}",
        address=f"http://{host}:29512",
        store_address=f"{host}:29500",
        step=100,
        world_size=8,
        expected_groups=groups,
    )


def heartbeat_state() -> protocol.Liveness:
    """What a real replica's heartbeats say: its incarnation and committed step (as joined)."""
    return protocol.Liveness("", (100, ""))


def check_round(replies: Sequence[Reply], n: int) -> int:
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
