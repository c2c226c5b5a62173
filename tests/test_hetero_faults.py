"""DyLU and asynchronous DiLoCo with real processes: a slow group, a kill, a restart.

Three groups of the test worker; group 2 sleeps after every inner step, so it
is several times slower than the others.  A fast group is SIGKILLed after a
few commits and started again with the same id; it heals and commits with the
others.  Every record of every process must hold I1 and I2
(``tests.chaos_support``), and each mode must show it did what it promises.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos_support import assert_one_history, records, start_group
from tests.procs import Proc, process_pool, start_lighthouse

pytestmark = pytest.mark.integration


def _committed(line: str) -> bool:
    return line.startswith("STEP ") and line.split()[2:3] == ["committed"]


def _kill_and_restart(tmp_path: Path, **mode: str) -> list[Path]:
    """Run the three groups, kill and restart group 1; the logs of every process."""
    common = {"WORKER_STEPS": "1000000", "FTDILOCO_TIMEOUT": "10", **mode}
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    with process_pool(tmp_path / "out") as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2")
        start_group(procs, url, 0, logs[0], WORKER_INNER_SLEEP="0.01", **common)
        victim = start_group(procs, url, 1, logs[1], WORKER_INNER_SLEEP="0.01", **common)
        slow = start_group(procs, url, 2, logs[2], WORKER_INNER_SLEEP="0.15", **common)
        for _ in range(3):
            slow.wait_line(_committed, timeout=90)
        victim.kill()
        logs.append(tmp_path / "g1-restarted.jsonl")
        victim = start_group(procs, url, 1, logs[-1], WORKER_INNER_SLEEP="0.01", **common)
        for _ in range(3):
            victim.wait_line(_committed, timeout=90)
        for _ in range(2):
            slow.wait_line(_committed, timeout=90)
    return logs


def test_dylu_survives_a_kill_and_the_slow_group_takes_fewer_steps(tmp_path: Path) -> None:
    logs = _kill_and_restart(tmp_path, WORKER_DYLU="1")
    assert_one_history(logs)
    slow = [r for r in records(logs[2]) if r["committed"]]
    fast = [r for r in records(logs[0]) if r["committed"]]
    # Once the rates are known the slow group plans a shorter trip; the fast ones the full one.
    assert min(int(r["local_steps"]) for r in slow) < 4, slow
    assert max(int(r["local_steps"]) for r in fast) == 4
    restarted = [r for r in records(logs[3]) if r["committed"]]
    assert restarted and restarted[0]["healed"], restarted


def test_async_survives_a_kill_and_merges_the_slow_groups_stale_work(tmp_path: Path) -> None:
    logs = _kill_and_restart(tmp_path, WORKER_MODE="async")
    assert_one_history(logs)
    fast = [r for r in records(logs[0]) if r["committed"]]
    slow = [r for r in records(logs[2]) if r["committed"]]
    # The fast groups did not wait for the slow one: they committed steps without it ...
    assert any(int(r["participants"]) < 3 for r in fast), fast
    # ... and its pseudo-gradient, taken steps ago, was merged into a later step.
    assert any(int(r["staleness"]) > 0 for r in slow), slow
    restarted = [r for r in records(logs[3]) if r["committed"]]
    assert restarted and restarted[0]["healed"], restarted


def test_the_launcher_runs_the_example_asynchronously_to_the_end() -> None:
    """`ftdiloco launch --mode async`: three groups of the example GPT commit every step.

    (``--dylu`` goes the same way through the launcher: it only sets another variable.)
    """
    launcher = Proc(
        "launcher",
        [
            sys.executable,
            *("-m", "ftdiloco.operate.cli", "launch", "--timeout", "10", "--groups", "3"),
            *("--mode", "async", "--"),
            *("--model-size", "tiny", "--outer-steps", "4", "--sync-every", "10"),
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    try:
        code = launcher.wait(timeout=150)
        with contextlib.suppress(EOFError):  # raised once the output has ended
            launcher.wait_line(lambda line: False, timeout=10, what="the end of the output")
    finally:
        if launcher.popen.poll() is None:
            os.kill(launcher.pid, signal.SIGTERM)  # it stops every process it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=30)
            launcher.kill()
    out = "".join(launcher.output)
    assert code == 0, out
    assert "result: success: all 3 groups finished" in out, out
    for group in ("group0", "group1", "group2"):
        assert re.search(rf"^\[{group}\] done \| 4 outer steps committed", out, re.M), out
    # In async mode the outer-step line shows the group's H and staleness.
    assert re.search(r"^\[group0\] outer step \d+ .*\| H 10, stale \d+ \|", out, re.M), out
