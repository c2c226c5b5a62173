"""Outer step benchmark: the manager's allreduce against raw gloo, and the stall a kill causes.

    python bench/outer_step.py [--quick] [--json PATH] [--only overhead|stall]

1. Manager overhead.  Two replica groups (one process each, a real lighthouse
   process, configured through FTDILOCO_*) average a 10M-parameter model
   (float32, 22 tensors: an embedding, two transformer blocks, a final norm).
   The same two processes also hold a raw gloo group, and every round runs
   each variant once, in an order that rotates from round to round (so drift
   and noise hit all alike), on freshly refilled data, after a barrier:
   - raw flat: one ``allreduce`` of a preallocated 10M tensor (the floor);
   - raw flat, then ``div_(2)``: what averaging costs when done plainly;
   - raw per tensor: 22 ``allreduce`` calls issued at once, then waited;
   - manager, 22 tensors: only ``manager.allreduce(tensors).wait()``, the
     quorum before and the vote after untimed (bench/lighthouse.py times the
     lighthouse round trip);
   - manager, one flat tensor: the same with one contiguous 10M tensor (what
     DiLoCo sends: its pseudo-gradients live in one flat buffer);
   - full outer step: start_quorum + allreduce + should_commit.
   A round's time is the slower process's.  Ratios are of medians; "paired"
   is the median of the per-round ratios.  The headline,
   ``manager_overhead_ratio``, is median(manager, 22 tensors) / median(raw flat).

2. Failure stall.  Four groups train DiLoCo on a small model at a fixed pace
   (5 inner steps of 20 ms, then an outer step); the lighthouse's heartbeat
   timeout is 5 s and its join timeout 30 s, so only a closed connection can
   explain a fast recovery.  One group is SIGKILLed between syncs, right after
   an outer step committed; once the other three have committed a few steps
   together, a second one is SIGKILLed mid-allreduce: inside the outer step's
   allreduce, while the others wait on it there.  For each survivor:
   - between syncs: stall = (first commit after the kill - the commit just
     before it) - the normal interval between commits;
   - mid-allreduce: stall = (first commit after the kill - the kill) - the
     normal interval.  The interrupted step is rolled back, so the survivors
     redo its inner steps; that work is lost, the stall is the time beyond it.
   The normal interval is the median time between the survivor's commits
   before the kill, with as many groups taking part as at the kill.  The worse
   survivor counts; ``kill_stall_s`` is the worst of both kills (and of the
   three runs of the full benchmark).  The groups share the machine (one
   intra-op thread each), so a loaded machine stretches the intervals and
   blurs the stall; the load average is printed.

BENCH_BUCKET_BYTES / BENCH_DIRECT_BYTES in the environment override the
manager's constants in the groups, for tuning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, percentile, print_table, write_json  # noqa: E402
from ftdiloco.coordination import process_group  # noqa: E402
from ftdiloco.operate.launch.processes import free_port  # noqa: E402
from tests.procs import Proc, process_pool, start_lighthouse, temporary_log  # noqa: E402

WORKER = str(ROOT / "bench" / "_outer_worker.py")
GOAL_RATIO = 1.02
GOAL_STALL_S = 0.3
TORCHFT_RATIO = 1.19


def start_group(procs: list[Proc], url: str, group: int, mode: str, **env: str) -> Proc:
    proc = Proc(
        f"group{group}",
        [sys.executable, WORKER, mode],
        {
            "FTDILOCO_LIGHTHOUSE": url,
            "REPLICA_GROUP_ID": str(group),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "FTDILOCO_HOST": "127.0.0.1",
            "FTDILOCO_TIMEOUT": "30",
            "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
            **env,
        },
        log=temporary_log(f"outer-step-group{group}"),
    )
    procs.append(proc)
    return proc


# -- 1. manager overhead ------------------------------------------------------------------


def measure_overhead(reps: int) -> tuple[dict[str, list[float]], int, int]:
    """Per variant, per round: the slower process's seconds."""
    # The rendezvous store the groups' own process groups use.
    store = process_group.host_store("127.0.0.1", 0, timeout=60)
    with contextlib.closing(store), process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2", "--join-timeout-ms", "30000")
        env = {"BENCH_STORE": f"127.0.0.1:{store.port}", "BENCH_REPS": str(reps)}
        groups = [start_group(procs, url, g, "overhead", **env) for g in (0, 1)]
        results = [g.next_event(timeout=60 + reps * 5) for g in groups]
    per_rank = [r["times"] for r in results]
    times = {
        name: [max(pair) for pair in zip(*(t[name] for t in per_rank), strict=True)]
        for name in per_rank[0]
    }
    return times, int(results[0]["total"]), int(results[0]["tensors"])


# -- 2. failure stall -----------------------------------------------------------------


