"""Scenario 1 of the lighthouse bench: quorum latency, ours and (side by side) torchft's.

N replicas join round after round (the fast path after the first round).  Per
round, N-1 joins are sent and allowed to register (polled on /status), then
the last one is sent: the latency is from just before that last join is
written to when every member holds its whole answer.  A "burst" variant sends
all N at once, so it also counts the daemon ingesting them.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import Row, percentile
from bench._lean_client import HttpConnection, http_request
from bench._lighthouse_daemon import (
    LONG_TIMEOUT_MS,
    PIPE,
    Daemon,
    check_round,
    daemon,
    member,
    read_line,
    schedstat,
    spawn,
)
from ftwire import protocol

GOAL_P50_2_MS = 1.0
GOAL_P99_256_MS = 10.0

Report = tuple[list[Row], dict[str, Any]]


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


async def _rounds(d: Daemon, n: int, rounds: int) -> LatencyResult:
    conns = [await HttpConnection.open(d.host, d.port) for _ in range(n)]
    status_conn = await HttpConnection.open(d.host, d.port)
    try:
        members = [member(i, n) for i in range(n)]
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
        check_round(
            await asyncio.gather(*(c.request(j) for c, j in zip(conns, joins, strict=True))), n
        )

        result = LatencyResult(n)
        daemon_cpu = daemon_wait = client_cpu = 0.0
        for _ in range(rounds):
            waiting = [c.request(j) for c, j in zip(conns[:-1], joins[:-1], strict=True)]
            while len((await status_conn.get_json(d.authority, "/status"))["joiners"]) < n - 1:
                await asyncio.sleep(0.001)
            sched_before, own_before = schedstat(d.pid), time.process_time()
            sent = time.monotonic()
            waiting.append(conns[-1].request(joins[-1]))
            replies = await asyncio.gather(*waiting)
            own_after, sched_after = time.process_time(), schedstat(d.pid)
            result.settled_ms.append((max(r.received for r in replies) - sent) * 1000)
            daemon_cpu += sched_after[0] - sched_before[0]
            daemon_wait += sched_after[1] - sched_before[1]
            client_cpu += own_after - own_before
            check_round(replies, n)
            result.answer_bytes = len(replies[0].body)

            waiting = [c.request(j) for c, j in zip(conns, joins, strict=True)]
            sent = time.monotonic()
            replies = await asyncio.gather(*waiting)
            result.burst_ms.append((max(r.received for r in replies) - sent) * 1000)
            check_round(replies, n)
        result.daemon_cpu_ms = daemon_cpu / rounds * 1000
        result.daemon_wait_ms = daemon_wait / rounds * 1000
        result.client_cpu_ms = client_cpu / rounds * 1000
        return result
    finally:
        for conn in [*conns, status_conn]:
            conn.close()


async def scenario_latency(
    sizes: Sequence[tuple[int, int]], options: Sequence[str] = ()
) -> list[LatencyResult]:
    """Unpinned: on a shared box a pinned daemon waits for its one CPU while the other is idle."""
    results = []
    for n, rounds in sizes:
        async with daemon(
            min_replicas=1,
            join_timeout_ms=LONG_TIMEOUT_MS,
            heartbeat_timeout_ms=LONG_TIMEOUT_MS,
            cpus=None,
            options=options,
        ) as d:
            results.append(await _rounds(d, n, rounds))
    return results


def latency_report(results: Sequence[LatencyResult]) -> Report:
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
                f"{p50:.2f} ms", goal_p50, p50 <= GOAL_P50_2_MS if r.n == 2 else None),
            Row(scenario, "last join -> all released, p99", f"{p99:.2f} ms", goal_p99,
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


# -- side by side: torchft's lighthouse ----------------------------------------------------------

_TORCHFT_DRIVER = Path(__file__).with_name("_torchft_driver.py")


def torchft_python(path: str) -> str | None:
    """The interpreter of the separate torchft venv, if torchft imports there."""
    if not Path(path).exists():
        return None
    probe = subprocess.run(
        [path, "-c", "import torchft._torchft"], capture_output=True, timeout=120, check=False
    )
    return path if probe.returncode == 0 else None


async def scenario_torchft(python: str, sizes: Sequence[tuple[int, int]]) -> dict[int, list[float]]:
    """Scenario 1 against torchft's lighthouse (a Rust gRPC server), same rounds and members.

    Both the server and the driver run under the torchft venv's Python, which has
    neither msgpack nor this project: ``_torchft_driver.py`` is a standalone script.
    """
    results = {}
    for n, rounds in sizes:
        server = await spawn(
            "torchft-lighthouse",
            [python, str(_TORCHFT_DRIVER), "serve"],
            stdin=PIPE,
            stdout=PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert server.proc.stdout is not None
            announced = (await read_line(server.proc.stdout, 120.0)).strip()
            if not announced:
                raise RuntimeError("torchft lighthouse did not start")
            # It announces its host name; it is bound to 127.0.0.1.
            address = f"http://127.0.0.1:{announced.rsplit(':', 1)[1]}"
            settle = 0.05 + 0.0005 * n
            command = [str(_TORCHFT_DRIVER), "rounds", address, str(n), str(rounds), str(settle)]
            driver = await spawn("torchft-driver", [python, *command], stdout=PIPE)
            try:
                out, _ = await asyncio.wait_for(driver.proc.communicate(), 600)
            finally:
                await driver.stop()
            if driver.proc.returncode != 0:
                raise RuntimeError(f"torchft driver exited with {driver.proc.returncode}")
            results[n] = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            await server.stop()
    return results


def torchft_report(
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
