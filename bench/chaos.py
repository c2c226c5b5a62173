"""Chaos benchmark: what faults cost a DiLoCo job, with real processes and real signals.

    python bench/chaos.py [--quick] [--json PATH]

The groups run the integration tests' worker (tests/workers/diloco_worker.py:
DiLoCo on a tiny model, 4 inner steps per outer step, each paced to 50 ms so
an outer period is ~0.25 s and CPU contention does not dominate), started and
signalled with tests/procs.py, and every scenario's records go through the
tests' history checker (tests/chaos_support.py).

1. ``goodput_20s``: three groups (``--min-replicas 2``).  The same job runs
   twice in one bench run, first without faults, then with a random fault
   every 20 s (SIGKILL + same-id restart, SIGSTOP for 2-5 s then SIGCONT, or
   a lighthouse SIGKILL + restart on its port); each run's group-steps
   committed (the sum of participants over committed steps) per minute; the
   metric is faulty / clean.  Goal >= 0.90.
2. ``restart2_to_commit_s``: two groups (``--min-replicas 2``); group 0 is
   SIGKILLed right after a commit and restarted at once with the same
   REPLICA_GROUP_ID; the time from the restart to its first joint commit,
   median of 5 (3 with --quick).  Goal: at most its own start (imports and
   connect, measured: spawn -> "manager ready") + one outer period.
   ``restart2_rolled_back``: the survivor's rolled-back steps per restart
   (mean); goal <= 1.
3. ``frozen_release_ms``: three groups, heartbeat timeout 1000 ms; group 1 is
   SIGSTOPped while blocked in the collective (its own IN_COLLECTIVE line, a
   peer entering 0.5 s late); the time from the SIGSTOP to the survivors'
   rollback (the later survivor's "outer step rolled back" log line), median
   of 3 (1 with --quick).  Goal <= heartbeat timeout + 100 ms.
4. ``forks``: committed steps with two states over every scenario.  Goal 0.

The machine is shared (load average printed): a loaded machine stretches
every time here.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from tests.chaos_support import (  # noqa: E402
    check_history,
    log_events,
    records,
    start_group,
)
from tests.procs import Proc, free_port, process_pool, start_lighthouse  # noqa: E402

PACE = {"WORKER_INNER_SLEEP": "0.05", "WORKER_STEPS": "1000000000"}
GOAL_GOODPUT = 0.90
GOAL_ROLLED_BACK = 1.0
HEARTBEAT_TIMEOUT_MS = 1000
FAULT_EVERY_S = 20.0


def _committed(line: str) -> bool:
    return line.startswith("STEP ") and line.split()[2:3] == ["committed"]


def _flags(min_replicas: int, heartbeat_ms: int = 1500) -> tuple[str, ...]:
    return (
        "--min-replicas",
        str(min_replicas),
        "--join-timeout-ms",
        "3000",
        "--heartbeat-timeout-ms",
        str(heartbeat_ms),
    )


# -- 1. goodput under a fault every 20 s ----------------------------------------------------


def _goodput_run(tmp: Path, seconds: float, faults: bool, rng: random.Random) -> dict[str, Any]:
    port = free_port()
    logs: list[Path] = []
    done: list[str] = []
    env = {**PACE, "FTDILOCO_TIMEOUT": "10", "NUM_REPLICA_GROUPS": "3"}
    with process_pool() as procs:
        lighthouse, url = start_lighthouse(procs, *_flags(2), port=port)

        def launch(group: int) -> Proc:
            logs.append(tmp / f"g{group}-{len(logs)}.jsonl")
            return start_group(procs, url, group, logs[-1], **env)

        running = {g: launch(g) for g in range(3)}
        for proc in running.values():
            proc.wait_line(_committed, timeout=120)
        began = time.time()
        end = began + seconds
        next_fault = began + FAULT_EVERY_S * rng.uniform(0.5, 1.0)
        while faults and next_fault < end:
            time.sleep(max(0.0, next_fault - time.time()))  # the fault schedule
            kind = rng.choice(("kill", "freeze", "lighthouse"))
            victim = rng.randrange(3)
            if kind == "kill":
                running[victim].kill()
                running[victim] = launch(victim)
            elif kind == "freeze":
                running[victim].freeze()
                time.sleep(rng.uniform(2.0, 5.0))  # how long the fault lasts
                running[victim].thaw()
            else:
                lighthouse.kill()
                lighthouse, _ = start_lighthouse(procs, *_flags(2), port=port)
            done.append(kind)
            next_fault += FAULT_EVERY_S
        time.sleep(max(0.0, end - time.time()))  # the measured window
    committed = [
        r for log in logs for r in records(log) if r["committed"] and began <= r["time"] <= end
    ]
    # One record per group per committed step: the group-steps committed.
    return {
        "per_min": len(committed) / seconds * 60,
        "faults": done,
        "forks": len(check_history(logs).forks),
    }


def goodput(tmp: Path, quick: bool) -> dict[str, Any]:
    seconds = 60.0 if quick else 180.0
    rng = random.Random(20)
    clean = _goodput_run(tmp / "clean", seconds, False, rng)
    faulty = _goodput_run(tmp / "faulty", seconds, True, rng)
    return {
        "goodput_20s": faulty["per_min"] / clean["per_min"],
        "clean_per_min": clean["per_min"],
        "faulty_per_min": faulty["per_min"],
        "faults": faulty["faults"],
        "forks": clean["forks"] + faulty["forks"],
    }


# -- 2. two groups, same-id restart ---------------------------------------------------------


def restart2(tmp: Path, quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 5
    env = {**PACE, "FTDILOCO_TIMEOUT": "10"}
    logs = [tmp / "survivor.jsonl", tmp / "g0-0.jsonl"]
    restarts: list[tuple[float, float, Path]] = []
    with process_pool() as procs:
        _, url = start_lighthouse(procs, *_flags(2))
        start_group(procs, url, 1, logs[0], **env)
        group0 = start_group(procs, url, 0, logs[1], **env)
        for n in range(reps):
            for _ in range(6):
                group0.wait_line(_committed, timeout=120)
            group0.kill()
            logs.append(tmp / f"g0-{n + 1}.jsonl")
            spawned = time.time()
            group0 = start_group(procs, url, 0, logs[-1], **env)
            group0.wait_for("manager ready", timeout=60)
            restarts.append((spawned, time.time(), logs[-1]))
        for _ in range(3):
            group0.wait_line(_committed, timeout=60)
    survivor = records(logs[0])
    times = [r["time"] for r in survivor if r["committed"] and r["participants"] == 2]
    times = [t for t in times if t < restarts[0][0]]
    period = statistics.median(b - a for a, b in itertools.pairwise(times))
    took, imports, lost = [], [], []
    for spawned, ready, log in restarts:
        joint = [r for r in records(log) if r["committed"] and r["participants"] == 2]
        first = joint[0]["time"] if joint else float("inf")
        took.append(first - spawned)
        imports.append(ready - spawned)
        lost.append(
            sum(1 for r in survivor if not r["committed"] and spawned - 1 <= r["time"] <= first)
        )
    return {
        "restart2_to_commit_s": statistics.median(took),
        "restart2_goal_s": statistics.median(imports) + period,
        "restart2_imports_s": statistics.median(imports),
        "outer_period_s": period,
        "restart2_rolled_back": statistics.mean(lost),
        "restart2_rolled_back_max": max(lost),
        "forks": len(check_history(logs).forks),
    }


# -- 3. a member frozen inside the collective -----------------------------------------------


def frozen(tmp: Path, quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 3
    at = 6
    released, forks = [], 0
    for n in range(reps):
        logs = [tmp / f"rep{n}-g{g}.jsonl" for g in range(3)]
        env = {**PACE, "FTDILOCO_TIMEOUT": "5", "NUM_REPLICA_GROUPS": "3"}
        with process_pool() as procs:
            _, url = start_lighthouse(procs, *_flags(2, HEARTBEAT_TIMEOUT_MS))
            survivors = [start_group(procs, url, 0, logs[0], **env)]
            victim = start_group(procs, url, 1, logs[1], **env)
            survivors.append(
                start_group(procs, url, 2, logs[2], WORKER_ENTER_LATE_AT=f"{at}:0.5", **env)
            )
            victim.wait_for(f"IN_COLLECTIVE step={at}", timeout=120)
            victim.freeze()
            stopped = time.time()
            for proc in survivors:
                proc.wait_for(f"STEP {at} rolled_back", timeout=30)
            victim.thaw()
            victim.wait_line(_committed, timeout=30)
            rollbacks = [
                min(t for t, _ in log_events(p, "outer step rolled back") if t >= stopped)
                for p in survivors
            ]
        released.append((max(rollbacks) - stopped) * 1000)
        forks += len(check_history(logs).forks)
    return {"frozen_release_ms": statistics.median(released), "forks": forks}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="ftdiloco-chaos-") as tmp_dir:
        tmp = Path(tmp_dir)
        for sub in ("goodput", "restart2", "frozen"):
            (tmp / sub).mkdir()
        for sub in ("clean", "faulty"):
            (tmp / "goodput" / sub).mkdir()
        r = restart2(tmp / "restart2", args.quick)
        f = frozen(tmp / "frozen", args.quick)
        g = goodput(tmp / "goodput", args.quick)
    forks = r["forks"] + f["forks"] + g["forks"]
    frozen_goal = HEARTBEAT_TIMEOUT_MS + 100
    rows = [
        Row(
            "fault every 20 s",
            "goodput_20s",
            f"{g['goodput_20s']:.3f} ({g['faulty_per_min']:.0f} / {g['clean_per_min']:.0f}"
            f" group-steps/min; {', '.join(g['faults'])})",
            f">= {GOAL_GOODPUT}",
            g["goodput_20s"] >= GOAL_GOODPUT,
        ),
        Row(
            "2 groups, same-id restart",
            "restart2_to_commit_s",
            f"{r['restart2_to_commit_s']:.2f}",
            f"<= {r['restart2_goal_s']:.2f} (start {r['restart2_imports_s']:.2f}"
            f" + period {r['outer_period_s']:.2f})",
            r["restart2_to_commit_s"] <= r["restart2_goal_s"],
        ),
        Row(
            "2 groups, same-id restart",
            "restart2_rolled_back",
            f"{r['restart2_rolled_back']:.2f} (max {r['restart2_rolled_back_max']})",
            f"<= {GOAL_ROLLED_BACK:g}",
            r["restart2_rolled_back"] <= GOAL_ROLLED_BACK,
        ),
        Row(
            "SIGSTOP in the collective",
            "frozen_release_ms",
            f"{f['frozen_release_ms']:.0f}",
            f"<= {frozen_goal}",
            f["frozen_release_ms"] <= frozen_goal,
        ),
        Row("all scenarios", "forks", str(forks), "0", forks == 0),
    ]
    print_table(rows)
    write_json(
        args.json,
        {
            "goodput_20s": g["goodput_20s"],
            "goodput_clean_per_min": g["clean_per_min"],
            "goodput_faulty_per_min": g["faulty_per_min"],
            "goodput_faults": g["faults"],
            "restart2_to_commit_s": r["restart2_to_commit_s"],
            "restart2_goal_s": r["restart2_goal_s"],
            "restart2_rolled_back": r["restart2_rolled_back"],
            "frozen_release_ms": f["frozen_release_ms"],
            "frozen_release_goal_ms": frozen_goal,
            "forks": forks,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
