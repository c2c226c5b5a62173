"""Heal transfer benchmark: how fast a replica that is behind copies a donor's state.

    python bench/heal.py [--quick] [--json PATH] [--parallel N] [--chunk-mb MB]

A donor process publishes ~1 GB of float32 tensors (--quick: ~256 MB) on a
StateServer; this process fetches them with ``fetch_state`` into preallocated
tensors, and checks every byte afterwards.  For scale, the same run moves the
same number of bytes over a plain TCP socket between the same two processes
(blocking sendall / recv_into: the loopback ceiling).  Reported:

- heal GB/s, median of three repeated heals of the same step;
- heal GB/s of the first heal after a publish (the donor has served no
  chunk of it yet);
- what a publish costs the donor when no heal follows, as the manager
  publishes every outer step: the publish() call's wall time, and the donor's
  CPU time over the publish and the second after it (work it left running in
  the background included);
- raw loopback GB/s, median of three, and heal / raw;
- CPU seconds per GB on each side, which the machine's other load disturbs
  less than wall-clock rates;
- the receiver's peak memory above its preallocated destination during a
  heal (VmHWM, reset through /proc/self/clear_refs before each heal).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from ftdiloco.transport import StateServer, fetch_state  # noqa: E402

GOAL_GBPS = 1.5
LAYERS = 16
REPEATS = 3
# Publishes with no heal, each followed by this long for background work.
PUBLISHES = 3
SETTLE_S = 1.0


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


def main() -> None:
    flags = parser(__doc__.split("\n")[0])
    flags.add_argument("--parallel", type=int, default=4, help="connections per heal")
    flags.add_argument("--chunk-mb", type=float, default=8, help="donor's chunk size")
    args = flags.parse_args()
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

        raw = [_raw_gbps(raw_port, into) for _ in range(REPEATS)]

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
        cpu_before = _cpu_seconds(os.getpid()), _cpu_seconds(donor_pid)
        heals = [_heal(address, 1, into, args.parallel) for _ in range(REPEATS)]
        receiver_cpu, donor_cpu = (
            (_cpu_seconds(pid) - before) / (REPEATS * gigabytes)
            for pid, before in zip((os.getpid(), donor_pid), cpu_before, strict=True)
        )

        for i, (name, tensor) in enumerate(into.items()):
            if not torch.equal(tensor, _values(i, tensor.numel())):
                raise AssertionError(f"healed tensor {name!r} differs from the donor's")
    finally:
        if donor.is_alive():
            os.kill(donor_pid, signal.SIGTERM)
        donor.join(10)

    heal_gbps = statistics.median(g for g, _ in heals)
    raw_gbps = statistics.median(raw)
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
        Row("heal", "heal / raw", f"{heal_gbps / raw_gbps:.2f}"),
        Row("heal", "receiver CPU s/GB", f"{receiver_cpu:.2f}"),
        Row("heal", "donor CPU s/GB", f"{donor_cpu:.2f}"),
        Row(
            "heal",
            "receiver peak extra MB",
            f"{peak:.0f}",
            f"~ parallel x chunk = {expected_mb:g}",
            peak <= 1.5 * expected_mb,
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
    print_table(rows)
    write_json(
        args.json,
        {
            "heal_gbps": round(heal_gbps, 3),
            "heal_after_publish_gbps": round(after_publish, 3),
            "raw_loopback_gbps": round(raw_gbps, 3),
            "heal_to_raw_ratio": round(heal_gbps / raw_gbps, 3),
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
        },
    )


if __name__ == "__main__":
    main()
