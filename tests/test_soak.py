"""Chaos soak: four groups under random SIGKILL + restart, SIGSTOP/SIGCONT and lighthouse kills.

Runs in CI's second stage (`scripts/test -m soak`).  At least ten minutes in
all (SOAK_SECONDS, default 600), split between plain DiLoCo and streaming
DiLoCo (two fragments, sync delay 1, int8 exchange), with a seeded RNG
(SOAK_SEED) choosing the faults and their moments.  Every group writes one
record per outer step (committed or rolled back); over the whole run:

- I1 / I7: every committed step has one state, over every process and restart;
- I2: every rollback restored the backup, no committed step is undone;
- I3: the longest stall of the job (time between consecutive commits of any
  step) stays within the deadline (FTDILOCO_TIMEOUT);
- I4: every restarted group heals and commits again, and at the end every
  group commits;
- the share of outer steps committed (group-steps committed / attempted)
  stays above a floor.

A summary table is printed (`pytest -s` shows it) and written, with the fault
log, to ``soak_summary.json`` under the test's tmp directory.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.chaos_support import check_history, records, start_group
from tests.procs import Proc, free_port, process_pool, start_lighthouse

TOTAL_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
SEED = int(os.environ.get("SOAK_SEED", "1234"))

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(TOTAL_SECONDS * 2 + 600))]

GROUPS = 4
TIMEOUT = 10.0  # FTDILOCO_TIMEOUT: the deadline the longest stall is held to
HEARTBEAT_TIMEOUT_MS = 1500
MIN_COMMITTED_SHARE = 0.75
LIGHTHOUSE_FLAGS = (
    "--min-replicas",
    "2",
    "--join-timeout-ms",
    "3000",
    "--heartbeat-timeout-ms",
    str(HEARTBEAT_TIMEOUT_MS),
)
PHASES: dict[str, dict[str, str]] = {
    "plain": {},
    "streaming": {"WORKER_FRAGMENTS": "2", "WORKER_SYNC_DELAY": "1", "WORKER_COMPRESSION": "int8"},
}
FAULTS = ("kill", "kill", "freeze", "lighthouse")


def _committed(line: str) -> bool:
    return line.startswith("STEP ") and line.split()[2:3] == ["committed"]


def committed_step(proc: Proc, timeout: float = 120) -> int:
    """The next step the group reports as committed (rolled-back steps do not count)."""
    return int(proc.wait_line(_committed, timeout=timeout, what="a committed STEP").split()[1])


def _run_phase(tmp: Path, name: str, env: dict[str, str], seconds: float) -> dict[str, Any]:
    rng = random.Random(f"{SEED}-{name}")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logs: list[Path] = []
    faults: list[dict[str, Any]] = []
    restarted: dict[Path, float] = {}  # a restarted incarnation's log -> when it started
    lifetime: dict[Path, float] = {}  # how long it ran before it was killed again

    with process_pool(tmp / "out") as procs:
        lighthouse, url = start_lighthouse(procs, *LIGHTHOUSE_FLAGS, port=port)

        def launch(group: int) -> Proc:
            log = tmp / f"g{group}-{len(logs)}.jsonl"
            logs.append(log)
            proc = start_group(
                procs,
                url,
                group,
                log,
                WORKER_STEPS="1000000000",  # the soak ends the job
                FTDILOCO_TIMEOUT=str(int(TIMEOUT)),
                NUM_REPLICA_GROUPS=str(GROUPS),
                **env,
            )
            log_of[proc.pid] = log
            return proc

        log_of: dict[int, Path] = {}
        running = {g: launch(g) for g in range(GROUPS)}
        for proc in running.values():
            committed_step(proc)
        began = time.time()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            # The fault schedule itself: a random moment, not a synchronisation.
            time.sleep(rng.uniform(4.0, 12.0))
            for group, proc in running.items():
                assert proc.alive, f"group {group} died on its own:\n{proc.tail()}"
            assert lighthouse.alive, f"the lighthouse died on its own:\n{lighthouse.tail()}"
            kind = rng.choice(FAULTS)
            victim = rng.randrange(GROUPS)
            fault: dict[str, Any] = {"time": time.time(), "kind": kind}
            if kind == "kill":
                running[victim].kill()
                dead = log_of[running[victim].pid]
                if dead in restarted:
                    lifetime[dead] = time.time() - restarted[dead]
                running[victim] = launch(victim)  # at once, same REPLICA_GROUP_ID
                restarted[logs[-1]] = time.time()
                fault["group"] = victim
            elif kind == "freeze":
                frozen_for = rng.uniform(0.5, 6.0)
                running[victim].freeze()
                time.sleep(frozen_for)  # how long the fault lasts
                running[victim].thaw()
                fault.update(group=victim, seconds=round(frozen_for, 2))
            else:
                lighthouse.kill()
                lighthouse, _ = start_lighthouse(procs, *LIGHTHOUSE_FLAGS, port=port)
            faults.append(fault)
        # I4 at the end: every group, restarted ones included, commits again.
        for proc in running.values():
            for _ in range(2):
                committed_step(proc, timeout=3 * TIMEOUT + 30)
        ended = time.time()

    history = check_history(logs)
    recs = [r for log in logs for r in records(log)]
    during = [r for r in recs if began <= float(r["time"]) <= ended]
    first_commit: dict[int, float] = {}
    for r in recs:
        if r["committed"]:
            step = int(r["step"])
            first_commit[step] = min(first_commit.get(step, float("inf")), float(r["time"]))
    times = sorted(t for t in first_commit.values() if began <= t <= ended)
    edges = [began, *times, ended]
    gaps = [(b - a, a) for a, b in itertools.pairwise(edges)]
    stall, stall_at = max(gaps)
    before = [f for f in faults if f["time"] <= stall_at + stall]
    committed = sum(bool(r["committed"]) for r in during)
    # Restarted incarnations that lived long enough must have healed and committed.
    never_back = []
    for log in restarted:
        if lifetime.get(log, float("inf")) < TIMEOUT + 20:
            continue  # killed again before it could be expected back
        mine = records(log)
        done = [r for r in mine if r["committed"]]
        if not done:
            never_back.append(log.name)
        else:
            first = mine.index(done[0])
            if not any(r["healed"] for r in mine[: first + 1]):
                never_back.append(f"{log.name} (committed without healing)")
    return {
        "phase": name,
        "seconds": round(ended - began, 1),
        "faults": dict(Counter(f["kind"] for f in faults)),
        "fault_log": faults,
        "steps_committed": len(times),
        "group_steps_committed": committed,
        "group_steps_attempted": len(during),
        "committed_share": round(committed / max(1, len(during)), 3),
        "longest_stall_s": round(stall, 2),
        "longest_stall_after": before[-1] if before else None,
        "forks": len(history.forks),
        "fork_steps": sorted(history.forks)[:20],
        "i2_violations": history.problems[:20],
        "restarts_not_back": never_back,
        "processes": len(logs),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("phase", "phase"),
        ("seconds", "s"),
        ("faults", "faults"),
        ("steps_committed", "steps"),
        ("committed_share", "committed share"),
        ("longest_stall_s", "longest stall s"),
        ("forks", "forks"),
        ("i2_violations", "I2 violations"),
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        value = row[key]
        if key == "faults":
            return " ".join(f"{k}={v}" for k, v in sorted(value.items()))
        if key == "i2_violations":
            return str(len(value))
        return str(value)

    cells = [[title for _, title in cols]] + [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells
    )


def test_chaos_soak_keeps_one_history(tmp_path: Path) -> None:
    per_phase = TOTAL_SECONDS / len(PHASES)
    summary = [_run_phase(tmp_path / name, name, env, per_phase) for name, env in PHASES.items()]
    table = _table(summary)
    print(f"\nchaos soak (seed {SEED}, {TOTAL_SECONDS:g}s of faults)\n{table}")
    out = tmp_path / "soak_summary.json"
    out.write_text(json.dumps({"seed": SEED, "phases": summary}, indent=2, default=str))
    print(f"summary: {out}")
    for row in summary:
        phase = row["phase"]
        assert row["forks"] == 0, f"{phase}: forked steps {row['fork_steps']}"
        assert not row["i2_violations"], f"{phase}: {row['i2_violations']}"
        assert row["longest_stall_s"] <= TIMEOUT, (
            f"{phase}: the job made no commit for {row['longest_stall_s']}s "
            f"(after {row['longest_stall_after']}), beyond the {TIMEOUT:g}s deadline"
        )
        assert row["committed_share"] >= MIN_COMMITTED_SHARE, row
        assert not row["restarts_not_back"], f"{phase}: {row['restarts_not_back']}"
        assert sum(row["faults"].values()) >= 1