def measure_stalls(warm_steps: int) -> dict[str, dict[str, Any]]:
    """Four groups; SIGKILL one between syncs, then, once three run, one mid-allreduce.

    Per kill, the worse survivor's stall.
    """
    with process_pool() as procs:
        _, url = start_lighthouse(
            procs,
            "--min-replicas",
            "1",
            "--heartbeat-timeout-ms",
            "5000",
            "--join-timeout-ms",
            "30000",
        )
        at = str(warm_steps)
        between = start_group(
            procs, url, 0, "train", BENCH_VICTIM="between", BENCH_AT=at, BENCH_GROUPS="4"
        )
        mid = start_group(procs, url, 1, "train", BENCH_VICTIM="mid", BENCH_AT=at, BENCH_GROUPS="3")
        survivors = [start_group(procs, url, g, "train") for g in (2, 3)]
        histories: list[list[dict[str, Any]]] = [[], []]
        kills = {}
        dead: list[Proc] = []
        for victim, proc in (("between", between), ("mid", mid)):
            running = [p for p in procs if p not in dead]
            event = _next_stop(proc, running, deadline=time.monotonic() + 120)
            if victim == "mid":
                time.sleep(0.05)  # the survivors are inside the allreduce, waiting on it
            killed = time.monotonic()
            proc.kill()
            dead.append(proc)
            last = int(event["step"])  # the victim's last committed step
            kills[victim] = (killed, last)
            for syncs, survivor in zip(histories, survivors, strict=True):
                _syncs_until(survivor, last + 1, syncs)
    return {
        victim: max(
            (_stall(syncs, victim, killed, last) for syncs in histories),
            key=lambda r: float(r["stall_s"]),
        )
        for victim, (killed, last) in kills.items()
    }


def _next_stop(proc: Proc, procs: list[Proc], deadline: float) -> dict[str, Any]:
    """The victim's ``paused`` or ``hanging`` report; fails if any process has died."""
    while True:
        for other in procs:
            if other.popen.poll() is not None:
                raise RuntimeError(f"{other.name} exited early\n{other.tail()}")
        event = proc.next_event(timeout=max(0.0, deadline - time.monotonic()))
        if event["kind"] in ("paused", "hanging"):
            return event
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} did not stop in time\n{proc.tail()}")


def _stall(syncs: list[dict[str, Any]], victim: str, killed: float, last: int) -> dict[str, Any]:
    """One survivor's stall after the kill of ``victim`` (last committed step ``last``)."""
    commits = {e["step"]: e for e in syncs if e["committed"]}
    # Normal: the intervals between the commits with as many groups as at the kill.
    groups = commits[last]["participants"]
    normal = statistics.median(
        commits[s + 1]["time"] - commits[s]["time"]
        for s in range(last)
        if s in commits and commits[s]["participants"] == commits[s + 1]["participants"] == groups
    )
    start = commits[last]["time"] if victim == "between" else killed
    rolled_back = [
        e["time"] - killed
        for e in syncs
        if not e["committed"] and killed < e["time"] < commits[last + 1]["time"]
    ]
    if victim == "mid" and not rolled_back:
        raise AssertionError("the interrupted outer step should have been rolled back")
    timeline = [
        (round(e["time"] - killed, 3), e["committed"], e["participants"], round(e["seconds"], 3))
        for e in syncs
        if killed - 1 < e["time"] <= commits[last + 1]["time"]
    ]
    return {
        "stall_s": commits[last + 1]["time"] - start - normal,
        "normal_s": normal,
        "groups": groups,
        "rolled_back_after_s": rolled_back[0] if rolled_back else None,
        "timeline": timeline,
    }


def _syncs_until(proc: Proc, step: int, syncs: list[dict[str, Any]]) -> None:
    """Append a survivor's outer steps to ``syncs`` until it has committed ``step``."""
    while not any(e["committed"] and e["step"] >= step for e in syncs):
        event = proc.next_event(timeout=60)
        if event["kind"] == "sync":
            syncs.append(event)


# -- report ---------------------------------------------------------------------------


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} / {percentile(values, 90) * 1e3:.1f}"


