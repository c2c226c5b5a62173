"""Operating a job from the lighthouse: checkpoint every group, tell finished groups from dead ones.

The dashboard's "checkpoint every group" button and ``ftdiloco checkpoint``
go through ``POST /v1/checkpoint`` on the lighthouse, which forwards the
request (with the job's token) to the manager of every connected group.  A
group whose Manager closed cleanly is shown as finished; one whose process
died is an eviction.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from aiohttp import web

from ftwire import guard, protocol
from ftwire.messages import Member
from lighthouse.client import AsyncLighthouseClient, Unauthorized
from tests.lighthouse_support import Lighthouses, eventually
from tests.procs import Proc, process_pool

TOKEN = "s3cret"


async def fake_manager(step: int) -> tuple[web.AppRunner, str, list[str]]:
    """A group's manager as far as checkpoints go: 202 with its step, behind the token."""
    asked: list[str] = []

    async def checkpoint(request: web.Request) -> web.Response:
        guard.authorize(request, TOKEN)
        asked.append(request.headers[protocol.TOKEN_HEADER])
        body = protocol.pack({"ok": True, "step": step})
        return web.Response(status=202, body=body, content_type=protocol.CONTENT_TYPE)

    app = web.Application()
    app.router.add_post("/v1/checkpoint", checkpoint)
    guard.install(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", asked


async def test_checkpoint_reaches_every_connected_group_through_the_lighthouse(
    lighthouses: Lighthouses,
) -> None:
    server = await lighthouses.start(min_replicas=1, token=TOKEN)
    runner, address, asked = await fake_manager(step=7)
    try:
        async with AsyncLighthouseClient(server.url, TOKEN) as group:
            link = group.liveness("group0", lambda event: None, interval=0.1)
            await link.start()
            await group.join(Member("group0", address=address), timeout=5)
            async with AsyncLighthouseClient(server.url, TOKEN) as operator:
                answers = await operator.checkpoint_all()
            assert answers == {"group0": "checkpoint requested (at step 7)"}
            assert asked == [f"Bearer {TOKEN}"]  # the job's token, forwarded
            assert any(e["kind"] == "checkpoint" for e in server.status()["events"])
            # Without the token, nothing is forwarded.
            async with AsyncLighthouseClient(server.url) as stranger:
                with pytest.raises(Unauthorized):
                    await stranger.checkpoint_all()
            assert len(asked) == 1
    finally:
        await runner.cleanup()


async def test_a_group_that_closes_cleanly_is_finished_one_that_dies_is_evicted(
    lighthouses: Lighthouses,
) -> None:
    server = await lighthouses.start(min_replicas=1)
    async with AsyncLighthouseClient(server.url) as group:
        link = group.liveness("done", lambda event: None, interval=0.1)
        await link.start()
        await group.join(Member("done"), timeout=5)
        await link.stop()  # what Manager.close() does
    await eventually(lambda: any(r["finished"] for r in server.status()["replicas"]))
    [done] = [r for r in server.status()["replicas"] if r["replica_id"] == "done"]
    assert done["finished"] and not done["connected"]
    assert any(e["kind"] == "left" and e["replica_id"] == "done" for e in server.status()["events"])

    # A process holding a liveness link is SIGKILLed: no close frame, an eviction.
    script = (
        "import sys, time\n"
        "from lighthouse.client import LighthouseClient\n"
        "c = LighthouseClient(sys.argv[1])\n"
        "c.start_liveness('dies', lambda e: None, interval=0.1)\n"
        "print('READY', flush=True)\n"
        "time.sleep(3600)\n"
    )
    with process_pool() as procs:
        proc = Proc("dies", [sys.executable, "-c", script, server.url])
        procs.append(proc)
        await asyncio.to_thread(proc.wait_for, "READY", 30)
        proc.kill()
    await eventually(
        lambda: any(
            e["kind"] == "eviction" and e.get("replica_id") == "dies"
            for e in server.status()["events"]
        )
    )
    dies = [e for e in server.status()["events"] if e.get("replica_id") == "dies"]
    assert dies[-1]["cause"] == "connection_closed"
    assert not any(r["finished"] for r in server.status()["replicas"] if r["replica_id"] == "dies")
