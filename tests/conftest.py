"""Shared fixtures.  Fast unit tests need nothing; `integration` tests start real
processes on loopback (ended by PID in fixtures); `soak` tests are long fault
runs, deselected by default and run by `pytest -m soak` in CI's second stage."""

from collections.abc import Iterator

import pytest

from lighthouse.background import BackgroundLoop
from lighthouse.server import LighthouseServer, ServerConfig


@pytest.fixture(scope="module")
def lighthouse_url() -> Iterator[str]:
    """An in-process lighthouse for Managers created inside a test."""
    loop = BackgroundLoop("test-lighthouse")

    async def start() -> tuple[LighthouseServer, str]:
        server = LighthouseServer(ServerConfig(min_replicas=1, join_timeout=5.0))
        return server, await server.start()

    server, url = loop.run(start(), timeout=10)
    yield url
    loop.run(server.stop(), timeout=10)
    loop.close()
