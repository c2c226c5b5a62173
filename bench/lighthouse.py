"""Lighthouse benchmark: quorum latency, death detection and capacity of the real daemon.

    python bench/lighthouse.py [--quick] [--json PATH] [--only SCENARIO] [--no-pin]
                               [--profile-daemon PATH]

The daemon runs as its own process (``python -m lighthouse.cli``) on a free
loopback port; simulated replicas talk to it over loopback.  Three scenarios,
one module each:

1. quorum latency (bench/_lighthouse_latency.py) -- N replicas (2, 16, 256;
   the full run adds 1000) join round after round; the latency is from the
   last member's join to every member holding its answer.  The full run
   repeats this against torchft's lighthouse when a separate venv has torchft
   (``python3 -m venv /tmp/torchft-venv``, then ``pip install torch==2.13.0``
   and ``pip install torchft==0.2.0`` there; see --torchft-python), driven by
   bench/_torchft_driver.py under that venv's Python.
2. death detection (bench/_lighthouse_death.py) -- a replica process with a
   liveness link is SIGKILLed while two survivors wait in a join.
3. capacity (bench/_lighthouse_capacity.py, clients in
   bench/_capacity_worker.py) -- 1000 replicas keep liveness while a round of
   all 1000 runs every second; also the daemon's CPU per replica per second.

The simulated replicas use a lean HTTP/WebSocket client
(bench/_lean_client.py, whose docstring says why); the daemon and every child
are started and stopped by PID through bench/_lighthouse_daemon.py.

On a shared machine the latencies include time the daemon spent waiting for a
CPU that other processes held; /proc/PID/schedstat gives both its time on a
CPU and that wait, and both are printed, so a slow daemon and a busy machine
can be told apart.  Times are ``time.monotonic`` (CLOCK_MONOTONIC), the same
clock in every process, so replica processes can report when answers arrived.
"""

from __future__ import annotations

import asyncio
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from bench._lighthouse_capacity import capacity_report, scenario_capacity  # noqa: E402
from bench._lighthouse_daemon import cpus, loadavg  # noqa: E402
from bench._lighthouse_death import death_report, scenario_death  # noqa: E402
from bench._lighthouse_latency import (  # noqa: E402
    latency_report,
    scenario_latency,
    scenario_torchft,
    torchft_python,
    torchft_report,
)

Report = tuple[list[Row], dict[str, Any]]


async def run(args: Any) -> list[Report]:
    """The scenarios asked for, in order, each with its own daemon."""
    wanted = set(args.only or ("latency", "death", "capacity"))
    quick: bool = args.quick
    options = ["--event-loop", "uvloop"] if args.event_loop == "uvloop" else []
    reports: list[Report] = []
    if "latency" in wanted:
        sizes = [(2, 50), (16, 30), (256, 10)]
        if not quick:  # and 1000, for the capacity scenario's cost without heartbeats
            sizes = [(2, 200), (16, 100), (256, 30), (1000, 10)]
        latency = await scenario_latency(sizes, options)
        reports.append(latency_report(latency))
        # torchft's client turns every answer into Python objects under the GIL, so at
        # N=1000 it would measure the client; and --quick has no time for a second daemon.
        python = None if quick else torchft_python(args.torchft_python)
        torchft_sizes = [(n, rounds) for n, rounds in sizes if n <= 256]
        theirs = await scenario_torchft(python, torchft_sizes) if python is not None else None
        reports.append(torchft_report(latency, theirs, "--quick" if quick else "no torchft"))
    if "death" in wanted:
        reports.append(death_report(await scenario_death(3 if quick else 7, frozen=not quick)))
    if "capacity" in wanted:
        # A time budget keeps an overloaded run (a busy shared machine) bounded.
        rounds, idle_window, budget = (8, 0.5, 12.0) if quick else (30, 2.0, 90.0)
        runs_daemon = [sys.executable]
        if args.profile_daemon is not None:
            runs_daemon += ["-m", "cProfile", "-o", str(args.profile_daemon)]
        pinning = cpus() if not args.no_pin else (None, None)
        capacity = await scenario_capacity(
            rounds, 1.0, idle_window, budget, pinning, runs_daemon, options
        )
        reports.append(capacity_report(capacity))
    return reports


def main() -> None:
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
    cli.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the daemon's event loop (lighthouse --event-loop), for a side-by-side",
    )
    cli.add_argument(
        "--profile-daemon",
        type=Path,
        metavar="PATH",
        help="capacity: run the daemon under cProfile, write its stats here and print the top",
    )
    args = cli.parse_args()
    began = time.monotonic()
    load_before = loadavg()
    reports = asyncio.run(run(args))

    rows = [row for report_rows, _ in reports for row in report_rows]
    metrics: dict[str, Any] = {
        k: v for _, report_metrics in reports for k, v in report_metrics.items()
    }
    print_table(rows)
    daemon_cpus, client_cpus = cpus() if not args.no_pin else (None, None)
    pinning = (
        f"capacity: daemon pinned to CPU {sorted(daemon_cpus)}, replicas to {sorted(client_cpus)};"
        " latency and death: not pinned"
        if daemon_cpus is not None and client_cpus is not None
        else "nothing pinned"
    )
    print(
        f"\n{os.cpu_count()} CPUs; {pinning}; load average {load_before} before,"
        f" {loadavg()} after; {time.monotonic() - began:.0f} s{' (--quick)' if args.quick else ''}"
    )
    if any(key.startswith("torchft_") for key in metrics):
        print(
            "torchft: timed through its own client (Rust gRPC, a thread per replica, answers"
            " turned into Python objects); its early joins get a fixed settle time, not a poll"
        )
    if args.profile_daemon is not None and args.profile_daemon.exists():
        print(f"\nthe daemon under the capacity load (cProfile, {args.profile_daemon}):")
        pstats.Stats(str(args.profile_daemon)).sort_stats("tottime").print_stats(25)
    metrics["load_average_before"] = load_before
    metrics["quick"] = args.quick
    write_json(args.json, metrics)


if __name__ == "__main__":
    main()