def overhead_report(reps: int) -> tuple[list[Row], dict[str, Any]]:
    times, total, count = measure_overhead(reps)
    floor = statistics.median(times["raw_flat"])

    def ratio(name: str) -> float:
        return statistics.median(times[name]) / floor

    def paired(name: str) -> float:
        """The median of per-round ratios: drift between rounds cancels."""
        pairs = zip(times[name], times["raw_flat"], strict=True)
        return statistics.median(a / b for a, b in pairs)

    labels = {
        "raw_flat": "raw gloo, one flat tensor",
        "raw_flat_div": "raw gloo, one flat tensor, then div_(2)",
        "raw_per_tensor": f"raw gloo, {count} async allreduces",
        "manager_tensors": f"manager.allreduce({count} tensors)",
        "manager_flat": "manager.allreduce(one flat tensor)",
        "full_step": "full outer step (quorum+allreduce+vote)",
    }
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    rows = [
        Row("setup", "model", f"{total / 1e6:.2f}M float32 in {count} tensors, 2 groups"),
        Row("setup", "rounds", f"{reps}, variants interleaved; OMP_NUM_THREADS={threads}"),
    ]
    rows += [Row(label, "ms median / p90", ms(times[name])) for name, label in labels.items()]
    for name in ("raw_flat_div", "raw_per_tensor", "manager_tensors", "manager_flat", "full_step"):
        goal, met = "", None
        if name == "manager_tensors":
            goal, met = f"<= {GOAL_RATIO} (torchft {TORCHFT_RATIO})", ratio(name) <= GOAL_RATIO
        value = f"{ratio(name):.3f} (paired {paired(name):.3f})"
        rows.append(Row(labels[name], "÷ raw flat, medians", value, goal, met))
    metrics = {
        "manager_overhead_ratio": round(ratio("manager_tensors"), 4),
        "manager_overhead_paired_ratio": round(paired("manager_tensors"), 4),
        "manager_flat_ratio": round(ratio("manager_flat"), 4),
        "raw_per_tensor_ratio": round(ratio("raw_per_tensor"), 4),
        "raw_flat_div_ratio": round(ratio("raw_flat_div"), 4),
        "full_step_ratio": round(ratio("full_step"), 4),
        "median_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()},
        "p90_ms": {k: round(percentile(v, 90) * 1e3, 3) for k, v in times.items()},
        "rounds": reps,
        "params": total,
    }
    return rows, metrics


def stall_report(repeats: int, warm_steps: int) -> tuple[list[Row], dict[str, Any]]:
    runs = [measure_stalls(warm_steps) for _ in range(repeats)]
    rows: list[Row] = []
    metrics: dict[str, Any] = {}
    worst = max(run[victim]["stall_s"] for run in runs for victim in run)
    for victim, label in (("between", "kill between syncs"), ("mid", "kill mid-allreduce")):
        results = [run[victim] for run in runs]
        stall = max(r["stall_s"] for r in results)
        normal = statistics.median(r["normal_s"] for r in results)
        each = ", ".join(f"{r['stall_s'] * 1e3:.0f}" for r in results)
        groups = results[0]["groups"]
        rows.append(
            Row(label, f"survivor's normal outer step ms ({groups} groups)", f"{normal * 1e3:.0f}")
        )
        rows.append(
            Row(
                label,
                "survivor stall ms (worst of runs)",
                f"{stall * 1e3:.0f} ({each})",
                f"<= {GOAL_STALL_S * 1e3:.0f}",
                stall <= GOAL_STALL_S,
            )
        )
        if victim == "mid":
            detected = max(r["rolled_back_after_s"] for r in results)
            rows.append(
                Row(label, "kill -> survivor's step rolled back ms", f"{detected * 1e3:.0f}")
            )
            metrics["kill_mid_rolled_back_after_s"] = round(detected, 4)
        metrics[f"kill_stall_{victim}_s"] = [round(r["stall_s"], 4) for r in results]
        metrics[f"kill_normal_step_{victim}_s"] = round(normal, 4)
        # (seconds since the kill, committed, participants, sync seconds) of the
        # worst run's worse survivor, from a second before the kill to its recovery.
        metrics[f"kill_timeline_{victim}"] = max(results, key=lambda r: r["stall_s"])["timeline"]
    metrics["kill_stall_s"] = round(worst, 4)
    return rows, metrics


def main() -> None:
    # SIGTERM leaves through the finally blocks, which end the children by pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    flags = parser(__doc__.split("\n")[0])
    flags.add_argument("--only", choices=("overhead", "stall"), help="run one part")
    args = flags.parse_args()
    load = os.getloadavg()[0]
    rows = [Row("setup", "machine", f"{os.cpu_count()} CPUs, load average {load:.1f} at start")]
    metrics: dict[str, Any] = {"cpus": os.cpu_count(), "load_average": round(load, 2)}
    if args.only in (None, "overhead"):
        part_rows, part_metrics = overhead_report(20 if args.quick else 100)
        rows += part_rows
        metrics.update(part_metrics)
    if args.only in (None, "stall"):
        part_rows, part_metrics = stall_report(1 if args.quick else 3, 6 if args.quick else 12)
        rows += part_rows
        metrics.update(part_metrics)
    print_table(rows)
    write_json(args.json, metrics)


if __name__ == "__main__":
    main()
