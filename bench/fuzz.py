"""Hostile-input campaign (issue 11, DESIGN I6) against a live lighthouse and one live group.

Starts, as separate processes: a lighthouse (``lighthouse.cli``, token set,
``--min-replicas 2``); one group's servers as a manager's rank 0 hosts them
(``--serve-group``: the group round, the heal routes with a published 200 KB
state, the rendezvous store; token set); two honest groups (``--honest``)
joining quorums in a loop, alone first (the baseline), then while the
campaign runs: many concurrent hostile requests across every endpoint --
random bytes, deep nesting, wrong types, oversized data, bogus
Content-Encoding, malformed round values and store ops, bursts of heal chunk
requests, and well-formed requests without the token or with a wrong one.

The lighthouse bodies of the campaign are malformed by construction: a
well-formed heartbeat from a made-up replica is, by the quorum rules, a live
replica the honest groups must wait for (a token holder can always do that).

Reported: requests, five_xx (500s and any 5xx that is not a documented
availability answer: 503 group_round_failed/not_ready, 504 timeout),
crashes (server processes that died), rss_growth_mb of each server
(after - before the campaign), honest_quorum_delay_ms (p99 of the honest
quorum round time under the campaign minus the baseline p99),
unauthenticated_successes (2xx to a request without the right token, the
store included).

    python bench/fuzz.py [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, percentile, print_table, write_json  # noqa: E402
from ftwire import guard, protocol  # noqa: E402
from ftwire.messages import Member  # noqa: E402
from tests.procs import Proc, process_pool, start_lighthouse, temporary_log  # noqa: E402

TOKEN = "bench-fuzz-token"
AVAILABILITY = {(503, "group_round_failed"), (504, "timeout"), (503, "not_ready")}


# -- the group's servers, in their own process ------------------------------------------


def serve_group() -> None:
    import torch
    from aiohttp import web

    from ftdiloco.coordination.group import GroupGather
    from ftdiloco.coordination.process_group import host_store
    from ftdiloco.state.heal import StateServer
    from ftwire import logs

    logs.configure("json")

    async def decide(values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {"ok": True}

    async def main() -> None:
        app = web.Application()
        state = StateServer(TOKEN)
        state.publish(1, {"w": torch.arange(50_000, dtype=torch.float32)})  # 200 KB
        state.add_routes(app)
        gather = GroupGather(2, {k: decide for k in ("quorum", "vote", "checkpoint", "resume")})
        gather.add_routes(app, lambda request: guard.request_token_ok(request, TOKEN))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        store = await asyncio.to_thread(host_store, "127.0.0.1", 0, 5.0, TOKEN)
        print(
            json.dumps(
                {"group": f"http://127.0.0.1:{runner.addresses[0][1]}", "store": store.address}
            ),
            flush=True,
        )
        await asyncio.Event().wait()

    asyncio.run(main())


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- hostile requests -------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def raw(message: Any) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


AUTH = guard.authorization(TOKEN)
Request = tuple[str, str, dict[str, str], bytes | None, bool]  # method, url, headers, body, authed


def hostile(rng: random.Random, lighthouse: str, group: str, store: str) -> Request:
    """One hostile request; ``authed`` says whether it carries the right token."""
    kind = rng.randrange(12)
    lh_path = rng.choice(["/v1/join", "/v1/heartbeat", "/v1/fence", "/v1/kill"])
    if kind == 0:
        return "POST", lighthouse + lh_path, AUTH, rng.randbytes(rng.randrange(200)), True
    if kind == 1:
        body = raw({"v": nested(rng.randrange(17, 1000)), "replica_id": "x"})
        return (
            "POST",
            rng.choice([lighthouse + lh_path, group + "/v1/group/round"]),
            AUTH,
            body,
            True,
        )
    if kind == 2:
        bad = rng.choice(
            [
                {"v": True, "replica_id": "x"},
                {"v": 1.0, "replica_id": "x"},
                {"v": 1, "replica_id": 7},
                {"v": 1, "replica_id": "x", "step": "7"},
                {"v": 1, "replica_id": "x" * 300},
                {"v": 1, "replica_id": "x", "data": {"d": nested(40)}},
                {"v": 1, "replica_id": "x", "data": {"b": b"\0" * 70_000}},
                {"v": 1, "replica_id": "x", "timeout_ms": -1},
            ]
        )
        # To /v1/join: a heartbeat reads only replica_id and liveness, so some
        # of these would be well-formed heartbeats of a made-up replica.
        return "POST", lighthouse + "/v1/join", AUTH, raw(bad), True
    if kind == 3:
        headers = {**AUTH, "Content-Encoding": rng.choice(["gzip", "deflate", "br", "x"])}
        url = rng.choice(
            [lighthouse + lh_path, group + "/v1/group/round", f"http://{store}/v1/store"]
        )
        return "POST", url, headers, rng.randbytes(64), True
    if kind == 4:
        value = rng.choice([{}, {"step": "x"}, {"ok": 1}, {"steps": [-1]}, {"save": "y"}])
        body = protocol.pack(
            {
                "kind": rng.choice(["quorum", "vote", "checkpoint", "resume", "nope"]),
                "round": rng.randrange(1 << 40),
                "rank": rng.randrange(3),
                "value": value,
                "timeout_ms": rng.randrange(1, 5),
            }
        )
        return "POST", group + "/v1/group/round", AUTH, body, True
    if kind == 5:
        index = rng.choice(["0", "0", "1", "-1", "99999", "x", "1" * 30])
        step = rng.choice(["1", "1", "2", "", "-1", "1e9", "\uff19"])
        return "GET", f"{group}/v1/heal/chunk/{index}?step={step}", AUTH, None, True
    if kind == 6:
        op: dict[str, Any] = rng.choice(
            [
                {"op": "set", "key": "k" * rng.randrange(2000), "value": b"v"},
                {"op": "get", "key": 5},
                {"op": "add", "key": "n", "amount": "1"},
                {"op": "wait", "keys": [1, 2], "timeout_ms": 1},
                {"op": "compare_set", "key": "k", "expected": "x", "desired": 3},
                {"op": "drop_all"},
                {"op": "set", "key": "k", "value": b"\0" * 70_000},
            ]
        )
        return "POST", f"http://{store}/v1/store", AUTH, protocol.pack(op), True
    # Well-formed requests without the token or with a wrong one.
    headers = rng.choice(
        [
            {},
            {"Authorization": "Bearer guess"},
            {"Authorization": TOKEN},
            {"Authorization": "Basic x"},
        ]
    )
    target = rng.randrange(5)
    if target == 0:
        return "POST", lighthouse + "/v1/heartbeat", headers, protocol.encode_heartbeat("h"), False
    if target == 1:
        body = protocol.pack(
            {"kind": "vote", "round": 1, "rank": 1, "timeout_ms": 1, "value": {"ok": True}}
        )
        return "POST", group + "/v1/group/round", headers, body, False
    if target == 2:
        return "GET", group + "/v1/heal/manifest?step=1", headers, None, False
    if target == 3:
        return "GET", group + "/v1/heal/chunk/0?step=1", headers, None, False
    body = protocol.pack({"op": rng.choice(["num_keys", "set"]), "key": "k", "value": b"v"})
    return "POST", f"http://{store}/v1/store", headers, body, False


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.five_xx = 0
        self.unauthenticated_successes = 0
        self.statuses: Counter[int] = Counter()
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []


async def campaign(
    session: aiohttp.ClientSession, urls: dict[str, str], total: int, workers: int, tally: Tally
) -> None:
    rng = random.Random(11)
    remaining = [total]

    async def worker(seed: int) -> None:
        wrng = random.Random(seed)
        while remaining[0] > 0:
            remaining[0] -= 1
            method, url, headers, body, authed = hostile(
                wrng, urls["lighthouse"], urls["group"], urls["store"]
            )
            try:
                async with session.request(
                    method, url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
                ) as response:
                    status, payload = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                tally.failures[type(e).__name__] += 1
                continue
            tally.requests += 1
            tally.statuses[status] += 1
            if status >= 500:
                code = protocol.decode_error(payload)[0]
                if (status, code) not in AVAILABILITY:
                    tally.five_xx += 1
                    if len(tally.examples) < 5:
                        tally.examples.append(f"{status} {url} {payload[:200]!r}")
            if not authed and 200 <= status < 300:
                tally.unauthenticated_successes += 1

    await asyncio.gather(*(worker(rng.randrange(1 << 30)) for _ in range(workers)))


def honest_groups(lighthouse: str, out: str) -> None:
    """Two honest groups join together, forever; writes each round's start and seconds.

    Their own process, so the campaign's client work does not delay them."""

    async def main() -> None:
        async with aiohttp.ClientSession() as session:

            async def join(rid: str) -> None:
                body = protocol.encode_join(Member(rid), 10.0)
                async with session.post(
                    lighthouse + "/v1/join", data=body, headers=AUTH
                ) as response:
                    assert response.status == 200, await response.read()

            with open(out, "w") as record:
                while True:
                    began, t0 = time.time(), time.perf_counter()
                    await asyncio.gather(join("honest-a"), join("honest-b"))
                    record.write(json.dumps([began, time.perf_counter() - t0]) + "\n")
                    record.flush()

    asyncio.run(main())


