"""Several lighthouse addresses never split a job between two serving lighthouses.

Two lighthouses serving one job would each form quorums for the groups that
reached them: a forked history by construction.  With ``--lease`` only the
holder of the lease serves; a standby answers 503 (clients move on to the
next address) and takes over when the holder dies.  A client given several
addresses refuses a lighthouse that serves without a lease.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from ftwire.messages import Member
from lighthouse.client import AsyncLighthouseClient, LighthouseError
from tests.lighthouse_support import Lighthouses, join
from tests.procs import process_pool, start_lighthouse


async def test_only_the_lease_holder_serves_and_groups_in_any_order_meet_there(
    lighthouses: Lighthouses, session, tmp_path: Path
) -> None:
    lease = str(tmp_path / "job.lease")
    first = await lighthouses.start(min_replicas=2, lease=lease, quorum_tick=0.05)
    second = await lighthouses.start(min_replicas=2, lease=lease, quorum_tick=0.05)
    assert (first.status()["role"], second.status()["role"]) == ("serving", "standby")
    status, answer = await join(session, second.url, "a", timeout=1.0)
    assert (status, answer["error"]) == (503, "standby")
    assert first.url in answer["message"]

    # The groups list the lighthouses in opposite orders: both end up on the holder.
    a = AsyncLighthouseClient([second.url, first.url], connect_timeout=1.0)
    b = AsyncLighthouseClient([first.url, second.url], connect_timeout=1.0)
    async with a, b:
        qa, qb = await asyncio.gather(a.join(Member("a"), 10.0), b.join(Member("b"), 10.0))
        assert qa == qb and qa.replica_ids == ("a", "b")

        # The holder goes; the standby takes the lease over and serves, with higher ids.
        await first.stop()
        qa2, qb2 = await asyncio.gather(
            a.join(Member("a", expected_groups=2), 10.0),
            b.join(Member("b", expected_groups=2), 10.0),
        )
        assert qa2 == qb2 and qa2.quorum_id > qa.quorum_id
        assert second.status()["role"] == "serving"


async def test_a_client_with_several_addresses_refuses_a_lighthouse_without_a_lease(
    lighthouses: Lighthouses,
) -> None:
    # Two lighthouses serving one job, no lease: the split that forks a history.
    one = await lighthouses.start(min_replicas=1)
    two = await lighthouses.start(min_replicas=1)
    a = AsyncLighthouseClient([one.url, two.url], connect_timeout=1.0)
    b = AsyncLighthouseClient([two.url, one.url], connect_timeout=1.0)
    async with a, b:
        for client, rid in ((a, "a"), (b, "b")):
            with pytest.raises(LighthouseError, match="--lease"):
                await client.join(Member(rid), 5.0)
    # One address is a plain single lighthouse, as before.
    async with AsyncLighthouseClient(one.url) as single:
        assert (await single.join(Member("c"), 5.0)).replica_ids == ("c",)


def status_of(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.mark.integration
def test_a_sigkilled_lease_holder_is_replaced_by_the_standby(tmp_path: Path) -> None:
    lease = str(tmp_path / "job.lease")
    with process_pool() as procs:
        holder, holder_url = start_lighthouse(procs, "--lease", lease)
        standby, standby_url = start_lighthouse(procs, "--lease", lease)
        assert status_of(holder_url)["role"] == "serving"
        assert status_of(standby_url)["role"] == "standby"
        holder.kill()  # the kernel drops a dead process's lock
        standby.wait_for("lease acquired: serving", timeout=10)
        assert status_of(standby_url)["role"] == "serving"
