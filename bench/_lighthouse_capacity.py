"""Scenario 3 of the lighthouse bench: 1000 replicas keeping liveness while rounds run.

1000 replicas in 4 client processes (bench/_capacity_worker.py) keep a
liveness WebSocket each, beating as the project's client does, while a round
of all 1000 runs every second (999 joins spread over 300 ms, the last one at
500 ms, so that the latency is that of the join completing the quorum rather
than of a backlog sent in the same instant), the daemon pinned to the first
CPU and the clients to the others.  Reported: p99 quorum latency, the
daemon's CPU use (also per replica per second), and what broke if it could
not keep up (evictions by cause, refused joins, rounds left out); a time
budget bounds an overloaded run.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench import _capacity_worker as worker
from bench._common import Row, percentile
from bench._lean_client import HttpConnection, http_request
from bench._lighthouse_daemon import (
    LONG_TIMEOUT_MS,
    PIPE,
    Daemon,
    Share,
    daemon,
    pin,
    schedstat,
    shares,
    spawn,
)
from ftdiloco.operate.launch.processes import Child

GOAL_CAPACITY_P99_MS = 50.0
REPLICAS = 1000
WORKERS = 4
JOIN_TIMES = {"spread": 0.3, "last_at": 0.5}


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

    @property
    def cpu_per_replica_us(self) -> float:
        """The daemon's CPU per replica per second of the run, heartbeats and rounds included."""
        return self.daemon_rounds.running / self.replicas * 1e6


async def _read_json_line(stream: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), timeout)
    if not line:
        raise RuntimeError("a capacity worker exited early")
    message: dict[str, Any] = json.loads(line)
    return message


def _evictions_by_cause(metrics: str) -> dict[str, int]:
    """From Prometheus text: ``lighthouse_evictions_total{cause="..."} N`` lines."""
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("lighthouse_evictions_total{"):
            labels, value = line.rsplit(" ", 1)
            cause = labels.split('cause="', 1)[1].split('"', 1)[0]
            counts[cause] = int(float(value))
    return counts


async def _stop_workers(workers: Sequence[Child]) -> None:
    """Each worker leaves when its stdin closes; one that does not is stopped by its pid."""
    for w in workers:
        if w.proc.stdin is not None:
            w.proc.stdin.close()
    for w in workers:
        try:
            await asyncio.wait_for(w.proc.wait(), 5)
        except asyncio.TimeoutError:
            await w.stop()


async def _capacity(
    d: Daemon, rounds: int, period: float, idle_window: float, budget: float, cpus: set[int] | None
) -> CapacityResult:
    """``rounds`` one ``period`` apart, none started later than ``budget`` after the first."""
    per = REPLICAS // WORKERS
    workers: list[Child] = []
    try:
        for lowest in range(0, REPLICAS, per):
            command = [sys.executable, "-m", "bench._capacity_worker", d.url]
            command += [str(lowest), str(per), str(REPLICAS)]
            workers.append(await spawn(f"capacity-{lowest}", command, stdin=PIPE, stdout=PIPE))
            pin(workers[-1].pid, cpus)
        for w in workers:
            assert w.proc.stdout is not None
            await _read_json_line(w.proc.stdout, 120)
        status = await HttpConnection.open(d.host, d.port)
        alive = len((await status.get_json(d.authority, "/status"))["replicas"])
        if alive != REPLICAS:
            raise RuntimeError(f"{alive} replicas alive, expected {REPLICAS}")

        before, t0 = schedstat(d.pid), time.monotonic()
        await asyncio.sleep(idle_window)
        idle = shares(before, schedstat(d.pid), time.monotonic() - t0)

        start = time.monotonic() + 0.3
        plan = {"start": start, "period": period, "rounds": rounds, "budget": budget, **JOIN_TIMES}
        for w in workers:
            assert w.proc.stdin is not None
            w.proc.stdin.write(json.dumps(plan).encode() + b"\n")
        # Round 0 forms by the ordinary rules; the CPU window starts with the fast path.
        await asyncio.sleep(max(0.0, start + period - time.monotonic()))
        before, t0 = schedstat(d.pid), time.monotonic()
        outcomes = []
        for w in workers:
            assert w.proc.stdout is not None
            outcomes.append(await _read_json_line(w.proc.stdout, budget + worker.GRACE_S + 60))
        after, wall = schedstat(d.pid), time.monotonic() - t0
        busy = shares(before, after, wall)
        clients = sum(o["cpu_s"] for o in outcomes) / max(o["wall_s"] for o in outcomes)
        metrics = (await status.request(http_request("GET", d.authority, "/metrics"))).decoded()
        status.close()
        replica_rounds = REPLICAS * rounds
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
            replicas=REPLICAS,
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
            evictions=_evictions_by_cause(metrics.decode()),
            events_per_replica_round=sum(o["events"] for o in outcomes) / replica_rounds,
            bytes_per_replica_round=sum(o["received_bytes"] for o in outcomes) / replica_rounds,
            round_period_s=period,
            daemon_cpu_per_round_ms=per_round * 1000,
        )
    finally:
        await _stop_workers(workers)


