"""A replica that restarts and joins before any heartbeat of its new process.

The join itself evicts the old incarnation; that eviction must not answer the
new join with "evicted" (it would miss the quorum it completes, while the
other members got it and wait for it in their collective).
"""

from __future__ import annotations

import asyncio

from tests.lighthouse_support import join, quorum_of


async def test_a_join_from_a_new_incarnation_gets_the_quorum_it_completes(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, heartbeat_timeout=60.0)
    first = await asyncio.gather(
        join(session, server.url, "a", incarnation="a1", expected_groups=2),
        join(session, server.url, "b", incarnation="b1", expected_groups=2),
    )
    assert [quorum_of(f).replica_ids for f in first] == [("a", "b"), ("a", "b")]
    again = await asyncio.gather(
        join(session, server.url, "a", step=1, incarnation="a1"),
        join(session, server.url, "b", step=0, incarnation="b2"),
    )
    quorums = [quorum_of(a) for a in again]
    assert quorums[0] == quorums[1]
    assert [m.incarnation for m in quorums[0].members] == ["a1", "b2"]
