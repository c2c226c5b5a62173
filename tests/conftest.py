"""Shared fixtures.  Fast unit tests need nothing; `integration` tests start real
processes on loopback (ended by PID in fixtures); `soak` tests are long fault
runs, deselected by default and run by `pytest -m soak` in CI's second stage."""

import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from ftwire.background import BackgroundLoop
from lighthouse.server import LighthouseServer, ServerConfig
from tests.lighthouse_support import Lighthouses


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


@pytest.fixture
async def lighthouses() -> AsyncIterator[Lighthouses]:
    """In-process lighthouses a test starts; all stopped at the end."""
    servers = Lighthouses()
    yield servers
    await servers.stop_all()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@pytest.fixture
def dead_address() -> str:
    """An address where nothing listens: the port was just free, so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
