"""The simulator runs the library's own outer step: a simulated 2-worker run and a
real 2-group job (lighthouse + processes + gloo) with the same seeds, data and
settings commit bitwise identical global weights and outer optimizer state."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ftdiloco.sim import DilocoSimulator, NetworkModel
from tests.procs import Proc, process_pool, start_lighthouse
from tests.workers import sim_agreement_worker as worker

STEPS = 6  # committed outer steps compared, the entry step included


def simulated_hashes(settings: dict[str, Any]) -> dict[int, set[str]]:
    sim = DilocoSimulator(
        model_cls=worker.AgreementMLP,
        loss_fn=F.cross_entropy,
        train_dataset=worker.agreement_dataset(),
        num_nodes=2,
        optimizer_cls=torch.optim.AdamW,  # worker.inner_optimizer's
        optimizer_kwargs={"lr": 3e-3},
        diloco_interval=worker.SYNC_EVERY,
        batch_size=worker.BATCH,
        seed=worker.SEED,
        max_local_step=(STEPS - 1) * worker.SYNC_EVERY,
        record_hashes=True,
        progress=False,
        network=NetworkModel(step_time=0.01),
        **settings,
    )
    sim.train()
    out: dict[int, set[str]] = {}
    for sync in sim.recorded_syncs:
        assert sync["committed"], sync
        out[sync["step"]] = set(sync["hashes"].values())
    return out


@pytest.mark.integration
@pytest.mark.parametrize(
    "settings",
    [
        {"fragments": 1, "sync_delay": 0, "compression": "fp32"},
        {"fragments": 1, "sync_delay": 0, "compression": "int4", "error_feedback": True},
        {"fragments": 3, "sync_delay": 1, "compression": "int8"},
    ],
    ids=["fp32", "int4-error-feedback", "streaming-int8"],
)
def test_simulated_and_real_jobs_commit_bitwise_identical_weights(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    logs = [tmp_path / f"group{g}.jsonl" for g in range(2)]
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2")
        groups = []
        for g in range(2):
            env = {
                "FTDILOCO_LIGHTHOUSE": url,
                "REPLICA_GROUP_ID": str(g),
                "NUM_REPLICA_GROUPS": "2",
                "FTDILOCO_TIMEOUT": "30",
                "WORKER_LOG": str(logs[g]),
                "WORKER_STEPS": str(STEPS),
                "WORKER_SETTINGS": json.dumps(settings),
            }
            args = [sys.executable, "-m", "tests.workers.sim_agreement_worker"]
            groups.append(Proc(f"group{g}", args, env))
            procs.append(groups[-1])
        for proc in groups:
            proc.wait_for("DONE", timeout=120)
            assert proc.wait(timeout=30) == 0, proc.tail()
    real: dict[int, set[str]] = {}
    for log in logs:
        for record in map(json.loads, log.read_text().splitlines()):
            assert record["committed"], record  # two groups, no faults: every step commits
            real.setdefault(record["step"], set()).add(record["hash"])
    simulated = simulated_hashes(settings)
    # (With fragments each slice's sync is an outer step: the simulation runs further.)
    assert sorted(real) == list(range(1, STEPS + 1))
    assert set(real) <= set(simulated)
    for step in real:
        assert len(real[step]) == 1, f"real groups disagree at step {step}"
        assert real[step] == simulated[step], f"simulator and real job differ at step {step}"
