"""A replica-group process for the integration tests: DiLoCo on a tiny model.

Configured like any training script (torchrun's variables, REPLICA_GROUP_ID,
FTDILOCO_*), plus test-only knobs, each injecting exactly the fault it names:
  WORKER_LOG       JSONL file: one record per outer step (step, committed,
                   participants, hash of the global weights and outer state,
                   pid, incarnation, history, outer_lr, outer_momentum)
  WORKER_STEPS     stop after this many committed outer steps
  WORKER_RESUME    first resume from FTDILOCO_CHECKPOINT_DIR and print
                   "RESUMED <step> <hash> <params equal backup>" (step -1: none);
                   with that directory set, SIGTERM saves and exits
  WORKER_ENTER_LATE_AT  "<step>:<seconds>": at that manager step, print
                   "ENTERING_LATE step=<n>" and sleep that long before issuing
                   the cross-group collective, so every peer is blocked inside
                   it, waiting for this group
  WORKER_SLOW_VOTE_AT  "<step>:<seconds>": at that manager step, print
                   "SLOW_VOTE step=<n>" and sleep that long before the commit
                   vote (an outer step that outlasts the join timeout)
  WORKER_PAUSE_AT  at this manager step, print "PAUSED" between syncs and wait
                   for a line on stdin (alive and heartbeating, not joining)
  WORKER_SLOW_SERVE  when a peer heals from this group at this step or later,
                   print "SERVING" and stall before sending state (so the
                   test can kill a donor in the middle of a transfer), for
                   WORKER_SLOW_SERVE_SECONDS (default: for ever), once
  WORKER_WAIT_START  print "READY" once connected and wait for a line on stdin
                   before the first quorum (so a test can start groups together)
  WORKER_FRAGMENTS, WORKER_SYNC_DELAY, WORKER_COMPRESSION  streaming DiLoCo settings
  WORKER_INNER_SLEEP  seconds each inner step also takes (a paced job, for benchmarks)
  WORKER_DYLU, WORKER_MODE  DiLoCo(dylu=True) and DiLoCo(mode="async") (grace 0.3 s,
                   momentum every 2 contributions); records then carry local_steps and staleness

Every cross-group collective is traced from inside the process group the
manager builds (``ftdiloco.coordination.process_group.connect`` is wrapped): once the real
collective is issued the worker prints "IN_COLLECTIVE step=<n>", and when its
wait returns "COLLECTIVE_DONE step=<n>" (or "COLLECTIVE_FAILED step=<n>").  A
test that sees a group's IN_COLLECTIVE with no COLLECTIVE_DONE after it knows
that group is blocked inside gloo.

Every outer step prints "STEP <n> committed" or "STEP <n> rolled_back" (n: the
manager's step after the vote) so a test can wait for progress.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from ftdiloco.coordination import process_group
from ftdiloco.coordination.manager import Manager
from ftdiloco.state.heal import StateServer
from ftdiloco.training.diloco import DiLoCo
from ftdiloco.training.outer_loop import optimizer_tensors, tensors_hash
from ftwire import logs


def state_hash(diloco: DiLoCo) -> str:
    outer = optimizer_tensors("outer", diloco.outer_optimizer)
    return tensors_hash([*diloco.backup, *(outer[k] for k in sorted(outer))])


def at_step(variable: str) -> tuple[int, float] | None:
    """``"<step>:<seconds>"`` from the environment, or None."""
    raw = os.environ.get(variable)
    if not raw:
        return None
    step, seconds = raw.split(":")
    return int(step), float(seconds)


def say(text: str) -> None:
    print(text, flush=True)


class _TracedWork:
    """The real collective's work; says when its wait returns."""

    def __init__(self, work: Any, step: int) -> None:
        self._work = work
        self._step = step

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = self._work.wait(*args, **kwargs)
        except BaseException:
            say(f"COLLECTIVE_FAILED step={self._step}")
            raise
        say(f"COLLECTIVE_DONE step={self._step}")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _TracedGroup:
    """The process group the manager built, with its collectives traced."""

    def __init__(
        self, pg: Any, manager: list[Manager], enter_late: list[tuple[int, float]]
    ) -> None:
        self._pg = pg
        self._manager = manager
        self._enter_late = enter_late

    def _step(self) -> int:
        return self._manager[0].step if self._manager else -1

    def _issue(self, kind: str, call: Any) -> _TracedWork:
        step = self._step()
        if self._enter_late and self._enter_late[0][0] == step:
            _, seconds = self._enter_late.pop()
            say(f"ENTERING_LATE step={step}")
            time.sleep(seconds)
        work = call()
        say(f"IN_COLLECTIVE step={step} kind={kind}")
        return _TracedWork(work, step)

    def allreduce(self, tensors: Any, *args: Any) -> _TracedWork:
        return self._issue("allreduce", lambda: self._pg.allreduce(tensors, *args))

    def allgather(self, output_tensors: Any, input_tensors: Any, *args: Any) -> _TracedWork:
        return self._issue(
            "allgather", lambda: self._pg.allgather(output_tensors, input_tensors, *args)
        )

    def abort(self) -> None:
        self._pg.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pg, name)


