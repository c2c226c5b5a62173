"""Heal benchmark: how fast a replica that is behind copies a donor's state, and restarts.

    python bench/heal.py [--quick] [--json PATH] [--parallel N] [--chunk-mb MB]
                         [--part all|transfer|restart]

Transfer.  A donor process publishes ~1 GB of float32 tensors (--quick:
~256 MB) on a StateServer; this process fetches them with ``fetch_state``
into preallocated tensors, and checks every byte afterwards.  For scale, the
same run moves the same number of bytes over a plain TCP socket between the
same two processes (blocking sendall / recv_into: the loopback ceiling).
Reported:

- heal GB/s, median of three repeated heals of the same step;
- heal GB/s of the first heal after a publish (the donor has served no
  chunk of it yet);
- what a publish costs the donor when no heal follows, as the manager
  publishes every outer step: the publish() call's wall time, and the donor's
  CPU time over the publish and the second after it (work it left running in
  the background included);
- raw loopback GB/s, median of three, each just before a repeated heal (the
  load is then alike), and heal / raw (goal: >= 0.65);
- CPU seconds per GB on each side, which the machine's other load disturbs
  less than wall-clock rates;
- the receiver's peak memory above its preallocated destination during a
  heal (VmHWM, reset through /proc/self/clear_refs before each heal): it
  reads into the destination, so at most what ``parallel`` chunk buffers
  would take.

Restart, with real processes.  A lighthouse and three replica groups
(bench/_heal_worker.py: DiLoCo on a 4.2M-parameter MLP, an outer step every
10 inner steps, each inner step paced to at least 0.1 s: about one outer step
a second) train on this machine.  Repeatedly, a group is SIGKILLed between
syncs (a random 20-80 % of the shortest recent outer period after one of its
commits; whether a survivor was inside an outer step at the kill is checked
afterwards) and at once restarted under the same REPLICA_GROUP_ID (--quick:
2 restarts, else 5, plus 3 for the comparison below).  Goal: the restarted
group commits jointly with the others within the interpreter + import time
plus one outer period, wasting no inner step.  Reported:

- restart -> first joint commit: from just before the Popen to the restarted
  group's first committed outer step (its own record's time.time(); same
  clock), median and max, split into the worker's interpreter + imports, the
  model, the optimizers (the first one makes torch import torch._dynamo), the
  Manager, training until its first start_quorum, that quorum (waiting for
  the others, then the heal) and the allreduce + commit;
- the goal it is held to: a fresh interpreter doing the worker's imports
  (Popen to the child's clock after them; the median of one run before the
  first restart and one before each, while the groups train) plus the outer
  period (median gap between consecutive full-participation commits before
  each kill); and, since no torch training script avoids it, the same with
  the first optimizer made; and per restart, what it took after its own
  imports (and optimizers), against the period;
- inner steps wasted: those the restarted group ran before the start_quorum
  that healed it; the heal overwrites them.  DiLoCo joins the next outer step
  on entering, before any inner step; for comparison (not in --quick), the
  same restarts with that turned off (BENCH_CATCH_UP=0), where the group
  first joins after sync_every inner steps;
- that the first commit healed, had every group in it, and left the restarted
  group with the survivors' global weights and outer state (checksums);
- the survivors: their time inside an outer step, steady and at the rejoin
  (which waits for the heal), and any outer step they rolled back;
- the load average, since the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from bench._heal_worker import FIRST_OPTIMIZER, IMPORTS  # noqa: E402
from ftdiloco.state.heal import StateServer, fetch_state  # noqa: E402
from tests.procs import Proc, free_port, start_lighthouse  # noqa: E402

GOAL_GBPS = 1.5
# Issue 17: a heal within this fraction of what a bare socket moves in the same run.
GOAL_RATIO_TO_RAW = 0.65
LAYERS = 16
REPEATS = 3
# Publishes with no heal, each followed by this long for background work.
PUBLISHES = 3
SETTLE_S = 1.0

# As a module, so bench/lighthouse.py does not shadow the lighthouse package.
WORKER = "bench._heal_worker"
RESTART_GROUPS = 3
SYNC_EVERY = 10
INNER_S = 0.1  # minimum seconds per inner step: an outer period of about 1 s
WARM_STEPS = 3  # full-participation commits of every group before measuring
SETTLE_STEPS = 2  # ... of a restarted group before the next kill
PERIOD_WINDOW = 5  # steady steps the outer period is the median over
POLL_S = 0.02
STARTUP_TIMEOUT_S = 180.0
EPISODE_TIMEOUT_S = 120.0


def _state(total_bytes: int) -> Iterator[tuple[str, int]]:
    """Names and element counts: one small tensor, then equal float32 layers."""
    yield "embedding.bias", 4096
    for i in range(LAYERS):
        yield f"layers.{i}.weight", total_bytes // 4 // LAYERS


def _values(index: int, numel: int) -> torch.Tensor:
    return torch.rand(numel, generator=torch.Generator().manual_seed(index))


def _memory(tensors: Mapping[str, torch.Tensor]) -> Iterator[memoryview]:
    for tensor in tensors.values():
        yield tensor.view(torch.uint8).numpy().data


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- donor process -------------------------------------------------------------------


def _send_raw(listener: socket.socket, tensors: Mapping[str, torch.Tensor]) -> None:
    """Per connection, send every tensor's bytes with sendall."""
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for view in _memory(tensors):
                connection.sendall(view)


