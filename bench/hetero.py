"""Groups of unequal speed: fixed H against DyLU and asynchronous DiLoCo (issue 14).

Three groups train the example GPT; one sleeps after every inner step so that
it runs at about half the speed of the others.  Each mode gets the same
wall-clock budget.  Measured from the groups' outer-step lines:

* idle fraction of the fast groups: the time their inner loop waited in outer
  steps, over their training time (with fixed H they wait for the slow group);
* committed outer steps per minute;
* the held-out loss of the global weights at the end of the budget (every
  group evaluates the same committed weights; the last one a fast group saw).

    .venv/bin/python bench/hetero.py [--quick] [--json PATH]

CPU work of other processes on the machine skews the rates: report
``/proc/loadavg`` with the figures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from lighthouse.cli import LISTENING, listening_url  # noqa: E402

GROUPS = 3
SLOW = 2  # the group index that runs at half speed
_STEP = re.compile(
    r"outer step (?P<step>\d+) \| loss \S+(?: \| eval (?P<eval>[\d.]+))? \|.*"
    r"waited (?P<waited>[\d.]+)s.*\| (?P<outcome>committed|rolled back)"
)


@dataclass
class GroupRun:
    """What one group printed."""

    index: int
    first_line: float | None = None
    last_line: float | None = None
    waited: float = 0.0
    committed: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)

    def read(self, line: str) -> None:
        m = _STEP.search(line)
        if m is None:
            return
        now = time.monotonic()
        if self.first_line is None:
            self.first_line = now  # the first step aligns everyone: count from there
        else:
            self.waited += float(m["waited"])
        self.last_line = now
        if m["outcome"] == "committed":
            self.committed += 1
            if m["eval"] is not None:
                self.evals.append((int(m["step"]), float(m["eval"])))


def run_mode(mode: str, budget: float, step_seconds: float) -> dict[str, float]:
    """One job of three groups in ``mode`` (fixed, dylu, async) for ``budget`` seconds."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        NUM_REPLICA_GROUPS=str(GROUPS),
        FTDILOCO_MIN_REPLICAS="2",
        FTDILOCO_HOST="127.0.0.1",
        FTDILOCO_TIMEOUT="30",
        FTDILOCO_DYLU="1" if mode == "dylu" else "0",
        FTDILOCO_MODE="async" if mode == "async" else "sync",
        FTDILOCO_ASYNC_GRACE="0.2",
        PYTHONUNBUFFERED="1",
    )
    lighthouse = subprocess.Popen(
        [sys.executable, "-m", "lighthouse.cli", "--bind", "127.0.0.1:0", "--min-replicas", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    procs: list[subprocess.Popen[str]] = [lighthouse]
    runs = [GroupRun(i) for i in range(GROUPS)]
    try:
        assert lighthouse.stdout is not None
        url = None
        for line in lighthouse.stdout:
            if LISTENING in line:
                url = listening_url(line)
                break
        assert url is not None, "the lighthouse did not say where it listens"
        threading.Thread(target=lighthouse.stdout.read, daemon=True).start()
        readers = []
        for run in runs:
            pace = step_seconds * (2 if run.index == SLOW else 1)
            group_env = {**env, "FTDILOCO_LIGHTHOUSE": url, "REPLICA_GROUP_ID": str(run.index)}
            command = [
                sys.executable,
                "-m",
                "ftdiloco.examples.train_diloco",
                *("--model-size", "tiny", "--outer-steps", "100000", "--sync-every", "20"),
                *("--eval-every", "1", "--eval-batches", "2", "--sample-bytes", "0"),
                *("--slowdown", f"{pace:g}", "--seed", "0"),
            ]
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=group_env,
            )
            procs.append(proc)
            reader = threading.Thread(target=_read, args=(proc, run), daemon=True)
            reader.start()
            readers.append(reader)
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if any(p.poll() is not None for p in procs[1:]):
                raise RuntimeError(f"a group exited early in mode {mode}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
    fast = [r for r in runs if r.index != SLOW]
    idle = [
        r.waited / (r.last_line - r.first_line)
        for r in fast
        if r.first_line is not None and r.last_line is not None and r.last_line > r.first_line
    ]
    trained = [r.last_line - r.first_line for r in fast if r.first_line and r.last_line]
    last_eval = max((e for r in fast for e in r.evals), default=(0, float("nan")))
    return {
        "idle": sum(idle) / len(idle) if idle else float("nan"),
        "steps_per_min": max(r.committed for r in fast) / (max(trained) / 60) if trained else 0.0,
        "eval": last_eval[1],
        "step": float(last_eval[0]),
    }


def _read(proc: subprocess.Popen[str], run: GroupRun) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        run.read(line)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--pace",
        type=float,
        default=0.03,
        metavar="S",
        help="sleep per inner step of a fast group; the slow one sleeps twice as long (0.03)",
    )
    args = p.parse_args()
    budget = 45.0 if args.quick else 150.0
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    results = {mode: run_mode(mode, budget, args.pace) for mode in ("fixed", "dylu", "async")}
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    fixed = results["fixed"]["eval"]
    rows = []
    for mode, r in results.items():
        goal = "" if mode == "fixed" else "<= 0.05"
        met = None if mode == "fixed" else r["idle"] <= 0.05
        rows.append(Row(mode, "idle fraction of the fast groups", f"{r['idle']:.3f}", goal, met))
        rows.append(Row(mode, "committed outer steps / min", f"{r['steps_per_min']:.1f}"))
        rows.append(
            Row(mode, f"eval loss at {budget:.0f}s (step {r['step']:.0f})", f"{r['eval']:.3f}")
        )
        if mode != "fixed":
            ratio = r["eval"] / fixed
            rows.append(Row(mode, "eval loss / fixed H", f"{ratio:.3f}", "< 1.0", ratio < 1.0))
    print_table(rows)
    write_json(
        args.json,
        {
            "idle_fixed": results["fixed"]["idle"],
            "idle_dylu": results["dylu"]["idle"],
            "idle_async": results["async"]["idle"],
            "loss_ratio_dylu": results["dylu"]["eval"] / fixed,
            "loss_ratio_async": results["async"]["eval"] / fixed,
            **{f"steps_per_min_{m}": r["steps_per_min"] for m, r in results.items()},
            **{f"eval_{m}": r["eval"] for m, r in results.items()},
            "budget_s": budget,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