async def run(quick: bool) -> dict[str, Any]:
    total = 3_000 if quick else 100_000
    workers = 16 if quick else 32
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(TOKEN)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.unlink, f.name)
        procs = cleanup.enter_context(process_pool())
        # The daemon's warnings about hostile requests go to a file, not through our reader.
        lh, lighthouse = start_lighthouse(
            procs,
            "--token-file", f.name, "--min-replicas", "2", "--join-timeout-ms", "5000",
            "--log-format", "json",
            log=temporary_log("fuzz-lighthouse"),
        )  # fmt: skip
        grp = Proc(
            "group",
            [sys.executable, str(Path(__file__)), "--serve-group"],
            log=temporary_log("fuzz-group"),
        )
        procs.append(grp)
        addresses = json.loads(grp.wait_for("{", timeout=60))
        urls = {"lighthouse": lighthouse, **addresses}
        rounds_file = f.name + ".rounds"
        honest = Proc(
            "honest", [sys.executable, str(Path(__file__)), "--honest", lighthouse, rounds_file]
        )
        procs.append(honest)
        await asyncio.sleep(3 if quick else 10)  # the baseline rounds
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            before = {"lighthouse": rss_mb(lh.pid), "group": rss_mb(grp.pid)}
            tally = Tally()
            began, t0 = time.time(), time.perf_counter()
            await campaign(session, urls, total, workers, tally)
            seconds = time.perf_counter() - t0
            ended = time.time()
            after = {"lighthouse": rss_mb(lh.pid), "group": rss_mb(grp.pid)}
        crashes = sum(not p.alive for p in procs)
        honest.kill()
    with open(rounds_file) as record:
        rounds = [json.loads(line) for line in record.read().splitlines() if line]
    os.unlink(rounds_file)
    baseline = [t for start_s, t in rounds if start_s + t < began]
    under = [t for start_s, t in rounds if start_s < ended and start_s + t > began]
    delay = (percentile(under, 99) - percentile(baseline, 99)) * 1000
    return {
        "requests": tally.requests,
        "seconds": round(seconds, 1),
        "five_xx": tally.five_xx,
        "five_xx_examples": tally.examples,
        "crashes": crashes,
        "rss_growth_mb": {k: round(after[k] - before[k], 1) for k in after},
        "rss_mb": {k: round(after[k], 1) for k in after},
        "honest_quorum_delay_ms": round(delay, 2),
        "honest_rounds": {"baseline": len(baseline), "under_campaign": len(under)},
        "honest_p99_ms": {
            "baseline": round(percentile(baseline, 99) * 1000, 2),
            "under_campaign": round(percentile(under, 99) * 1000, 2),
        },
        "unauthenticated_successes": tally.unauthenticated_successes,
        "statuses": dict(sorted(tally.statuses.items())),
        "client_failures": dict(tally.failures),
    }


