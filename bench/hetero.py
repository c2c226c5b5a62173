"""Groups of unequal speed: fixed H against DyLU and asynchronous DiLoCo (issue 14).

Three groups train the example GPT; every inner step of one of them takes
twice as long as the same step of the others (it sleeps as long as the step
took: half speed on any machine, whatever the load), and every group sleeps
``--pace`` in each step so that the three leave each other some CPU.  Each
mode gets the same wall-clock budget.  Measured from the groups' outer-step
lines and logs, from their second outer step on (the first aligns them):

* idle fraction of the fast groups: the time their inner loop waited in outer
  steps, over their training time (with fixed H they wait for the slow group),
  and of it the share spent joining and healing (the manager's "quorum"
  lines): the rest is the exchange, the vote and the outer step themselves;
* committed outer steps per minute;
* the held-out loss of the global weights at the end of the budget (every
  group evaluates the same committed weights; the last one a fast group saw).

    .venv/bin/python bench/hetero.py [--quick] [--json PATH] [--modes fixed,dylu,async]
                                     [--logs DIR] [--pace S]

CPU work of other processes on the machine skews the rates: report
``/proc/loadavg`` with the figures.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from tests.procs import Proc, process_pool, start_lighthouse, temporary_log  # noqa: E402

GROUPS = 3
SLOW = 2  # the group index that runs at half speed
SLOWDOWN = 2.0  # how many times longer each of its inner steps takes
_AS_GROUP = "--as-group"
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
    # Of ``waited``: seconds in the quorum (the manager's "quorum" log lines:
    # joining until the quorum formed, and a heal), the first one left out.
    in_quorum: float = 0.0
    quorums: int = 0

    def read(self, line: str, now: float) -> None:
        """One line of its output, which arrived at ``now``."""
        m = _STEP.search(line)
        if m is None:
            return
        if self.first_line is None:
            self.first_line = now  # the first step aligns everyone: count from there
        else:
            self.waited += float(m["waited"])
        self.last_line = now
        if m["outcome"] == "committed":
            self.committed += 1
            if m["eval"] is not None:
                self.evals.append((int(m["step"]), float(m["eval"])))

    def trained(self) -> float:
        """Seconds from its first outer-step line to its last (0: fewer than two)."""
        if self.first_line is None or self.last_line is None:
            return 0.0
        return self.last_line - self.first_line

    def read_log(self, line: str) -> None:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "quorum":
                self.quorums += 1
                if self.quorums > 1:
                    self.in_quorum += float(record.get("seconds", 0.0))


def run_mode(
    mode: str, budget: float, step_seconds: float, logs: Path | None = None
) -> dict[str, float]:
    """One job of three groups in ``mode`` (fixed, dylu, async) for ``budget`` seconds.

    ``logs``: a directory for each process's stderr (``NAME.log``: where it
    waited, the manager's "quorum" lines say for how long) and stdout
    (``NAME-PID.log``, with arrival times).
    """
    env = dict(
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
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)

    def log(name: str) -> IO[str]:
        return temporary_log(name) if logs is None else (logs / f"{name}.log").open("w")

    runs = [GroupRun(i) for i in range(GROUPS)]
    with process_pool(save_to=logs) as procs:
        _, url = start_lighthouse(
            procs, "--min-replicas", "2", env=env, log=log(f"{mode}-lighthouse")
        )
        groups = []
        for run in runs:
            factor = SLOWDOWN if run.index == SLOW else 1.0
            command = [
                sys.executable,
                __file__,
                *(_AS_GROUP, f"{factor:g}", f"{step_seconds:g}", "--"),
                *("--model-size", "tiny", "--outer-steps", "100000", "--sync-every", "20"),
                *("--eval-every", "1", "--eval-batches", "2", "--sample-bytes", "0"),
                *("--seed", "0"),
            ]
            name = f"{mode}-g{run.index}"
            group_env = {**env, "FTDILOCO_LIGHTHOUSE": url, "REPLICA_GROUP_ID": str(run.index)}
            groups.append(Proc(name, command, group_env, log=log(name)))
            procs.append(groups[-1])
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if not all(proc.alive for proc in groups):
                raise RuntimeError(f"a group exited early in mode {mode}")
        for run, proc in zip(runs, groups, strict=True):
            proc.kill()
            for arrived, line in list(proc.stamped):
                run.read(line, arrived)
            assert proc.log is not None
            proc.log.flush()
            for line in Path(proc.log.name).read_text(errors="replace").splitlines():
                run.read_log(line)
    fast = [r for r in runs if r.index != SLOW and r.trained() > 0]
    idle = [r.waited / r.trained() for r in fast]
    in_quorum = [r.in_quorum / r.trained() for r in fast]
    trained = [r.trained() for r in fast]
    last_eval = max((e for r in fast for e in r.evals), default=(0, float("nan")))
    return {
        "idle": sum(idle) / len(idle) if idle else float("nan"),
        "in_quorum": sum(in_quorum) / len(in_quorum) if in_quorum else float("nan"),
        "steps_per_min": max(r.committed for r in fast) / (max(trained) / 60) if trained else 0.0,
        "eval": last_eval[1],
        "step": float(last_eval[0]),
    }


def run_group(factor: float, pace: float, argv: list[str]) -> int:
    """The example, each inner step stretched to ``factor`` times its own length.

    The example's ``--slowdown`` sleeps a fixed time, which is half speed on
    one machine and a mild slowdown on a slower or busier one; here each inner
    step sleeps ``pace`` plus, on the slow group, as long again as the step
    itself took.  The step is timed from the end of the previous one (after
    its outer step, if any) to the inner optimizer's ``step``: forward,
    backward and data, the work a slower machine would do slower.
    """
    import torch
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    from ftdiloco.examples import train_diloco

    inner: list[torch.optim.Optimizer] = []  # the first optimizer that steps: AdamW
    ended: list[float] = []  # when the previous inner step ended (none: the first is untimed)

    def before(optimizer: torch.optim.Optimizer, *_: object) -> None:
        if not inner:
            inner.append(optimizer)
        if optimizer is inner[0]:
            took = time.perf_counter() - ended[0] if ended else 0.0
            time.sleep(factor * pace + (factor - 1.0) * took)

    def after(optimizer: torch.optim.Optimizer, *_: object) -> None:
        if optimizer is inner[0]:
            ended[:] = [time.perf_counter()]  # global hooks run after DiLoCo's outer step

    register_optimizer_step_pre_hook(before)
    register_optimizer_step_post_hook(after)
    return train_diloco.main(argv)


def main() -> int:
    if sys.argv[1:2] == [_AS_GROUP]:
        factor, pace, _, *argv = sys.argv[2:]
        return run_group(float(factor), float(pace), argv)
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--pace",
        type=float,
        default=0.05,
        metavar="S",
        help="sleep per inner step of every group, so that three groups on a small machine"
        " are not bound by its CPU (then nobody gains by not waiting);"
        f" the slow group's steps take {SLOWDOWN:g} times as long in all (0.05)",
    )
    p.add_argument(
        "--modes",
        default="fixed,dylu,async",
        help="which modes to run, comma-separated (fixed,dylu,async)",
    )
    p.add_argument("--logs", type=Path, metavar="DIR", help="keep every process's output here")
    args = p.parse_args()
    budget = 45.0 if args.quick else 150.0
    modes = args.modes.split(",")
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    results = {mode: run_mode(mode, budget, args.pace, args.logs) for mode in modes}
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    fixed = results["fixed"]["eval"] if "fixed" in results else float("nan")
    rows = []
    for mode, r in results.items():
        goal = "" if mode == "fixed" else "<= 0.05"
        met = None if mode == "fixed" else r["idle"] <= 0.05
        rows.append(Row(mode, "idle fraction of the fast groups", f"{r['idle']:.3f}", goal, met))
        rows.append(Row(mode, "  of which joining and healing", f"{r['in_quorum']:.3f}"))
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
            **{f"idle_{m}": r["idle"] for m, r in results.items()},
            **{f"in_quorum_{m}": r["in_quorum"] for m, r in results.items()},
            **{f"loss_ratio_{m}": r["eval"] / fixed for m, r in results.items() if m != "fixed"},
            **{f"steps_per_min_{m}": r["steps_per_min"] for m, r in results.items()},
            **{f"eval_{m}": r["eval"] for m, r in results.items()},
            "budget_s": budget,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
