"""What every fault test and the soak share: starting groups, and one history checker.

``check_history`` reads every JSONL record of every process a test started
(restarted incarnations included) and checks the invariants the product
promises (DESIGN.md):

- I1 / I7, one history: every committed step number has exactly one state
  (one hash of global weights + outer optimizer state) over the whole job;
  ``History.forks`` lists the steps that have more;
- I2, nothing lost: a rolled-back outer step left the group exactly at its
  backup (the synced slice's weights equal the backup) holding the job's state
  at its step, and within one incarnation the step never goes back and
  committed steps strictly increase (a committed step is never undone).

``assert_one_history`` fails with every violation named.  The time helpers read
the JSON log lines (structlog, ISO timestamps) the workers and the lighthouse
print, so a test times events from the processes' own clocks and logs.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.procs import Proc, free_port

WORKER = "tests/workers/diloco_worker.py"

Record = dict[str, Any]


def start_group(
    procs: list[Proc],
    url: str,
    group: int,
    log: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    master_port: int = 0,
    **env: str,
) -> Proc:
    """One rank of a replica group running the test worker (FTDILOCO_TIMEOUT 20 s unless given)."""
    proc = Proc(
        f"group{group}.{rank}",
        [sys.executable, WORKER],
        env={
            "FTDILOCO_LIGHTHOUSE": url,
            "REPLICA_GROUP_ID": str(group),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port or free_port()),
            "FTDILOCO_TIMEOUT": "20",
            "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
            "WORKER_LOG": str(log),
            **env,
        },
    )
    procs.append(proc)
    return proc


def records(log: Path) -> list[Record]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def all_records(logs: Iterable[Path]) -> list[Record]:
    return [r for log in logs for r in records(log)]


@dataclass
class History:
    """What one job's records say, over every process and restart."""

    by_step: dict[int, set[str]]  # committed step -> the hashes reported for it
    committed: int  # committed records
    rolled_back: int  # rolled-back records
    problems: list[str] = field(default_factory=list)  # I2 violations

    @property
    def forks(self) -> dict[int, set[str]]:
        """Committed steps with more than one state (I1 says: none)."""
        return {s: h for s, h in sorted(self.by_step.items()) if len(h) > 1}

    @property
    def steps(self) -> list[int]:
        return sorted(self.by_step)

    def describe(self) -> str:
        lines = []
        forks = self.forks
        if forks:
            first, last = min(forks), max(forks)
            lines.append(
                f"I1: {len(forks)} committed steps have two or more states "
                f"(steps {first}..{last}; e.g. step {first}: {sorted(forks[first])})"
            )
        lines += [f"I2: {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"... and {len(self.problems) - 20} more I2 violations")
        return "\n".join(lines)


def _incarnation(r: Record) -> tuple[str, int, str]:
    return (str(r["group"]), int(r["rank"]), str(r.get("incarnation", r.get("pid"))))


def check_history(logs: Iterable[Path]) -> History:
    recs = all_records(logs)
    by_step: dict[int, set[str]] = defaultdict(set)
    for r in recs:
        if r["committed"]:
            by_step[int(r["step"])].add(str(r["hash"]))
    # The state every group starts from: the job's state at step 0.
    initial = {str(r["hash"]) for r in recs if int(r["step"]) == 0 and not r["committed"]}
    history = History(
        by_step=dict(by_step),
        committed=sum(bool(r["committed"]) for r in recs),
        rolled_back=sum(not r["committed"] for r in recs),
    )
    if len(initial) > 1:
        history.problems.append(f"groups rolled back to different states at step 0: {initial}")
    per_process: dict[tuple[str, int, str], list[Record]] = defaultdict(list)
    for r in recs:
        per_process[_incarnation(r)].append(r)
    for (group, rank, inc), mine in per_process.items():
        who = f"group {group} rank {rank} incarnation {inc}"
        last_step, last_committed = -1, -1
        for r in mine:  # in the order the process wrote them
            step = int(r["step"])
            if step < last_step:
                history.problems.append(f"{who} went back from step {last_step} to {step}")
            if r["committed"]:
                if step <= last_committed:
                    history.problems.append(
                        f"{who} committed step {step} after committing {last_committed}"
                    )
                last_committed = step
            else:
                if not r["rolled_back_to_backup"]:
                    history.problems.append(
                        f"{who}: rolled back at step {step} but not to its backup"
                    )
                known = by_step.get(step) if step > 0 else initial
                if known and str(r["hash"]) not in known:
                    history.problems.append(
                        f"{who}: rolled back at step {step} to a state no group committed "
                        f"({r['hash']} not in {sorted(known)})"
                    )
            last_step = max(last_step, step)
    return history


def assert_one_history(logs: Iterable[Path]) -> History:
    """I1 and I2 over every record of every process (restarts included)."""
    history = check_history(logs)
    assert not history.forks and not history.problems, history.describe()
    return history


# -- times from the processes' own JSON log lines ----------------------------------------


def log_events(proc: Proc, event: str, **fields: Any) -> list[tuple[float, dict[str, Any]]]:
    """(unix time, record) for each structlog JSON line of ``proc`` with that event."""
    found = []
    for line in list(proc.output):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") != event or any(rec.get(k) != v for k, v in fields.items()):
            continue
        found.append((datetime.fromisoformat(rec["timestamp"]).timestamp(), rec))
    return found


def line_times(proc: Proc, text: str) -> list[float]:
    """Arrival times of ``proc``'s lines containing ``text`` (seen from the test)."""
    return [t for t, line in list(proc.stamped) if text in line]


def blocked_in_collective(proc: Proc, step: int) -> bool:
    """Its last collective at ``step`` was issued and never returned (from its own lines)."""
    entered = done = -1
    for i, line in enumerate(list(proc.output)):
        if line.startswith(f"IN_COLLECTIVE step={step}"):
            entered = i
        elif line.startswith((f"COLLECTIVE_DONE step={step}", f"COLLECTIVE_FAILED step={step}")):
            done = i
    return entered > done


def first_to_print(procs: Iterable[Proc], text: str, timeout: float) -> Proc:
    """The first of ``procs`` whose output has a line containing ``text``."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if any(text in line for line in list(proc.output)):
                return proc
        time.sleep(0.005)
    tails = "\n".join(f"{p.name}:\n{p.tail(10)}" for p in procs)
    raise TimeoutError(f"none printed {text!r} in {timeout}s:\n{tails}")
