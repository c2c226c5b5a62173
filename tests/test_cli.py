"""The ``lighthouse`` command as users run it: a real process on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ftwire import protocol
from lighthouse.cli import listening_url
from tests.lighthouse_support import join, quorum_of

pytestmark = pytest.mark.integration

# Generous for a loaded 2-core CI box; a bare start takes a few hundred ms.
STARTUP_LIMIT_S = 1.5


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.url = ""
        self.startup_s = 0.0

    def logs(self) -> str:
        return self.stderr.read_text()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 10)


Spawn = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts `python -m lighthouse.cli ARGS` and waits for its URL line;
    whatever is still running at the end is killed by its PID."""
    daemons: list[Daemon] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Daemon:
        stderr = tmp_path / f"stderr-{len(daemons)}.log"
        started = time.monotonic()
        with stderr.open("wb") as log_file:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lighthouse.cli",
                *args,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**_base_env(), **(env or {})},
            )
        daemon = Daemon(proc, stderr)
        daemons.append(daemon)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        daemon.startup_s = time.monotonic() - started
        url = listening_url(line)
        assert url is not None, (line, daemon.logs())
        daemon.url = url
        return daemon

    yield start
    for daemon in daemons:
        if daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FTDILOCO_TOKEN", None)
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lighthouse.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=_base_env(),
    )


async def get_status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/status") as response:
        assert response.status == 200
        status: dict[str, Any] = await response.json()
        return status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_starts_fast_serves_and_exits_0_on_a_signal(spawn, sig):
    daemon = await spawn("--bind", "127.0.0.1:0", "--min-replicas", "1", "--log-format", "json")
    print(f"lighthouse startup: {daemon.startup_s * 1000:.0f} ms to the URL line")
    assert daemon.startup_s < STARTUP_LIMIT_S
    assert daemon.url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as session:
        assert quorum_of(await join(session, daemon.url, "a")).replica_ids == ("a",)
    assert await daemon.stop(sig) == 0
    events = [json.loads(line)["event"] for line in daemon.logs().splitlines()]
    assert events[0] == "lighthouse started"
    assert "quorum formed" in events
    assert events[-1] == "lighthouse stopped"


async def test_underscore_flags_are_aliases(spawn):
    daemon = await spawn(
        "--bind=127.0.0.1:0",
        "--min_replicas=3",
        "--join_timeout_ms=1234",
        "--heartbeat_timeout_ms=777",
        "--quorum_tick_ms=50",
        "--log_format=console",
    )
    config = (await get_status(daemon.url))["config"]
    assert config["min_replicas"] == 3
    assert config["join_timeout"] == 1.234
    assert config["heartbeat_timeout"] == 0.777
    assert config["quorum_tick"] == 0.05
    assert not config["token_required"]
    assert await daemon.stop() == 0
    assert "lighthouse started" in daemon.logs()


@pytest.mark.parametrize("source", ["file", "env"])
async def test_a_token_from_a_file_or_the_environment_is_enforced(spawn, tmp_path, source):
    if source == "file":
        token_file = tmp_path / "token"
        token_file.write_text("  hunter2\n")  # surrounding whitespace is not part of it
        daemon = await spawn("--bind", "127.0.0.1:0", "--token-file", str(token_file))
    else:
        daemon = await spawn("--bind", "127.0.0.1:0", env={"FTDILOCO_TOKEN": "hunter2"})
    async with aiohttp.ClientSession() as session:
        status, body = await join(session, daemon.url, "a")
        assert (status, body["error"]) == (401, "unauthorized")
        assert quorum_of(await join(session, daemon.url, "a", token="hunter2"))
    assert (await get_status(daemon.url))["config"]["token_required"]
    assert "hunter2" not in daemon.logs()
    assert await daemon.stop() == 0


async def test_shutdown_endpoint_ends_the_process_with_0(spawn):
    daemon = await spawn("--bind", "127.0.0.1:0")
    async with (
        aiohttp.ClientSession() as session,
        session.post(daemon.url + "/v1/shutdown", data=protocol.pack({})) as response,
    ):
        assert response.status == 200
    assert await asyncio.wait_for(daemon.proc.wait(), 10) == 0


async def test_a_public_bind_without_a_token_warns(spawn):
    daemon = await spawn("--bind", "0.0.0.0:0", "--log-format", "json")
    assert await daemon.stop() == 0
    warnings = [json.loads(line) for line in daemon.logs().splitlines()]
    assert any(w["event"] == "no token on a non-loopback address" for w in warnings)


def test_importing_the_daemon_does_not_import_torch():
    code = "import sys, lighthouse.server, lighthouse.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _empty_token_file(tmp_path: Path) -> str:
    path = tmp_path / "empty"
    path.write_text("\n")
    return str(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--min-replicas", "0"], "must be >= 1, got 0"),
        (["--min_replicas", "many"], "expected an integer"),
        (["--heartbeat-timeout-ms", "0"], "must be >= 1"),
        (["--join-timeout-ms", "-5"], "must be >= 0"),
        (["--bind", "nonsense"], "expected HOST:PORT"),
        (["--bind", "127.0.0.1:99999"], "expected HOST:PORT"),
        (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
        (["--token-file", "EMPTY"], "is empty"),
        (["--log-format", "xml"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_nonzero_with_a_message(tmp_path, args, expected):
    args = [_empty_token_file(tmp_path) if a == "EMPTY" else a for a in args]
    result = run_cli("--bind", "127.0.0.1:0", *args)
    assert result.returncode != 0
    assert expected in result.stderr
    assert result.stdout == ""


def test_a_port_in_use_exits_1_with_a_message():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("--bind", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