async def scenario_capacity(
    rounds: int,
    period: float,
    idle_window: float,
    budget: float,
    cpus: tuple[set[int] | None, set[int] | None],
    python: Sequence[str] = (sys.executable,),
    options: Sequence[str] = (),
) -> CapacityResult:
    """``cpus``: (the daemon's, the clients'); ``python`` runs the daemon (e.g. under
    cProfile) with more flags ``options``."""
    async with daemon(
        min_replicas=1,
        join_timeout_ms=LONG_TIMEOUT_MS,
        heartbeat_timeout_ms=5_000,
        cpus=cpus[0],
        python=python,
        options=options,
    ) as d:
        return await _capacity(d, rounds, period, idle_window, budget, cpus[1])


def capacity_report(c: CapacityResult) -> tuple[list[Row], dict[str, Any]]:
    p50 = statistics.median(c.latency_ms) if c.latency_ms else math.nan
    p99 = percentile(c.latency_ms, 99)
    first = statistics.median(c.first_answer_ms) if c.first_answer_ms else math.nan
    met = p99 <= GOAL_CAPACITY_P99_MS and c.incomplete_rounds == 0
    refusals = ", ".join(f"{n} x {code}" for code, n in sorted(c.refusals.items())) or "none"
    scenario = f"capacity {c.replicas}"
    beats = REPLICAS / worker.HEARTBEAT_S

    def ms(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f} ms"

    rows = [
        Row(scenario, f"last join -> all released, p99 of {len(c.latency_ms)} rounds", ms(p99),
            f"<= {GOAL_CAPACITY_P99_MS:g} ms", met),
        Row(scenario, "last join -> all released, p50", ms(p50)),
        Row(scenario, "last join -> first member released, p50", ms(first)),
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
        Row(scenario, "daemon CPU per replica per second, during rounds",
            f"{c.cpu_per_replica_us:.0f} us"),
        Row(scenario, f"client CPU ({WORKERS} processes, same machine)",
            f"{c.client_cpu:.2f} cores"),
        Row(scenario, f"heartbeat frames sent per second (goal of the load: {beats:.0f})",
            f"{c.heartbeats_per_s:.0f}"),
        Row(scenario, f"worst heartbeat gap at a client (every {worker.HEARTBEAT_S:g} s)",
            ms(c.heartbeat_max_gap_ms)),
        Row(scenario, "evictions during the run, by cause",
            ", ".join(f"{n} {cause}" for cause, n in sorted(c.evictions.items()) if n) or "none",
            "none", not any(c.evictions.values())),
        Row(scenario, "per replica per round: WebSocket events; bytes received",
            f"{c.events_per_replica_round:.2f}; {c.bytes_per_replica_round / 1000:.1f} kB"),
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
        "lighthouse_cpu_per_replica_us": round(c.cpu_per_replica_us, 1),
    }
    return rows, metrics