def _donor(
    total_bytes: int, chunk_bytes: int, control: multiprocessing.connection.Connection
) -> None:
    tensors = {name: _values(i, numel) for i, (name, numel) in enumerate(_state(total_bytes))}
    server = StateServer(chunk_bytes=chunk_bytes)

    def publish_on_request() -> None:
        # Like a training thread publishing after each commit; answers with
        # the publish() call's wall time.
        while True:
            step = control.recv()
            began = time.perf_counter()
            server.publish(step, tensors)
            control.send(time.perf_counter() - began)

    async def serve() -> None:
        app = web.Application()
        server.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=_send_raw, args=(listener, tensors), daemon=True).start()
        threading.Thread(target=publish_on_request, daemon=True).start()
        control.send((runner.addresses[0][1], listener.getsockname()[1]))
        await asyncio.Event().wait()

    asyncio.run(serve())


# -- receiver ------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _raw_gbps(port: int, into: Mapping[str, torch.Tensor]) -> float:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        began = time.perf_counter()
        total = 0
        for view in _memory(into):
            received = 0
            while received < len(view):
                n = connection.recv_into(view[received:])
                if n == 0:
                    raise ConnectionError("raw sender closed early")
                received += n
            total += received
        return total / (time.perf_counter() - began) / 1e9


def _heal(
    address: str, step: int, into: Mapping[str, torch.Tensor], parallel: int
) -> tuple[float, float]:
    """(GB/s, peak MB above the resident set before the heal)."""
    Path("/proc/self/clear_refs").write_text("5")
    before_kb = _status_kb("VmRSS")
    began = time.perf_counter()
    asyncio.run(fetch_state(address, step, into, parallel=parallel, timeout=600))
    seconds = time.perf_counter() - began
    peak_mb = (_status_kb("VmHWM") - before_kb) / 1024
    total = sum(t.numel() * t.element_size() for t in into.values())
    return total / seconds / 1e9, peak_mb


