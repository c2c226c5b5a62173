"""A replica-group process for bench/heal.py's restart measurement (one process per group).

    python -m bench._heal_worker   # from the repository root

DiLoCo on a 4.2M-parameter MLP (two 512 -> 2048 -> 512 blocks), AdamW inner and
Nesterov SGD outer, paced so the outer period is steady: every inner step takes
at least BENCH_INNER_S seconds, and an outer step follows every
BENCH_SYNC_EVERY inner steps.  It trains until it is killed.

Configured like a training script (REPLICA_GROUP_ID, FTDILOCO_*), plus:
  BENCH_LOG         JSONL file this process appends its records to
  BENCH_SYNC_EVERY  inner steps per outer step (default 10)
  BENCH_INNER_S     minimum seconds per inner step (default 0.1)
  BENCH_CATCH_UP    "0": turn off DiLoCo's join on entering (``_catch_up``),
                    for comparison: the group then first joins a quorum (and
                    heals, overwriting its inner steps so far) after
                    BENCH_SYNC_EVERY inner steps, as before that existed

Records (every time is ``time.time()``, the clock the parent shares):
  {"event": "start", ...}   when the manager is ready: the times the script's
                            first line ran, the imports, the model, the
                            optimizers and the Manager were done, and then
  {"event": "quorum", ...}  every start_quorum: called / returned, the inner
                            steps this process ran before the call (its own
                            count: a heal moves DiLoCo's to the donors'),
                            whether it healed
  {"event": "sync", ...}    every outer step: step, committed, healed,
                            participants, seconds, a checksum of the global
                            weights and the outer optimizer's state
Each outer step also prints ``STEP <n>`` on stdout.
"""

from __future__ import annotations

import time

STARTED = time.time()  # the first line after the interpreter itself, before the imports

import json  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ftdiloco.coordination.manager import Manager  # noqa: E402
from ftdiloco.training.diloco import DiLoCo  # noqa: E402
from ftdiloco.training.outer_loop import SyncReport, optimizer_tensors  # noqa: E402
from ftwire import logs  # noqa: E402

IMPORTED = time.time()

# For the parent's fresh-interpreter comparison: the imports above, and the
# first optimizer, on which torch imports torch._dynamo (seconds).
IMPORTS = "import torch, ftdiloco.training.diloco, ftdiloco.coordination.manager, ftwire.logs"
FIRST_OPTIMIZER = "torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())"

HIDDEN, WIDTH, BLOCKS, BATCH = 512, 2048, 2, 8


def build_model() -> nn.Module:
    torch.manual_seed(0)  # every group starts from the same weights
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(HIDDEN, WIDTH), nn.GELU(), nn.Linear(WIDTH, HIDDEN)]
    return nn.Sequential(*layers)


def checksum(diloco: DiLoCo) -> int:
    """Sum of the global weights' and outer state's bits: equal state, equal sum."""
    outer = optimizer_tensors("outer", diloco.outer_optimizer)
    tensors = [*diloco.backup, *(outer[k] for k in sorted(outer))]
    total = 0
    for i, t in enumerate(tensors):
        bits = t.detach().contiguous().view(-1).view(torch.int32)
        total += (i + 1) * int(bits.sum(dtype=torch.int64))
    return total


def main() -> None:
    logs.configure("json")
    torch.set_num_threads(1)  # several groups share a small machine
    sync_every = int(os.environ.get("BENCH_SYNC_EVERY", "10"))
    inner_s = float(os.environ.get("BENCH_INNER_S", "0.1"))
    catch_up = os.environ.get("BENCH_CATCH_UP", "1") != "0"
    out = open(os.environ["BENCH_LOG"], "a", buffering=1)  # noqa: SIM115

    def emit(record: dict[str, Any]) -> None:
        out.write(json.dumps(record) + "\n")

    model = build_model()
    modelled = time.time()
    # The first optimizer costs seconds: torch imports torch._dynamo on it.
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    optimized = time.time()
    manager = Manager()
    data = torch.Generator().manual_seed(int(manager.config.replica_group_id))
    emit(
        {
            "event": "start",
            "pid": os.getpid(),
            "started": STARTED,
            "imported": IMPORTED,
            "model": modelled,
            "optimizers": optimized,
            "ready": time.time(),
            "params": sum(p.numel() for p in model.parameters()),
            "catch_up": catch_up,
        }
    )

    diloco = DiLoCo(manager, model, inner, outer, sync_every=sync_every)
    if not catch_up:
        diloco._catch_up = lambda: None  # type: ignore[method-assign]
    local_steps = 0

    def count(*_: object) -> None:
        nonlocal local_steps
        local_steps += 1

    # Registered before DiLoCo's hook (on entering), so it counts an inner
    # step before that step's outer step runs.
    inner.register_step_post_hook(count)
    start_quorum = manager.start_quorum

    def logged_start_quorum() -> Any:
        called, before = time.time(), local_steps
        plan = start_quorum()
        emit(
            {
                "event": "quorum",
                "called": called,
                "returned": time.time(),
                "inner_steps": before,
                "ok": plan is not None,
                "heal": plan.heal if plan is not None else None,
                "participants": plan.replica_world_size if plan is not None else 0,
            }
        )
        return plan

    manager.start_quorum = logged_start_quorum  # type: ignore[method-assign]

    def log_sync(report: SyncReport) -> None:
        now = time.time()  # the commit was just now: before the checksum's cost
        emit(
            {
                "event": "sync",
                "step": report.step,
                "committed": report.committed,
                "healed": report.healed,
                "participants": report.participants,
                "quorum_id": report.quorum_id,
                "seconds": report.seconds,
                "inner_steps": local_steps,
                "checksum": checksum(diloco),
                "time": now,
            }
        )
        print(f"STEP {report.step}", flush=True)

    with manager, diloco:  # entering joins the next outer step (unless BENCH_CATCH_UP=0)
        reported = diloco.last_sync
        if reported is not None:
            log_sync(reported)
        while True:
            began = time.perf_counter()
            x = torch.randn(BATCH, HIDDEN, generator=data)
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            inner.step()  # every sync_every-th one runs the outer step in its hook
            inner.zero_grad()
            report = diloco.last_sync
            if report is not None and report is not reported:
                reported = report
                log_sync(report)
            time.sleep(max(0.0, inner_s - (time.perf_counter() - began)))


if __name__ == "__main__":
    main()