def _trace_collectives(manager: list[Manager]) -> None:
    real_connect = process_group.connect
    late = at_step("WORKER_ENTER_LATE_AT")
    enter_late = [late] if late is not None else []

    def connect(**kwargs: Any) -> Any:
        return _TracedGroup(real_connect(**kwargs), manager, enter_late)

    process_group.connect = connect  # the manager calls it through the module


def _slow_vote(manager: Manager) -> None:
    slow = at_step("WORKER_SLOW_VOTE_AT")
    if slow is None:
        return
    vote = manager.should_commit
    pending = [slow]

    def should_commit() -> bool:
        if pending and pending[0][0] == manager.step:
            _, seconds = pending.pop()
            say(f"SLOW_VOTE step={manager.step}")
            time.sleep(seconds)
        return vote()

    manager.should_commit = should_commit  # type: ignore[method-assign]


def main() -> None:
    logs.configure("json")
    steps = int(os.environ.get("WORKER_STEPS", "6"))
    pause_at = int(os.environ.get("WORKER_PAUSE_AT", "-1"))
    inner_sleep = float(os.environ.get("WORKER_INNER_SLEEP", "0"))
    out = open(os.environ["WORKER_LOG"], "a", buffering=1)  # noqa: SIM115
    if os.environ.get("WORKER_SLOW_SERVE"):
        _stall_heal_serving(int(os.environ["WORKER_SLOW_SERVE"]))
    manager_ref: list[Manager] = []
    _trace_collectives(manager_ref)

    torch.manual_seed(0)  # every group starts from the same weights
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    manager = Manager()
    manager_ref.append(manager)
    _slow_vote(manager)
    if os.environ.get("WORKER_WAIT_START"):
        say("READY")  # alive at the lighthouse, not yet joined
        sys.stdin.readline()
    group = int(manager.config.replica_group_id) * 100 + manager.config.rank
    data = torch.Generator().manual_seed(group)

    streaming = {
        "fragments": int(os.environ.get("WORKER_FRAGMENTS", "1")),
        "sync_delay": int(os.environ.get("WORKER_SYNC_DELAY", "0")),
        "compression": os.environ.get("WORKER_COMPRESSION", "fp32"),
        "error_feedback": bool(os.environ.get("WORKER_COMPRESSION")),
    }
    diloco = DiLoCo(
        manager,
        model,
        inner,
        outer,
        sync_every=4,
        **streaming,
        dylu=bool(os.environ.get("WORKER_DYLU")),
        mode="async" if os.environ.get("WORKER_MODE") == "async" else "sync",
        grace=0.3,
        momentum_every=2,
    )
    if os.environ.get("WORKER_RESUME"):  # before entering: the first outer step needs it
        step = manager.step if manager.resume() else -1
        pairs = zip(diloco.params, diloco.backup, strict=True)
        same = all(torch.equal(p.detach(), b) for p, b in pairs)
        say(f"RESUMED {step} {state_hash(diloco)} {same}")
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
            "pid": os.getpid(),
            "incarnation": getattr(manager, "incarnation", str(os.getpid())),
            "history": getattr(manager, "history", None),
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
            "local_steps": report.local_steps,
            "staleness": report.staleness,
            # The outer optimizer's settings after this step (set-outer-lr changes them).
            "outer_lr": outer.param_groups[0]["lr"],
            "outer_momentum": outer.param_groups[0]["momentum"],
            "time": time.time(),
        }
        out.write(json.dumps(record, default=str) + "\n")
        say(f"STEP {report.step} {'committed' if report.committed else 'rolled_back'}")
        if 0 <= pause_at <= manager.step:
            pause_at = -1  # once
            say("PAUSED")
            sys.stdin.readline()

    with manager, diloco:
        if manager.checkpoint_directory() is not None:
            manager.install_sigterm_handler()
        log_sync()  # the step joined on entering
        while manager.step < steps:
            if inner_sleep:
                time.sleep(inner_sleep)
            x = torch.randn(16, 32, generator=data)
            loss = (model(x) - x[:, :8]).pow(2).mean()
            loss.backward()
            inner.step()
            inner.zero_grad()
            log_sync()
    say("DONE")


def _stall_heal_serving(from_step: int) -> None:
    copy_chunk = StateServer._copy_chunk
    seconds = float(os.environ.get("WORKER_SLOW_SERVE_SECONDS", "3600"))
    stalls = [seconds]

    def stalled(self: StateServer, publication: Any, *args: Any) -> bool:
        if publication.step >= from_step and stalls:
            say("SERVING")
            time.sleep(stalls[0] if seconds < 3600 else 3600)
            if seconds < 3600:
                stalls.clear()  # once: the transfer then goes through
        return copy_chunk(self, publication, *args)

    StateServer._copy_chunk = stalled  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
