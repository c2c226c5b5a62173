"""`ftdiloco launch --stages 2 --workers-per-stage 2 --kill-every`: a pipeline job, broken.

The launcher starts a lighthouse with a room per stage and the four stage
workers, SIGKILLs a random one every few seconds, starts it again in its
stage, and the job goes on to the end: every restarted worker commits again,
the first stage's loss falls, and the summary says so.
"""

from __future__ import annotations

import re

import pytest

from ftdiloco.operate.launch import LaunchOptions
from ftdiloco.operate.launch.swarm import StageLayout
from tests import test_launch
from tests.procs import Proc
from tests.test_launch import finish, start_launcher

# Launchers started by a test, stopped as a user would (SIGTERM), then killed.
launcher = test_launch.launcher

pytestmark = pytest.mark.timeout(400)


def test_a_stage_layout_names_its_workers_rooms_and_identities() -> None:
    layout = StageLayout(2, 3)
    assert [layout.name(i) for i in (0, 2, 3, 5)] == [
        "stage0.worker0",
        "stage0.worker2",
        "stage1.worker0",
        "stage1.worker2",
    ]
    assert layout.lighthouse_args() == ["--rooms", "stage0,stage1"]
    assert layout.env(4) == {"REPLICA_GROUP_ID": "1", "NUM_REPLICA_GROUPS": "3"}
    assert layout.command(4)[-4:] == ["--stage", "1", "--stages", "2"]


def test_pipeline_options_are_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="at least 2 stages"):
        StageLayout(1, 2)
    with pytest.raises(ValueError, match="workers per stage"):
        LaunchOptions(groups=4, min_replicas=3, swarm=StageLayout(2, 2))
    with pytest.raises(ValueError, match="no --script or --nproc-per-node"):
        LaunchOptions(groups=4, min_replicas=1, nproc_per_node=2, swarm=StageLayout(2, 2))


@pytest.mark.integration
def test_a_pipeline_job_survives_killed_stage_workers(launcher: list[Proc]) -> None:
    proc = start_launcher(
        launcher,
        *("--stages", "2", "--workers-per-stage", "2", "--kill-every", "3"),
        *("--outer-steps", "200", "--seed", "1", "--status-line", "off"),
        *("--", "--sync-every", "10", "--batch-size", "8", "--eval-every", "1000"),
        *("--upstream-grace", "3"),
    )
    code, out = finish(proc, timeout=360)
    assert code == 0, out
    assert "result: success: all 4 groups finished" in out, out
    assert re.search(r"^pipeline: stage0 \[.+\] stage1 \[.+\]$", out, re.M), out
    kills = re.findall(r"^  (stage\d\.worker\d): killed at outer step \d+, recovered in", out, re.M)
    assert kills, f"no stage worker was killed and back:\n{out}"
    assert "not back before the end" not in out, out
    for name in ("stage0.worker0", "stage0.worker1", "stage1.worker0", "stage1.worker1"):
        starts = 1 + kills.count(name)
        assert re.search(rf"^{name}\s+{starts}\s+[1-9]\d*\s", out, re.M), f"{name}: {out}"
    line = r"^\[stage0\.worker0\] stage0/worker0 \| outer step \d+ \| loss ([\d.]+)"
    losses = [float(x) for x in re.findall(line, out, re.M)]
    assert len(losses) >= 10 and losses[-1] < losses[0] - 0.5, losses
