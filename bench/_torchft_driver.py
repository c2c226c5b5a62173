"""torchft's side of the lighthouse bench's side-by-side, run by the torchft venv's Python.

    python bench/_torchft_driver.py serve
        a torchft LighthouseServer on a free loopback port; prints its address,
        then serves until stdin closes
    python bench/_torchft_driver.py rounds ADDRESS N ROUNDS SETTLE_S
        scenario 1 against it; prints one JSON list of latencies in ms

That venv has neither msgpack nor this project, so this file imports only the
standard library and torchft.  Threads stand in for replicas: torchft's
client blocks in Rust with the GIL released.  With no /status to poll, the
N-1 early joins of a round get a fixed settle time before the last one.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import timedelta
from typing import Any


def _member(index: int) -> dict[str, Any]:
    """The same replica description as the bench's own (bench._lighthouse_daemon.member)."""
    host = f"10.{index // 250 % 250}.{index % 250}.1"
    return {
        "replica_id": f"replica-{index:04d}",
        "address": f"http://{host}:29512",
        "store_address": f"{host}:29500",
        "step": 100,
        "world_size": 8,
    }


def serve() -> None:
    from torchft._torchft import LighthouseServer  # type: ignore[import-not-found]

    server = LighthouseServer(
        bind="127.0.0.1:0",
        min_replicas=1,
        join_timeout_ms=120_000,
        quorum_tick_ms=100,
        heartbeat_timeout_ms=120_000,
    )
    print(server.address(), flush=True)
    sys.stdin.read()


def rounds(address: str, n: int, count: int, settle: float) -> None:
    from torchft._torchft import LighthouseClient

    clients = [LighthouseClient(address, timedelta(seconds=10)) for _ in range(n)]
    members = [_member(i) for i in range(n)]
    for client, m in zip(clients, members, strict=True):
        client.heartbeat(m["replica_id"])
    sent, received, sizes = [0.0] * n, [0.0] * n, [0] * n

    def join(i: int, go: threading.Event) -> None:
        go.wait()
        sent[i] = time.monotonic()
        quorum = clients[i].quorum(timeout=timedelta(seconds=120), **members[i])
        received[i] = time.monotonic()
        sizes[i] = len(quorum.participants)

    def one_round(settled: bool) -> float:
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

    one_round(settled=False)  # the first round forms by the ordinary rules
    print(json.dumps([one_round(settled=True) for _ in range(count)]), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        rounds(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