def transfer_report(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    total_bytes = (256 if args.quick else 1024) << 20
    chunk_bytes = int(args.chunk_mb * (1 << 20))
    load = os.getloadavg()[0]

    context = multiprocessing.get_context("spawn")
    control, donor_end = context.Pipe()
    donor = context.Process(target=_donor, args=(total_bytes, chunk_bytes, donor_end))
    donor.start()
    assert donor.pid is not None
    donor_pid = donor.pid
    try:
        if not control.poll(120):
            raise RuntimeError("donor did not start within 120 s")
        http_port, raw_port = control.recv()
        address = f"127.0.0.1:{http_port}"
        into = {name: torch.empty(numel).fill_(0) for name, numel in _state(total_bytes)}
        gigabytes = sum(t.numel() * 4 for t in into.values()) / 1e9

        publish_s, publish_cpu = [], []
        for step in range(10, 10 + PUBLISHES):
            cpu = _cpu_seconds(donor_pid)
            control.send(step)
            publish_s.append(control.recv())
            time.sleep(SETTLE_S)
            publish_cpu.append(_cpu_seconds(donor_pid) - cpu)

        control.send(1)
        control.recv()
        after_publish, first_peak = _heal(address, 1, into, args.parallel)
        # Raw transfers and heals alternate, so that on a shared machine both
        # see the same load; each heal starts from zeros (raw ones write the
        # same bytes), so the check below is of a heal's work.
        raw, heals, cpu_seconds = [], [], [0.0, 0.0]
        for _ in range(REPEATS):
            raw.append(_raw_gbps(raw_port, into))
            for tensor in into.values():
                tensor.zero_()
            pids = (os.getpid(), donor_pid)
            before = [_cpu_seconds(pid) for pid in pids]
            heals.append(_heal(address, 1, into, args.parallel))
            for side, (pid, start) in enumerate(zip(pids, before, strict=True)):
                cpu_seconds[side] += _cpu_seconds(pid) - start
        receiver_cpu, donor_cpu = (seconds / (REPEATS * gigabytes) for seconds in cpu_seconds)

        for i, (name, tensor) in enumerate(into.items()):
            if not torch.equal(tensor, _values(i, tensor.numel())):
                raise AssertionError(f"healed tensor {name!r} differs from the donor's")
    finally:
        if donor.is_alive():
            os.kill(donor_pid, signal.SIGTERM)
        donor.join(10)

    heal_gbps = statistics.median(g for g, _ in heals)
    raw_gbps = statistics.median(raw)
    ratio = heal_gbps / raw_gbps
    peak = max(first_peak, *(p for _, p in heals))
    expected_mb = args.parallel * chunk_bytes / (1 << 20)
    runs = ", ".join(f"{g:.2f}" for g, _ in heals)
    rows = [
        Row("setup", "state", f"{gigabytes:.2f} GB float32 in {len(into)} tensors"),
        Row("setup", "machine", f"{os.cpu_count()} CPUs, load average {load:.1f} at start"),
        Row("loopback", "raw TCP GB/s (median)", f"{raw_gbps:.2f}", "ceiling"),
        Row(
            "heal",
            "GB/s, repeat heals (median)",
            f"{heal_gbps:.2f} ({runs})",
            f">= {GOAL_GBPS}",
            heal_gbps >= GOAL_GBPS,
        ),
        Row("heal", "GB/s, first heal after publish", f"{after_publish:.2f}"),
        Row(
            "heal",
            "heal / raw",
            f"{ratio:.2f}",
            f">= {GOAL_RATIO_TO_RAW}",
            ratio >= GOAL_RATIO_TO_RAW,
        ),
        Row("heal", "receiver CPU s/GB", f"{receiver_cpu:.2f}"),
        Row("heal", "donor CPU s/GB", f"{donor_cpu:.2f}"),
        Row(
            "heal",
            "receiver peak extra MB",
            f"{peak:.0f}",
            f"<= parallel x chunk = {expected_mb:g}",
            peak <= expected_mb,
        ),
    ]
    rows += [
        Row("publish", "publish() wall ms (max)", f"{max(publish_s) * 1e3:.2f}"),
        Row(
            "publish",
            f"donor CPU ms per publish, no heal (max, {SETTLE_S:g} s window)",
            f"{max(publish_cpu) * 1e3:.0f}",
        ),
    ]
    return rows, {
        "heal_gbps": round(heal_gbps, 3),
        "heal_after_publish_gbps": round(after_publish, 3),
        "raw_loopback_gbps": round(raw_gbps, 3),
        "heal_to_raw_ratio": round(ratio, 3),
        "heal_ratio_to_raw": round(ratio, 3),
        "heal_peak_extra_mb": round(peak, 1),
        "receiver_cpu_s_per_gb": round(receiver_cpu, 3),
        "donor_cpu_s_per_gb": round(donor_cpu, 3),
        "publish_wall_ms": round(max(publish_s) * 1e3, 3),
        "publish_donor_cpu_ms": round(max(publish_cpu) * 1e3, 1),
        "state_gb": round(gigabytes, 3),
        "chunk_mb": args.chunk_mb,
        "parallel": args.parallel,
        "cpus": os.cpu_count(),
        "load_average": round(load, 2),
    }


# -- restart: a killed group back to committing with its peers ----------------------


class _Records:
    """A worker's JSONL records, read incrementally (only whole lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0

    def refresh(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            self.records += [json.loads(line) for line in data[:end].splitlines()]
        return self.records

    def syncs(self) -> list[dict[str, Any]]:
        return [r for r in self.refresh() if r["event"] == "sync"]


def _wait_until(
    what: str,
    found: Callable[[], dict[str, Any] | None],
    children: Sequence[Proc],
    timeout: float,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = found()
        if record is not None:
            return record
        for child in children:
            if not child.alive:
                raise RuntimeError(
                    f"{child.name} exited ({child.popen.poll()}) while waiting for {what}:\n"
                    + child.tail(30)
                )
        if time.monotonic() > deadline:
            tails = "\n".join(f"-- {c.name}:\n{c.tail()}" for c in children)
            raise TimeoutError(f"no {what} within {timeout:g} s\n{tails}")
        time.sleep(POLL_S)


def _full_commit_after(
    log: _Records, groups: int, after: float, nth: int = 1
) -> Callable[[], dict[str, Any] | None]:
    """Finds the nth committed outer step with every group taking part, after ``after``."""

    def found() -> dict[str, Any] | None:
        hits = [
            r
            for r in log.syncs()
            if r["committed"] and r["participants"] == groups and r["time"] > after
        ]
        return hits[nth - 1] if len(hits) >= nth else None

    return found


def _period(log: _Records, groups: int, before: float) -> tuple[float, float, float]:
    """(outer period, its minimum, seconds inside one outer step) over the last steady steps.

    Steady: consecutive steps, both committed with every group taking part.
    The period and the seconds inside are medians.
    """
    full = {
        r["step"]: r
        for r in log.syncs()
        if r["committed"] and r["participants"] == groups and r["time"] < before
    }
    gaps = [full[s]["time"] - full[s - 1]["time"] for s in sorted(full) if s - 1 in full]
    inside = [full[s]["seconds"] for s in sorted(full)]
    if not gaps:
        raise RuntimeError(f"no two consecutive full steps in {log.path} before the kill")
    return (
        statistics.median(gaps[-PERIOD_WINDOW:]),
        min(gaps[-PERIOD_WINDOW:]),
        statistics.median(inside[-PERIOD_WINDOW:]),
    )


def _inside_outer_step(log: _Records, at: float) -> bool:
    """Whether the group was between a start_quorum call and that outer step's report at ``at``."""
    records = log.refresh()
    calls = [r["called"] for r in records if r["event"] == "quorum" and r["called"] <= at]
    if not calls:
        return False
    done = [r["time"] for r in records if r["event"] == "sync" and r["time"] >= max(calls)]
    return not done or min(done) > at


def _fresh_interpreter() -> tuple[float, float, float]:
    """A fresh interpreter's seconds to start; to do the worker's imports; then its optimizer.

    The last two from before the Popen to the child's time.time() after each.
    """
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], cwd=ROOT, check=True)
    bare = time.perf_counter() - began
    code = f"import time; {IMPORTS}; print(time.time()); {FIRST_OPTIMIZER}; print(time.time())"
    popen = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    )
    imported, optimized = (float(t) - popen for t in done.stdout.split())
    return bare, imported, optimized


