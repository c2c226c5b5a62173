"""A real replica group that trains exactly like a simulated worker (the agreement test).

The test runs the simulator with :data:`SETTINGS` on :func:`agreement_dataset`
and this script as two real groups (lighthouse, Manager, gloo); both must
commit bitwise identical global weights.  Everything a worker does is built
from the same pieces the simulator uses: ``ShardBatches`` (its data shard),
``inner_step`` (its inner step), ``global_state_hash`` (what is compared).

Environment: the usual FTDILOCO_* / REPLICA_GROUP_ID / NUM_REPLICA_GROUPS,
plus WORKER_LOG (JSONL, one record per outer step), WORKER_STEPS (committed
outer steps to run) and WORKER_SETTINGS (JSON overriding SETTINGS' DiLoCo
options).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ftdiloco.coordination.manager import Manager
from ftdiloco.sim.worker import ShardBatches, global_state_hash, inner_step
from ftdiloco.training.diloco import DiLoCo
from ftwire import logs

SEED = 3
BATCH = 8
SYNC_EVERY = 6
SETTINGS: dict[str, Any] = {"fragments": 1, "sync_delay": 0, "compression": "fp32"}


class AgreementMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def agreement_dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2048, 12, generator=gen)
    return TensorDataset(x, (x[:, :5] * x[:, 5:10]).argmax(dim=1))


def inner_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3)


def outer_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # The simulator's (and diloco-sim's) default outer optimizer.
    return torch.optim.SGD(model.parameters(), lr=0.7, nesterov=True, momentum=0.9)


def main() -> None:
    logs.configure("json")
    steps = int(os.environ["WORKER_STEPS"])
    settings = {**SETTINGS, **json.loads(os.environ.get("WORKER_SETTINGS", "{}"))}
    manager = Manager()
    group = manager.config.replica_group_id
    groups = manager.config.num_replica_groups or 1
    torch.manual_seed(SEED)  # as the simulator builds every worker's model
    model = AgreementMLP()
    inner, outer = inner_optimizer(model), outer_optimizer(model)
    data = ShardBatches(agreement_dataset(), groups, int(group), BATCH, SEED)
    diloco = DiLoCo(manager, model, inner, outer, SYNC_EVERY, **settings)
    out = open(os.environ["WORKER_LOG"], "a", buffering=1)  # noqa: SIM115
    seen: list[object] = [None]

    def record() -> None:
        report = diloco.last_sync
        if report is not None and report is not seen[0]:
            seen[0] = report
            line = {"step": report.step, "committed": report.committed}
            out.write(json.dumps({**line, "hash": global_state_hash(diloco)}) + "\n")

    with manager, diloco:
        record()
        while manager.step < steps:
            x, y = data.next()
            inner_step(model, inner, F.cross_entropy, x, y)
            record()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
