"""A replica that cannot reach the lighthouse says so on one readable line every few
seconds, and gives up when the deadline its configuration sets has passed."""

from __future__ import annotations

import re
import time

import pytest
from structlog.testing import capture_logs

from lighthouse import client as client_module
from lighthouse.client import AsyncLighthouseClient, LighthouseUnavailable

LINE = re.compile(
    r"^waiting for lighthouse (http://127\.0\.0\.1:\d+): connection refused \((\d+) s of (\d+) s\)$"
)


async def test_one_readable_line_every_few_seconds(dead_address, capsys, monkeypatch):
    monkeypatch.setattr(client_module, "WAITING_REPORT_EVERY_S", 1.0)
    started = time.monotonic()
    with capture_logs() as logs:
        async with AsyncLighthouseClient(dead_address, retry_deadline=3.0) as client:
            with pytest.raises(LighthouseUnavailable) as info:
                await client.heartbeat("g0")
    took = time.monotonic() - started
    # Tries until the deadline, not one backoff pause before it; the last try is quick.
    assert 2.9 <= took < 4.0
    assert str(info.value) == f"no lighthouse reachable at {dead_address}: connection refused"
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    # Every few seconds, not every retry (there are dozens in 3 s at 50 ms..2 s backoff).
    assert 2 <= len(lines) <= 4, lines
    seen = [LINE.match(line) for line in lines]
    assert all(seen), lines
    assert {m.group(1) for m in seen if m} == {dead_address}
    assert {m.group(3) for m in seen if m} == {"3"}
    elapsed = [int(m.group(2)) for m in seen if m]
    assert elapsed == sorted(elapsed) and elapsed[0] == 0
    # Each retry is logged at debug level only (filtered out at the usual info level).
    assert len(logs) > len(lines)
    assert {e["log_level"] for e in logs} == {"debug"}


def test_the_manager_waits_for_ftdiloco_timeout(dead_address, capfd):
    pytest.importorskip("torch")
    from ftdiloco.config import Config
    from ftdiloco.coordination.manager import Manager

    config = Config.from_env({}, lighthouse=dead_address, replica_group_id="w", timeout=4.0)
    assert config.quorum_timeout == 4.0
    started = time.monotonic()
    with pytest.raises(LighthouseUnavailable):
        Manager(config)
    # The retries end at FTDILOCO_TIMEOUT (was a fixed 30 s), a little after at most.
    assert 4.0 <= time.monotonic() - started < 10.0
    err = capfd.readouterr().err
    assert f"waiting for lighthouse {dead_address}: connection refused (0 s of 4 s)" in err
