"""The lighthouse's Prometheus page, read with prometheus_client's own parser.

An operator's scraper sees the quorum size, joins refused by reason, joins that
timed out, and discarded steps, and no ``_created`` series.
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.lighthouse_support import join, quorum_of


async def scrape(session, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_quorum_size_refusals_and_timeouts_are_counted(lighthouses, session):
    server = await lighthouses.start(min_replicas=2, join_timeout=5.0, token="s3cret")
    before = await scrape(session, server.url)
    assert before[("lighthouse_quorum_size", ())] == 0
    assert before[("lighthouse_joins_timed_out_total", ())] == 0
    assert before[("lighthouse_joins_refused_total", (("reason", "unauthorized"),))] == 0
    assert before[("lighthouse_steps_discarded_total", ())] == 0

    formed = quorum_of(
        (
            await asyncio.gather(
                join(session, server.url, "a", token="s3cret", expected_groups=2),
                join(session, server.url, "b", token="s3cret", expected_groups=2),
            )
        )[0]
    )
    assert formed.replica_ids == ("a", "b")

    status, body = await join(session, server.url, "c", token="wrong")
    assert (status, body["error"]) == (401, "unauthorized")
    status, body = await join(session, server.url, "c", token=None)
    assert (status, body["error"]) == (401, "unauthorized")
    # Alone, with min_replicas 2 and the others not joining: no quorum in 0.1 s.
    status, body = await join(session, server.url, "a", timeout=0.1, token="s3cret")
    assert (status, body["error"]) == (504, "timeout")

    after = await scrape(session, server.url)
    assert after[("lighthouse_quorum_size", ())] == 2
    assert after[("lighthouse_joins_refused_total", (("reason", "unauthorized"),))] == 2
    assert after[("lighthouse_joins_refused_total", (("reason", "overloaded"),))] == 0
    assert after[("lighthouse_joins_timed_out_total", ())] == 1
    assert after[("lighthouse_join_requests_total", ())] == 5
    assert not [name for name, _ in after if name.endswith("_created")]


async def test_a_malformed_join_is_a_refusal_by_bad_request(lighthouses, session):
    server = await lighthouses.start()
    async with session.post(server.url + "/v1/join", data=b"\xc1 not msgpack") as response:
        assert response.status == 400
    samples = await scrape(session, server.url)
    assert samples[("lighthouse_joins_refused_total", (("reason", "bad_request"),))] == 1
    assert samples[("lighthouse_joins_timed_out_total", ())] == 0
