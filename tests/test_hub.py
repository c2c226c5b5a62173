"""The hub topology with real processes: what a user of ``FTDILOCO_TOPOLOGY=hub`` relies on.

- Groups that know only a relay's address (a forwarded port) train through
  the hub with a token, and end with identical global weights (I1).
- The hub SIGKILLed and restarted mid-run: the groups reconnect by
  themselves, no committed step is lost or applied twice.
- A group whose model differs is refused, naming the parameter.
- DyLU through the hub; ``ftdiloco launch --topology hub``; the operator's
  endpoints (dashboard, metrics, control actions behind the token).
- Bad bytes get a 4xx, never a crash (I6).

Processes are started through tests.procs and ended by PID by its pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ftdiloco.hub.cli import LISTENING
from ftdiloco.training.events import PREFIX as EVENT
from tests.procs import Proc, free_port, process_pool

pytestmark = pytest.mark.timeout(600)

TOKEN = "hub-secret"
# Small and quick: the example's tiny model, few inner steps, no sample.
TRAIN = ["--model-size", "tiny", "--sync-every", "4", "--batch-size", "4", "--sample-bytes", "0"]


class Relay:
    """A TCP relay (an SSH forward's stand-in): the groups know only its port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    with process_pool(tmp_path / "logs") as pool:
        yield pool


def start_hub(procs: list[Proc], state: Path, port: int, *flags: str) -> Proc:
    command = [sys.executable, "-m", "ftdiloco.operate.cli", "hub", "--state", str(state)]
    hub = Proc("hub", [*command, "--bind", f"127.0.0.1:{port}", *flags])
    procs.append(hub)
    hub.wait_for(LISTENING, timeout=60)
    return hub


def start_group(procs: list[Proc], g: int, hub: str, groups: int, *args: str, **env: str) -> Proc:
    proc = Proc(
        f"group{g}",
        [sys.executable, "-m", "ftdiloco.examples.train_diloco", *TRAIN, *args],
        env={
            "FTDILOCO_HUB": hub,
            "REPLICA_GROUP_ID": str(g),
            "NUM_REPLICA_GROUPS": str(groups),
            "FTDILOCO_TIMEOUT": "60",
            **env,
        },
    )
    procs.append(proc)
    return proc


def events(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line[len(EVENT) :]) for line in proc.output if line.startswith(EVENT)]


