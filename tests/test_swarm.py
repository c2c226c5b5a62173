"""DiLoCo-SWARM with real processes: a lighthouse with two rooms, 2 stages x 2 workers.

A stage-1 worker is SIGKILLed mid-run and restarted: the pipeline goes on
through the other one, the restarted worker heals from its stage peer and
takes micro-batches again; every committed step of a stage holds one state
(I1 per room) and the loss keeps falling.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.chaos_support import assert_one_history, records
from tests.procs import Proc, process_pool, start_lighthouse

pytestmark = pytest.mark.timeout(400)


def start_worker(
    procs: list[Proc], url: str, stage: int, worker: int, log: Path, *flags: str
) -> Proc:
    proc = Proc(
        f"stage{stage}.worker{worker}",
        [
            sys.executable,
            "-m",
            "ftdiloco.examples.train_swarm",
            "--stage",
            str(stage),
            "--stages",
            "2",
            "--records",
            str(log),
            "--upstream-grace",
            "3",
            *flags,
        ],
        env={
            "FTDILOCO_LIGHTHOUSE": url,
            "REPLICA_GROUP_ID": str(worker),
            "NUM_REPLICA_GROUPS": "2",
            "FTDILOCO_TIMEOUT": "20",
            "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
        },
    )
    procs.append(proc)
    return proc


def restarted_incarnation(log: Path) -> str:
    """The incarnation of stage1/worker1's second process (the last one to appear)."""
    seen = [r["incarnation"] for r in records(log) if r["group"] == "stage1/worker1"]
    return seen[-1]


def test_a_killed_stage_worker_is_routed_around_and_heals_on_restart(tmp_path):
    flags = ("--outer-steps", "7", "--sync-every", "10", "--eval-every", "100", "--batch-size", "8")
    logs = {stage: tmp_path / f"stage{stage}.jsonl" for stage in (0, 1)}
    with process_pool(tmp_path / "logs") as procs:
        _, url = start_lighthouse(procs, "--rooms", "stage0,stage1")
        workers = {
            (s, w): start_worker(procs, url, s, w, logs[s], *flags) for s in (0, 1) for w in (0, 1)
        }
        first = workers[0, 0]
        first.wait_for("outer step 3 ", timeout=240)
        workers[1, 1].kill()
        killed_at = len(records(logs[0]))
        # The pipeline goes on through stage1/worker0 alone: a stage-0 outer step commits.
        first.wait_line(lambda line: "outer step 4 " in line and "committed" in line, 120)
        restarted = start_worker(procs, url, 1, 1, logs[1], *flags)
        restarted.wait_line(lambda line: "healed" in line and "committed" in line, 120)
        for s, w in ((0, 0), (0, 1)):
            assert workers[s, w].wait(240) == 0, workers[s, w].tail()
        for proc in (workers[1, 0], restarted):
            assert proc.wait(60) == 0, proc.tail()
    for stage in (0, 1):
        assert_one_history([logs[stage]])
    stage0 = [r for r in records(logs[0]) if r["committed"]]
    assert max(r["step"] for r in stage0) >= 7
    after_kill = records(logs[0])[killed_at:]
    assert any(r["committed"] for r in after_kill), "no stage-0 step committed after the kill"
    losses = [r["loss"] for r in stage0 if r["loss"] is not None]
    assert losses[-1] < losses[0] - 0.5, losses
    # The restarted worker took micro-batches again after healing.
    back = [r for r in records(logs[1]) if r["incarnation"] == restarted_incarnation(logs[1])]
    assert max(r["inner_steps"] for r in back) > 0, back
    lost = sum(r.get("dropped", 0) for r in records(logs[0]))
    assert lost <= 2, f"{lost} micro-batches dropped"
    print(json.dumps({"stage0_losses": losses}))
