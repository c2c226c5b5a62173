"""A replica-group process for the integration tests: DiLoCo on a tiny model.

Configured like any training script (torchrun's variables, REPLICA_GROUP_ID,
FTDILOCO_*), plus test-only knobs:
  WORKER_LOG       JSONL file: one record per outer step (step, committed,
                   participants, hash of the global weights and outer state)
  WORKER_STEPS     stop after this many committed outer steps
  WORKER_RESUME    first resume from FTDILOCO_CHECKPOINT_DIR and print
                   "RESUMED <step> <hash> <params equal backup>" (step -1: none);
                   with that directory set, SIGTERM saves and exits
  WORKER_HANG_AT   at this manager step, stop before the allreduce, print
                   "HANGING" and wait to be killed (so peers are mid-allreduce)
  WORKER_PAUSE_AT  at this manager step, print "PAUSED" between syncs and wait
                   for a line on stdin (so the test can kill it between syncs)
  WORKER_SLOW_SERVE  when a peer heals from this group at this step or later,
                   print "SERVING" and stall before sending state (so the
                   test can kill a donor in the middle of a transfer)
  WORKER_WAIT_START  print "READY" once connected and wait for a line on stdin
                   before the first quorum (so a test can start groups together)
  WORKER_FRAGMENTS, WORKER_SYNC_DELAY, WORKER_COMPRESSION  streaming DiLoCo settings
Every outer step also prints "STEP <n>" so a test can wait for progress.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from ftdiloco.diloco import DiLoCo, optimizer_tensors, tensors_hash
from ftdiloco.manager import Manager
from ftdiloco.transport import StateServer
from lighthouse import logs


def state_hash(diloco: DiLoCo) -> str:
    outer = optimizer_tensors("outer", diloco.outer_optimizer)
    return tensors_hash([*diloco.backup, *(outer[k] for k in sorted(outer))])


def main() -> None:
    logs.configure("json")
    steps = int(os.environ.get("WORKER_STEPS", "6"))
    hang_at = int(os.environ.get("WORKER_HANG_AT", "-1"))
    pause_at = int(os.environ.get("WORKER_PAUSE_AT", "-1"))
    out = open(os.environ["WORKER_LOG"], "a", buffering=1)  # noqa: SIM115
    if os.environ.get("WORKER_SLOW_SERVE"):
        _stall_heal_serving(int(os.environ["WORKER_SLOW_SERVE"]))

    torch.manual_seed(0)  # every group starts from the same weights
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    manager = Manager()
    if os.environ.get("WORKER_WAIT_START"):
        print("READY", flush=True)  # alive at the lighthouse, not yet joined
        sys.stdin.readline()
    group = int(manager.config.replica_group_id) * 100 + manager.config.rank
    data = torch.Generator().manual_seed(group)

    streaming = {
        "fragments": int(os.environ.get("WORKER_FRAGMENTS", "1")),
        "sync_delay": int(os.environ.get("WORKER_SYNC_DELAY", "0")),
        "compression": os.environ.get("WORKER_COMPRESSION", "fp32"),
        "error_feedback": bool(os.environ.get("WORKER_COMPRESSION")),
    }
    diloco = DiLoCo(manager, model, inner, outer, sync_every=4, **streaming)
    if os.environ.get("WORKER_RESUME"):  # before entering: the first outer step needs it
        step = manager.step if manager.resume() else -1
        pairs = zip(diloco.params, diloco.backup, strict=True)
        same = all(torch.equal(p.detach(), b) for p, b in pairs)
        print(f"RESUMED {step} {state_hash(diloco)} {same}", flush=True)
    reported: list[object] = [None]

    def log_sync() -> None:
        """One record per outer step, taken right after it (before any inner step)."""
        nonlocal pause_at
        report = diloco.last_sync
        if report is None or report is reported[0]:
            return
        reported[0] = report
        synced = diloco.fragments[report.fragment]
        pairs = zip(synced.params, synced.backup, strict=True)
        rolled_back_ok = report.committed or all(torch.equal(p.detach().cpu(), b) for p, b in pairs)
        record = {
            "group": manager.config.replica_group_id,
            "rank": manager.config.rank,
            "step": report.step,
            "committed": report.committed,
            "participants": report.participants,
            "quorum_id": report.quorum_id,
            "seconds": report.seconds,
            "hash": state_hash(diloco),
            "rolled_back_to_backup": rolled_back_ok,
            "healed": report.healed,
            "bytes_sent": report.bytes_sent,
            "fragment": report.fragment,
            "time": time.time(),
        }
        out.write(json.dumps(record) + "\n")
        print(f"STEP {report.step}", flush=True)
        if 0 <= pause_at <= manager.step:
            pause_at = -1  # once
            print("PAUSED", flush=True)
            sys.stdin.readline()

    with manager, diloco:
        if manager.checkpoint_directory() is not None:
            manager.install_sigterm_handler()
        log_sync()  # the step joined on entering
        while manager.step < steps:
            if 0 <= hang_at <= manager.step and diloco.inner_steps % 4 == 3:
                manager.allreduce = _hang  # type: ignore[method-assign]
            x = torch.randn(16, 32, generator=data)
            loss = (model(x) - x[:, :8]).pow(2).mean()
            loss.backward()
            inner.step()
            inner.zero_grad()
            log_sync()
    print("DONE", flush=True)


def _stall_heal_serving(from_step: int) -> None:
    copy_chunk = StateServer._copy_chunk

    def stalled(self: StateServer, publication: Any, *args: Any) -> bool:
        if publication.step >= from_step:
            print("SERVING", flush=True)
            time.sleep(3600)
        return copy_chunk(self, publication, *args)

    StateServer._copy_chunk = stalled  # type: ignore[method-assign]


def _hang(*_: object, **__: object) -> object:
    print("HANGING", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