def status(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/status")
    doc: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return doc


def finished(proc: Proc, timeout: float = 400) -> dict[str, Any]:
    assert proc.wait(timeout) == 0, proc.tail()
    done = [e for e in events(proc) if e["kind"] == "done"]
    assert done, proc.tail()
    return done[-1]


def test_groups_behind_a_relay_train_through_the_hub_with_a_token(
    procs: list[Proc], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    start_hub(procs, tmp_path / "state.safetensors", port, "--token-file", str(token_file))
    relay = Relay(port)
    try:
        url = f"http://127.0.0.1:{relay.port}"
        groups = [
            start_group(procs, g, url, 2, "--outer-steps", "3", FTDILOCO_TOKEN=TOKEN)
            for g in range(2)
        ]
        done = [finished(g) for g in groups]
    finally:
        relay.close()
    assert relay.connections > 0
    assert [d["committed"] for d in done] == [3, 3]
    # The same global weights on both groups: the same held-out loss, to the bit (I1).
    assert done[0]["eval_loss"] == done[1]["eval_loss"]
    assert status(port)["step"] == 3


def test_a_hub_killed_and_restarted_loses_no_committed_step(
    procs: list[Proc], tmp_path: Path
) -> None:
    state = tmp_path / "state.safetensors"
    port = free_port()
    hub = start_hub(procs, state, port, "--min-groups", "2")
    url = f"http://127.0.0.1:{port}"
    groups = [start_group(procs, g, url, 2, "--outer-steps", "5") for g in range(2)]
    groups[0].wait_line(lambda line: line.startswith(EVENT) and '"step": 2' in line, 400)
    hub.kill()
    committed_before = max(e["step"] for e in events(groups[0]) if e.get("committed"))
    start_hub(procs, state, port, "--min-groups", "2")
    done = [finished(g) for g in groups]
    assert [d["committed"] for d in done] == [5, 5]
    assert done[0]["eval_loss"] == done[1]["eval_loss"]
    for g in groups:
        steps = [e["step"] for e in events(g) if e["kind"] == "outer_step" and e["committed"]]
        # Each committed step once, in order: none lost, none applied twice.
        assert steps == sorted(set(steps)) and steps[-1] == 5, steps
    assert committed_before >= 2
    assert status(port)["step"] == 5


def test_a_group_with_another_model_is_refused_naming_the_parameter(
    procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    start_hub(procs, tmp_path / "state.safetensors", port)
    url = f"http://127.0.0.1:{port}"
    first = start_group(procs, 0, url, 1, "--outer-steps", "1")
    finished(first)
    other = start_group(procs, 0, url, 1, "--outer-steps", "1", "--model-size", "small")
    assert other.wait(300) != 0
    text = "".join(other.output)
    assert "model differs from the hub's" in text and "parameter" in text, other.tail()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/join", b"\xff\x00garbage"),
        ("POST", "/v1/join", b'{"group": "g", "incarnation": "i", "step": -1}'),
        ("PUT", "/v1/init", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
        ("PUT", "/v1/submit?group=g&incarnation=i&round=x", b""),
        ("PUT", "/v1/submit?group=g&incarnation=i&round=1", b"\xff" * 8),
        ("POST", "/v1/outcome", b'{"group": 1}'),
        ("POST", "/control/kick", b'{"group": "nobody"}'),
        ("GET", "/v1/weights", b""),
    ],
)
def test_bad_requests_get_a_4xx(
    procs: list[Proc], tmp_path: Path, method: str, path: str, body: bytes
) -> None:
    port = free_port()
    start_hub(procs, tmp_path / "state.safetensors", port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert 400 <= response.status < 500, response.read()
    conn.close()
    assert status(port)["step"] == 0  # still serving


def test_dylu_runs_through_the_hub(procs: list[Proc], tmp_path: Path) -> None:
    """A group several times slower plans fewer inner steps; both end identical (I1)."""
    port = free_port()
    start_hub(procs, tmp_path / "state.safetensors", port, "--min-groups", "2")
    url = f"http://127.0.0.1:{port}"
    steps = ["--outer-steps", "4", "--sync-every", "8", "--dylu"]
    fast = start_group(procs, 0, url, 2, *steps)
    slow = start_group(procs, 1, url, 2, *steps, "--slowdown", "0.05")
    done = [finished(fast), finished(slow)]
    assert [d["committed"] for d in done] == [4, 4]
    assert done[0]["eval_loss"] == done[1]["eval_loss"]
    planned = [int(m.group(1)) for line in slow.output if (m := re.search(r"\| H (\d+),", line))]
    assert planned and min(planned) < 8, slow.tail()


def test_async_runs_through_the_hub(procs: list[Proc], tmp_path: Path) -> None:
    """A slow group's stale pseudo-gradients are merged late; the fast one does not wait."""
    port = free_port()
    start_hub(procs, tmp_path / "state.safetensors", port)
    url = f"http://127.0.0.1:{port}"
    steps = ["--outer-steps", "6", "--sync-every", "8", "--mode", "async"]
    fast = start_group(procs, 0, url, 2, *steps, FTDILOCO_ASYNC_GRACE="0.3")
    slow = start_group(procs, 1, url, 2, *steps, "--slowdown", "0.1", FTDILOCO_ASYNC_GRACE="0.3")
    done = [finished(fast), finished(slow)]
    committed = [d["committed"] for d in done]
    # The slow group may take one more step alone after the fast one left.
    assert min(committed) >= 6 and status(port)["step"] == max(committed)
    if committed[0] == committed[1]:
        assert done[0]["eval_loss"] == done[1]["eval_loss"]  # the hub's weights (I1)
    assert any("participants 1 " in line for line in fast.output), fast.tail()
    stale = [int(m.group(1)) for line in slow.output if (m := re.search(r"stale (\d+)", line))]
    assert stale and max(stale) > 0, slow.tail()


def test_launch_topology_hub(tmp_path: Path) -> None:
    """`ftdiloco launch --topology hub`: the hub in the lighthouse's role, the groups through it."""
    command = [sys.executable, "-m", "ftdiloco.operate.cli", "launch", "--topology", "hub"]
    command += ["--groups", "2", "--outer-steps", "2", "--status-line", "off", "--", *TRAIN]
    with process_pool(tmp_path / "logs") as pool:
        launch = Proc("launch", command)
        pool.append(launch)
        assert launch.wait(300) == 0, launch.tail()
    assert any("success: all 2 groups finished" in line for line in launch.output)


def test_operating_the_hub(procs: list[Proc], tmp_path: Path) -> None:
    """Dashboard, metrics, status for anyone; every control action needs the token."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    hub = start_hub(procs, tmp_path / "state.safetensors", port, "--token-file", str(token_file))

    def ask(method: str, path: str, token: str | None = None) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        policy = response.getheader("Content-Security-Policy", "")
        answer = (response.status, response.read(), policy)
        conn.close()
        return answer

    status_code, page, policy = ask("GET", "/")
    assert status_code == 200 and b"kick" in page and "default-src 'none'" in policy
    status_code, metrics, _ = ask("GET", "/metrics")
    assert status_code == 200 and b"ftdiloco_hub_step" in metrics
    assert status(port)["token_required"] is True
    cli = Proc(
        "status",
        [sys.executable, "-m", "ftdiloco.operate.cli", "status"],
        env={"FTDILOCO_HUB": f"127.0.0.1:{port}", "FTDILOCO_TOKEN": TOKEN},
    )
    procs.append(cli)
    assert cli.wait(60) == 0, cli.tail()
    assert any(line.startswith(f"hub http://127.0.0.1:{port} | step 0") for line in cli.output)
    for path in ("/control/save", "/control/settings", "/control/kick", "/control/shutdown"):
        assert ask("POST", path)[0] == 401
        assert ask("POST", path, "wrong")[0] == 401
    assert ask("POST", "/control/settings", TOKEN)[0] == 409  # no weights yet
    assert ask("POST", "/control/save", TOKEN)[0] == 200
    assert ask("POST", "/control/shutdown", TOKEN)[0] == 200
    assert hub.wait(60) == 0