def main() -> None:
    if "--serve-group" in sys.argv:
        serve_group()
        return
    if "--honest" in sys.argv:
        at = sys.argv.index("--honest")
        honest_groups(sys.argv[at + 1], sys.argv[at + 2])
        return
    args = parser(__doc__.split("\n")[0]).parse_args()
    m = asyncio.run(run(args.quick))
    growth = max(m["rss_growth_mb"].values())
    rows = [
        Row("campaign", "requests", str(m["requests"]), "" if args.quick else ">= 100000",
            None if args.quick else m["requests"] >= 100_000),
        Row("campaign", "seconds", str(m["seconds"])),
        Row("campaign", "five_xx", str(m["five_xx"]), "0", m["five_xx"] == 0),
        Row("campaign", "crashes", str(m["crashes"]), "0", m["crashes"] == 0),
        Row("lighthouse", "rss_growth_mb", str(m["rss_growth_mb"]["lighthouse"]), "<= 20",
            m["rss_growth_mb"]["lighthouse"] <= 20),
        Row("group", "rss_growth_mb", str(m["rss_growth_mb"]["group"]), "<= 20",
            m["rss_growth_mb"]["group"] <= 20),
        Row("honest groups", "honest_quorum_delay_ms (p99 extra)", str(m["honest_quorum_delay_ms"]),
            "<= 10", m["honest_quorum_delay_ms"] <= 10),
        Row("token", "unauthenticated_successes", str(m["unauthenticated_successes"]), "0",
            m["unauthenticated_successes"] == 0),
    ]  # fmt: skip
    del growth
    print_table(rows)
    print(f"statuses: {m['statuses']}  client failures: {m['client_failures']}")
    for example in m["five_xx_examples"]:
        print("5xx:", example)
    write_json(args.json, m)


if __name__ == "__main__":
    main()
