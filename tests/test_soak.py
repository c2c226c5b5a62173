"""Long fault injection: groups are SIGKILLed and restarted again and again.

Runs in CI's second stage (`scripts/test -m soak`).  Whatever the timing of
the kills, at every committed step all groups that report it hold identical
state (I1), nothing committed is lost (I2), and every restarted group heals
and commits again (I4).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.procs import Proc, process_pool, start_lighthouse
from tests.test_diloco_faults import assert_consistent, records, start_group

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]

GROUPS = 3
KILLS = 6


def _committed(line: str) -> bool:
    return line.startswith("STEP ") and line.split()[2:3] == ["committed"]


def committed_step(proc: Proc) -> int:
    """The next step above 0 the group reports: it healed (or trained) and committed."""
    while True:
        step = int(proc.wait_line(_committed, timeout=120).split()[1])
        if step > 0:
            return step


def test_repeated_kills_and_restarts_keep_every_committed_step_consistent(
    tmp_path: Path,
) -> None:
    rng = random.Random(1234)
    logs: list[Path] = []
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2")

        def launch(group: int) -> Proc:
            log = tmp_path / f"g{group}-{len(logs)}.jsonl"
            logs.append(log)
            # The job never ends on its own: the test stops it after the kills.
            return start_group(procs, url, group, log, WORKER_STEPS="1000000")

        running = {g: launch(g) for g in range(GROUPS)}
        restarted = running[0]
        for _ in range(KILLS):
            # The last restarted group is back (healed and committed), the job
            # runs on a few steps, then a random group dies at a random moment.
            committed_step(restarted)
            for _ in range(rng.randrange(1, 6)):
                committed_step(restarted)
            victim = rng.randrange(GROUPS)
            running[victim].kill()
            restarted = running[victim] = launch(victim)
        # Every group, the last restarted one included, commits a few more steps.
        for proc in running.values():
            for _ in range(3):
                committed_step(proc)

    by_step = assert_consistent(logs)
    assert set(range(1, max(by_step) + 1)) == set(by_step), sorted(by_step)
    # Every restarted incarnation that trained at all first healed, then committed.
    for log in logs[GROUPS:]:
        recs = records(log)
        committed = [r for r in recs if r["committed"]]
        if committed:
            first = recs.index(committed[0])
            assert any(r["healed"] for r in recs[: first + 1]), recs
