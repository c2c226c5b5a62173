"""One client process of the lighthouse bench's capacity scenario.

    python -m bench._capacity_worker URL FIRST COUNT TOTAL   # from the repository root

Simulates replicas FIRST .. FIRST+COUNT-1 of TOTAL, each with a liveness
WebSocket and a keep-alive HTTP connection for joins, through the lean client
(bench._lean_client says why not aiohttp's).  Each socket sends what the
project's client sends: a heartbeat frame with the replica's incarnation and
committed step every ``HEARTBEAT_S`` (the client's default interval).

stdout: ``{"ready": true}`` once connected, then one result line after the
rounds.  stdin: the plan (start time, period, rounds, budget, spread,
last_at) as one JSON line; the process stays alive, beating, until stdin
closes, so the bench can read the daemon's counters first.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from typing import Any

from bench._lean_client import HttpConnection, Reply, WsConnection, http_request
from bench._lighthouse_daemon import LONG_TIMEOUT_MS, check_round, heartbeat_state, member
from ftwire import protocol
from lighthouse.client import DEFAULT_HEARTBEAT_INTERVAL

HEARTBEAT_S = DEFAULT_HEARTBEAT_INTERVAL
# Heartbeats go out in this many slices per interval, so they are spread out as
# independent processes' would be rather than sent in one burst.
_SLICES = 10
# After the time budget for starting rounds, how long answers are still awaited.
GRACE_S = 5.0
# Connects in flight at once: a burst of 1000 overflows the daemon's listen backlog.
_CONNECTS = 32


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class _Heartbeats:
    """Every socket beats once per HEARTBEAT_S, a slice of them every HEARTBEAT_S / _SLICES."""

    def __init__(self, sockets: list[WsConnection]) -> None:
        self.sockets = sockets
        self.max_gap = 0.0
        self.sent = 0

    def reset(self) -> None:
        self.max_gap, self.sent = 0.0, 0

    async def run(self) -> None:
        tick = HEARTBEAT_S / _SLICES
        last = [time.monotonic()] * _SLICES
        began = time.monotonic()
        k = 0
        while True:
            now = time.monotonic()
            part = k % _SLICES
            self.max_gap = max(self.max_gap, now - last[part])
            last[part] = now
            for ws in self.sockets[part::_SLICES]:
                ws.beat()
            self.sent += len(self.sockets[part::_SLICES])
            k += 1
            await asyncio.sleep(max(0.0, began + k * tick - time.monotonic()))


async def main(url: str, first: int, count: int, total: int) -> None:
    authority = url.removeprefix("http://")
    host, port = authority.rsplit(":", 1)
    indices = range(first, first + count)
    gate = asyncio.Semaphore(_CONNECTS)
    beat = protocol.pack({"type": protocol.EVENT_HEARTBEAT, **heartbeat_state().encode()})

    async def connect(index: int) -> tuple[WsConnection, HttpConnection]:
        async with gate:
            ws = await WsConnection.open(host, int(port), member(index, total).replica_id, beat)
            return ws, await HttpConnection.open(host, int(port))

    pairs = await asyncio.gather(*(connect(i) for i in indices))
    sockets = [ws for ws, _ in pairs]
    conns = [conn for _, conn in pairs]

    def received_bytes() -> int:
        return sum(ws.received_bytes for ws in sockets) + sum(c.received_bytes for c in conns)

    heartbeats = _Heartbeats(sockets)
    beating = asyncio.create_task(heartbeats.run())
    _emit({"ready": True})

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    plan = json.loads(await stdin.readline())
    start, period, rounds = plan["start"], plan["period"], plan["rounds"]
    stop_at = start + plan["budget"]  # no round starts later; answers are awaited a bit more
    spread, last_at = plan["spread"], plan["last_at"]
    heartbeats.reset()
    cpu_before, wall_before = time.process_time(), time.monotonic()
    bytes_before = received_bytes()
    joins = [
        http_request(
            "POST",
            authority,
            "/v1/join",
            protocol.encode_join(member(i, total), LONG_TIMEOUT_MS / 1000),
        )
        for i in indices
    ]
    sent = [[0.0] * count for _ in range(rounds)]
    replies: list[list[Reply | None]] = [[None] * count for _ in range(rounds)]
    refusals: dict[str, int] = {}

    async def replica(slot: int) -> None:
        # Groups finish their inner steps at different times, and one finishes last.
        index = first + slot
        offset = last_at if index == total - 1 else spread * (index * 0.618034 % 1.0)
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
    _, late = await asyncio.wait(tasks, timeout=stop_at + GRACE_S - time.monotonic())
    for task in late:  # an answer that has not come by now is not coming in time
        task.cancel()
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
    received = received_bytes() - bytes_before
    summary = []
    for k in range(rounds):
        got = [r for r in replies[k] if r is not None and r.status == 200]
        try:
            check_round(got, total)
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
            "heartbeat_max_gap_ms": heartbeats.max_gap * 1000,
            "heartbeats_per_s": heartbeats.sent / wall,
            "events": sum(ws.events for ws in sockets),
            "received_bytes": received,
            "refusals": refusals,
        }
    )
    await stdin.read()
    beating.cancel()
    for ws in sockets:
        ws.close()
    for conn in conns:
        conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