class _Run:
    """A lighthouse and RESTART_GROUPS groups, started (and ended) by this object."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[Proc] = []  # every process ever started, for close()
        self.groups: dict[int, Proc] = {}
        self.logs: dict[int, _Records] = {}
        self.incarnations = 0
        _, self.url = start_lighthouse(self.children, "--min-replicas", "2")

    def start_group(self, group: int, catch_up: bool = True) -> float:
        """(Re)start a group under its REPLICA_GROUP_ID; returns the time just before Popen."""
        self.incarnations += 1
        log = self.directory / f"group{group}-{self.incarnations}.jsonl"
        env = {
            "FTDILOCO_LIGHTHOUSE": self.url,
            "REPLICA_GROUP_ID": str(group),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "FTDILOCO_HOST": "127.0.0.1",
            "FTDILOCO_TIMEOUT": "30",
            "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
            "BENCH_LOG": str(log),
            "BENCH_SYNC_EVERY": str(SYNC_EVERY),
            "BENCH_INNER_S": str(INNER_S),
            "BENCH_CATCH_UP": "1" if catch_up else "0",
        }
        self.logs[group] = _Records(log)
        popen = time.time()
        self.groups[group] = Proc(f"group{group}", [sys.executable, "-m", WORKER], env)
        self.children.append(self.groups[group])
        return popen

    def close(self) -> None:
        for child in self.children:
            child.kill()


def _restart_episode(
    run: _Run, victim: int, catch_up: bool, phase: float, timeout: float
) -> dict[str, Any]:
    """Kill ``victim`` between syncs, restart it at once, follow it to its first joint commit."""
    n = RESTART_GROUPS
    survivors = sorted(g for g in run.groups if g != victim)
    survivor = survivors[0]
    alive = list(run.groups.values())
    # After one of the victim's commits, ``phase`` of the shortest recent outer
    # period: the machine's load makes periods vary, and the kill should fall
    # between syncs (checked below from the survivors' records).
    commit = _wait_until(
        f"a full commit of group{victim}",
        _full_commit_after(run.logs[victim], n, time.time()),
        alive,
        timeout,
    )
    period, shortest, inside = _period(run.logs[survivor], n, time.time())
    time.sleep(max(0.0, commit["time"] + phase * shortest - time.time()))
    load = os.getloadavg()[0]
    killed = time.time()
    run.groups[victim].kill()
    popen = run.start_group(victim, catch_up)
    log = run.logs[victim]
    first = _wait_until(
        f"the restarted group{victim}'s first commit",
        lambda: next((r for r in log.syncs() if r["committed"]), None),
        list(run.groups.values()),
        timeout,
    )
    records = log.refresh()
    start = next(r for r in records if r["event"] == "start")
    quorums = [r for r in records if r["event"] == "quorum"]
    healing = next((q for q in quorums if q["heal"]), None)
    first_quorum = healing or quorums[0]
    # The Manager's own log line for the heal (structlog JSON on the child's stderr).
    heal_s = 0.0
    for line in list(run.groups[victim].output):
        if line.startswith("{") and '"event": "healed"' in line:
            heal_s = float(json.loads(line)["seconds"])
            break
    # Settle before the next kill, so its period is measured on steady steps.
    settled = _wait_until(
        f"group{victim} settling",
        _full_commit_after(log, n, first["time"], SETTLE_STEPS),
        list(run.groups.values()),
        timeout,
    )
    survivor_syncs = [r for r in run.logs[survivor].syncs() if killed < r["time"]]
    at_rejoin = next(r for r in survivor_syncs if r["step"] == first["step"])
    rolled_back = [
        (g, r["step"], round(r["time"] - killed, 3))
        for g in survivors
        for r in run.logs[g].syncs()
        if killed < r["time"] <= settled["time"] + 1e-3 and not r["committed"]
    ]
    return {
        "victim": victim,
        "catch_up": catch_up,
        "kill_phase": round(phase, 3),
        "load_average": round(load, 2),
        "outer_period_s": round(period, 4),
        "survivor_step_s": round(inside, 4),
        "restart_to_commit_s": round(first["time"] - popen, 4),
        # From the Popen: the interpreter and the worker's imports.
        "imports_s": round(start["imported"] - popen, 4),
        "model_s": round(start["model"] - start["imported"], 4),
        # torch imports torch._dynamo when the first optimizer is made.
        "optimizers_s": round(start["optimizers"] - start["model"], 4),
        # Servers, the lighthouse connection.
        "manager_s": round(start["ready"] - start["optimizers"], 4),
        # Training until the first start_quorum: the inner steps before joining.
        "before_quorum_s": round(first_quorum["called"] - start["ready"], 4),
        # Waiting for the others to join, then the heal.
        "quorum_and_heal_s": round(first_quorum["returned"] - first_quorum["called"], 4),
        "heal_s": round(heal_s, 4),
        "allreduce_commit_s": round(first["time"] - first_quorum["returned"], 4),
        "wasted_inner_steps": healing["inner_steps"] if healing is not None else 0,
        "first_commit_step": first["step"],
        "first_commit_healed": first["healed"],
        "first_commit_participants": first["participants"],
        "matches_survivor": first["checksum"] == at_rejoin["checksum"],
        "survivor_rejoin_step_s": round(at_rejoin["seconds"], 4),
        # Whether a survivor was inside an outer step (quorum to report) at the kill.
        "killed_between_syncs": not any(_inside_outer_step(run.logs[g], killed) for g in survivors),
        # (group, step, seconds after the kill) of the survivors' rolled-back steps
        # from the kill until the restarted group has settled.
        "survivor_rolled_back": rolled_back,
        "params": start["params"],
    }


def restart_report(quick: bool) -> tuple[list[Row], dict[str, Any]]:
    modes = [True] * (2 if quick else 5) + [False] * (0 if quick else 3)
    load_start = os.getloadavg()
    phases = random.Random(0)
    episodes: list[dict[str, Any]] = []
    fresh: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as tmp:
        run = _Run(Path(tmp))
        try:
            for g in range(RESTART_GROUPS):
                run.start_group(g)
            for g in range(RESTART_GROUPS):
                _wait_until(
                    f"group{g} warming up",
                    _full_commit_after(run.logs[g], RESTART_GROUPS, 0.0, WARM_STEPS),
                    list(run.groups.values()),
                    STARTUP_TIMEOUT_S,
                )
            # Under the same load as the restarts, interleaved with them: the
            # machine's other load changes by the minute.
            fresh.append(_fresh_interpreter())
            for i, catch_up in enumerate(modes):
                fresh.append(_fresh_interpreter())
                victim = (i + 1) % RESTART_GROUPS
                phase = phases.uniform(0.2, 0.8)
                episodes.append(_restart_episode(run, victim, catch_up, phase, EPISODE_TIMEOUT_S))
        finally:
            run.close()
    load_end = os.getloadavg()

    import_runs = len(fresh)
    interpreter, imports, with_optimizer = zip(*fresh, strict=True)
    import_s = statistics.median(imports)
    import_optimizer_s = statistics.median(with_optimizer)
    period = statistics.median(e["outer_period_s"] for e in episodes)
    goal = import_s + period
    goal_optimizer = import_optimizer_s + period
    params = episodes[0]["params"]
    # Heals carry the global weights, the outer momentum and AdamW's two moments.
    state_mb = params * 4 * 4 / 1e6
    rows = [
        Row(
            "restart setup",
            "groups, model",
            f"{RESTART_GROUPS} groups + lighthouse, {params / 1e6:.1f}M params"
            f" ({state_mb:.0f} MB healed), sync_every {SYNC_EVERY}, >= {INNER_S:g} s/inner step",
        ),
        Row(
            "restart setup",
            "load average 1/5/15 min",
            "{:.1f}/{:.1f}/{:.1f} at start, {:.1f} at end".format(*load_start, load_end[0]),
        ),
        Row(
            "restart",
            f"fresh interpreter s: bare / + imports / + 1st optimizer (median of {import_runs})",
            f"{statistics.median(interpreter):.2f} / {import_s:.2f} / {import_optimizer_s:.2f}",
        ),
        Row(
            "restart",
            "outer period s (median, before the kills)",
            f"{period:.2f}",
            "~ 1",
        ),
    ]
    metrics: dict[str, Any] = {
        "import_s": round(import_s, 3),
        "import_optimizer_s": round(import_optimizer_s, 3),
        "interpreter_s": round(statistics.median(interpreter), 3),
        "outer_period_s": round(period, 3),
        "restart_goal_s": round(goal, 3),
        "restart_goal_with_optimizer_s": round(goal_optimizer, 3),
        "restart_groups": RESTART_GROUPS,
        "restart_sync_every": SYNC_EVERY,
        "restart_model_params": params,
        "restart_load_average": [round(x, 2) for x in load_start],
        "restart_load_average_end": round(load_end[0], 2),
        "restart_episodes": episodes,
    }
    for catch_up, label, prefix in (
        (True, "restart", ""),
        (False, "restart, no catch-up", "no_catch_up_"),
    ):
        mine = [e for e in episodes if e["catch_up"] == catch_up]
        if not mine:
            continue
        seconds = [e["restart_to_commit_s"] for e in mine]
        wasted = max(e["wasted_inner_steps"] for e in mine)
        median = statistics.median(seconds)
        parts = [
            *("imports_s", "model_s", "optimizers_s", "manager_s", "before_quorum_s"),
            *("quorum_and_heal_s", "allreduce_commit_s"),
        ]
        breakdown = " + ".join(f"{statistics.median(e[p] for e in mine):.2f}" for p in parts)
        heal_median = statistics.median(e["heal_s"] for e in mine)
        # The restart's own fixed costs, which load shifts the most, taken out.
        after_imports = [e["restart_to_commit_s"] - e["imports_s"] for e in mine]
        after_torch = [x - e["optimizers_s"] for x, e in zip(after_imports, mine, strict=True)]
        ok = sum(
            e["first_commit_healed"]
            and e["first_commit_participants"] == RESTART_GROUPS
            and e["matches_survivor"]
            for e in mine
        )
        held = not prefix  # the comparison is not held to the goals
        rows += [
            Row(
                label,
                f"restart -> first joint commit s (median / max of {len(mine)})",
                f"{median:.2f} / {max(seconds):.2f}",
                f"<= imports + period = {goal:.2f}" if held else "",
                median <= goal if held else None,
            ),
            Row(
                label,
                "  = imports + model + optimizers + Manager + before quorum"
                " + quorum/heal + commit (medians)",
                breakdown,
            ),
            Row(label, "  of the quorum/heal: the heal itself s (median)", f"{heal_median:.2f}"),
            Row(
                label,
                "  the same median, against the imports with the 1st optimizer",
                f"{median:.2f}",
                f"<= + period = {goal_optimizer:.2f}" if held else "",
                median <= goal_optimizer if held else None,
            ),
            Row(
                label,
                "  less its own imports: s after them (median / max)",
                f"{statistics.median(after_imports):.2f} / {max(after_imports):.2f}",
                f"<= period = {period:.2f}" if held else "",
                statistics.median(after_imports) <= period if held else None,
            ),
            Row(
                label,
                "  less its own imports and optimizers (torch): s (median / max)",
                f"{statistics.median(after_torch):.2f} / {max(after_torch):.2f}",
                f"<= period = {period:.2f}" if held else "",
                statistics.median(after_torch) <= period if held else None,
            ),
            Row(
                label,
                "inner steps wasted (max)",
                str(wasted),
                "0" if held else "",
                wasted == 0 if held else None,
            ),
            Row(
                label,
                "first commit healed, all groups, same state as survivors",
                f"{ok}/{len(mine)}",
                "all",
                ok == len(mine),
            ),
        ]
        metrics[f"{prefix}restart_to_commit_s"] = round(median, 3)
        metrics[f"{prefix}restart_to_commit_max_s"] = round(max(seconds), 3)
        metrics[f"{prefix}wasted_inner_steps"] = wasted
        metrics[f"{prefix}restart_after_imports_s"] = round(statistics.median(after_imports), 3)
        metrics[f"{prefix}restart_after_torch_s"] = round(statistics.median(after_torch), 3)
    steady = statistics.median(e["survivor_step_s"] for e in episodes)
    rejoin = statistics.median(e["survivor_rejoin_step_s"] for e in episodes)
    rolled_back = sum(len(e["survivor_rolled_back"]) for e in episodes)
    between = sum(e["killed_between_syncs"] for e in episodes)
    rows += [
        Row(
            "restart, survivors",
            "s inside an outer step: steady / at the rejoin (medians)",
            f"{steady:.2f} / {rejoin:.2f}",
        ),
        Row(
            "restart, survivors",
            "kills that fell between syncs (none inside a survivor's outer step)",
            f"{between}/{len(episodes)}",
        ),
        Row(
            "restart, survivors",
            "outer steps rolled back, from the kill until the restart settled",
            str(rolled_back),
            "0",
            rolled_back == 0,
        ),
    ]
    metrics["survivor_step_s"] = round(steady, 3)
    metrics["survivor_rejoin_step_s"] = round(rejoin, 3)
    metrics["survivor_rolled_back_steps"] = rolled_back
    metrics["kills_between_syncs"] = between
    return rows, metrics


def main() -> None:
    flags = parser(__doc__.split("\n")[0])
    flags.add_argument("--parallel", type=int, default=4, help="connections per heal")
    flags.add_argument("--chunk-mb", type=float, default=8, help="donor's chunk size")
    flags.add_argument(
        "--part", choices=("all", "transfer", "restart"), default="all", help="what to run"
    )
    args = flags.parse_args()
    rows: list[Row] = []
    metrics: dict[str, Any] = {}
    if args.part in ("all", "transfer"):
        part_rows, part_metrics = transfer_report(args)
        rows += part_rows
        metrics.update(part_metrics)
    if args.part in ("all", "restart"):
        part_rows, part_metrics = restart_report(args.quick)
        rows += part_rows
        metrics.update(part_metrics)
    print_table(rows)
    write_json(args.json, metrics)


if __name__ == "__main__":
    main()
