"""DiLoCo-SWARM (issue 13): quality, communication, routing and a kill, with real processes.

Every pipeline is the example GPT cut into 2 stages (``ftdiloco.examples.train_swarm``),
each stage a room of one lighthouse; every worker is a process of its own.

* **Quality at equal tokens.**  One worker trains the whole model (in this
  process) on as many micro-batches as the pipelines' first stages draw in
  all; *synchronous SWARM* averages each stage's workers after every inner
  step (DiLoCo with H=1, outer lr 1, no momentum: plain averaging);
  *DiLoCo-SWARM* averages every H steps (H=50; ``--quick`` H=10 on fewer
  steps).  Each reports the held-out loss through its whole pipeline at the
  end.  ``swarm_diloco_loss_ratio`` = DiLoCo-SWARM / synchronous SWARM;
  ``stage_sync_ratio`` = stage syncs (committed outer steps, both stages) of
  synchronous SWARM / DiLoCo-SWARM.
* **Routing.**  Stage 1's worker 1 computes 2x slower (``--slowdown 2``: it
  sleeps as long again as its compute took).  Throughput = micro-batches the
  first stage finished per second, in the middle of the run, with
  throughput-weighted routing (SWARM's rule) and uniform routing (the
  report's code); ``weighted_routing_speedup`` = weighted / uniform.
* **A kill.**  Stage 1's worker 1 is SIGKILLed mid-run.  For each first-stage
  worker: its gap between micro-batches across the kill minus its median gap
  before; ``kill_pipeline_stall_s`` is the worst.

    .venv/bin/python bench/swarm.py [--quick] [--json PATH]

The machine's other work skews every time: the load average is printed at
the start and the end; read the figures with it.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from ftdiloco.config import Config  # noqa: E402
from ftdiloco.examples.model import GPT, MODEL_SIZES, default_corpus  # noqa: E402
from ftdiloco.examples.train_diloco import (  # noqa: E402
    build_loader,
    forever,
    heldout_batches,
    split_heldout,
)
from ftdiloco.examples.train_swarm import next_token_loss  # noqa: E402
from tests.chaos_support import records  # noqa: E402
from tests.procs import Proc, process_pool, start_lighthouse, temporary_log  # noqa: E402

# A worker's outer step 1 is the start's sync (no inner step before it): N outer steps of
# training are --outer-steps N + 1.
BATCH = 8
LR = 1e-3
SEED = 0
_FINAL_EVAL = re.compile(r"final eval (?P<eval>[\d.]+|nan)")


@dataclass(frozen=True)
class Sizes:
    steps: int  # inner steps of each first-stage worker, quality runs
    h: int  # DiLoCo-SWARM's sync interval
    routing_steps: int  # micro-batches of each of the 4 first-stage workers, routing runs
    kill_after: int  # micro-batches of each first-stage worker before the kill
    kill_steps: int  # each first-stage worker's micro-batches, kill run


FULL = Sizes(steps=500, h=50, routing_steps=100, kill_after=40, kill_steps=100)
QUICK = Sizes(steps=100, h=10, routing_steps=40, kill_after=20, kill_steps=50)


@dataclass
class Job:
    """What a pipeline's processes left: records per stage, first-stage finish times, output."""

    stage_records: dict[int, list[dict[str, object]]]
    times: dict[int, list[float]]  # first-stage worker -> wall time of each finished micro-batch
    final_eval: float
    extra: dict[str, float] = field(default_factory=dict)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_job(
    tmp: Path,
    flags: Sequence[str],
    *,
    per_worker: Mapping[tuple[int, int], Sequence[str]] | None = None,
    during: Callable[[dict[tuple[int, int], Proc], dict[int, Path]], dict[str, float]]
    | None = None,
    widths: tuple[int, int] = (2, 2),
    timeout: float = 900.0,
) -> Job:
    """A lighthouse with rooms stage0, stage1 and ``widths`` workers in them, to the end.

    ``during`` runs once everything started (it may kill a worker) and returns
    figures to keep.  A worker killed by ``during`` is not waited for.
    """
    tmp.mkdir(parents=True)
    logs = {stage: tmp / f"stage{stage}.jsonl" for stage in (0, 1)}
    times = {w: tmp / f"times{w}.txt" for w in range(widths[0])}
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--rooms", "stage0,stage1", log=temporary_log("lh"))
        workers: dict[tuple[int, int], Proc] = {}
        for s in (0, 1):
            for w in range(widths[s]):
                argv = [
                    sys.executable,
                    "-m",
                    "ftdiloco.examples.train_swarm",
                    *("--stage", str(s), "--stages", "2", "--records", str(logs[s])),
                    *("--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(SEED)),
                    *("--eval-every", "1000000", "--upstream-grace", "2"),
                    *(("--times", str(times[w])) if s == 0 else ()),
                    *flags,
                    *(per_worker or {}).get((s, w), ()),
                ]
                env = {
                    "FTDILOCO_LIGHTHOUSE": url,
                    "REPLICA_GROUP_ID": str(w),
                    "NUM_REPLICA_GROUPS": str(widths[s]),
                    "FTDILOCO_TIMEOUT": "30",
                    "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
                    "OMP_NUM_THREADS": "1",
                }
                proc = Proc(f"stage{s}.worker{w}", argv, env, log=temporary_log(f"s{s}w{w}"))
                procs.append(proc)
                workers[s, w] = proc
        extra = during(workers, times) if during is not None else {}
        deadline = time.monotonic() + timeout
        for proc in workers.values():
            if proc.alive or proc.popen.returncode != -9:
                code = proc.wait(max(1.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"{proc.name} exited {code}:\n{proc.tail()}")
        final = _FINAL_EVAL.search("".join(workers[0, 0].output))
    return Job(
        {s: records(logs[s]) for s in (0, 1)},
        {w: _read_times(path) for w, path in times.items()},
        float(final["eval"]) if final else math.nan,
        extra,
    )


def _read_times(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def stage_syncs(job: Job) -> int:
    """Committed outer steps of both stages (each stage's distinct steps) that followed inner
    steps: the start's sync, before any, averages nothing."""
    return sum(
        len({r["step"] for r in job.stage_records[s] if r["committed"] and r["inner_steps"]})
        for s in (0, 1)
    )


def single_worker(steps: int) -> float:
    """The whole model trained by one worker for ``steps`` micro-batches; its held-out loss."""
    torch.manual_seed(SEED)
    gpt = GPT(MODEL_SIZES["tiny"])
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=LR, betas=(0.9, 0.95))
    train_text, heldout = split_heldout(default_corpus())
    block = gpt.config.block_size
    config = Config.from_env({"FTDILOCO_LIGHTHOUSE": "none"})
    batches = forever(build_loader(train_text, block, BATCH, SEED, config))
    for _, (x, y) in zip(range(steps), batches, strict=False):
        _, loss = gpt(x, y)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gpt.eval()
    with torch.no_grad():
        losses = [
            float(next_token_loss(gpt(x)[0], y))
            for x, y in heldout_batches(heldout, block, BATCH, 8)
        ]
    return sum(losses) / len(losses)


def throughput(job: Job) -> float:
    """First-stage micro-batches per second over the middle 70 % of the run (warm-up and the
    final outer step left out)."""
    merged = sorted(t for ts in job.times.values() for t in ts)
    window = merged[len(merged) // 5 : len(merged) * 9 // 10]
    if len(window) < 2:
        return math.nan
    return (len(window) - 1) / (window[-1] - window[0])


# Routing runs: 4 senders keep stage 1 busy (2 synchronous senders never queue at a
# worker, so which one they pick would hardly matter); bigger micro-batches make compute,
# not HTTP, the cost of each.
ROUTING_WIDTHS = (4, 2)
ROUTING_BATCH = 32


def routing_flags(routing: str) -> dict[tuple[int, int], tuple[str, ...]]:
    """Stage 1's worker 1 at half speed; stage 1 does not sync during the run, so that its
    workers take as many micro-batches as routing gives them (a stage's outer step waits
    until each worker took H: it would even their shares out whatever the rule)."""
    flags: dict[tuple[int, int], tuple[str, ...]] = {
        (s, w): ("--routing", routing, "--batch-size", str(ROUTING_BATCH))
        for s in (0, 1)
        for w in range(ROUTING_WIDTHS[s])
    }
    for w in range(ROUTING_WIDTHS[1]):
        flags[1, w] += ("--sync-every", "1000000")
    flags[1, 1] += ("--slowdown", "2")
    return flags


def kill_stage_worker(
    after: int,
) -> Callable[[dict[tuple[int, int], Proc], dict[int, Path]], dict[str, float]]:
    """SIGKILL stage 1's worker 1 once each first-stage worker finished ``after`` micro-batches."""

    def during(workers: dict[tuple[int, int], Proc], times: dict[int, Path]) -> dict[str, float]:
        deadline = time.monotonic() + 600
        while min(len(_read_times(p)) for p in times.values()) < after:
            if time.monotonic() > deadline or not all(p.alive for p in workers.values()):
                raise RuntimeError("the pipeline did not reach the kill point")
            time.sleep(0.05)  # polling files the workers append to; nothing else to wait on
        killed_at = time.time()
        workers[1, 1].kill()
        return {"killed_at": killed_at}

    return during


def kill_stall(job: Job) -> float:
    """Worst first-stage worker's gap across the kill minus its median gap before it."""
    killed_at = job.extra["killed_at"]
    stalls = []
    for ts in job.times.values():
        before = [t for t in ts if t <= killed_at]
        after = [t for t in ts if t > killed_at]
        if len(before) < 3 or not after:
            return math.nan
        normal = statistics.median(b - a for a, b in itertools.pairwise(before))
        stalls.append(after[0] - before[-1] - normal)
    return max(stalls)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    sizes = QUICK if args.quick else FULL
    load_start = loadavg()
    print(f"load average at start: {load_start} ({os.cpu_count()} cores)", flush=True)
    with TemporaryDirectory(prefix="bench-swarm-") as tmp_dir:
        tmp = Path(tmp_dir)
        single = single_worker(2 * sizes.steps)
        print(f"single worker: eval {single:.4f}", flush=True)
        sync = run_job(
            tmp / "sync",
            ("--outer-steps", str(sizes.steps + 1), "--sync-every", "1"),
            per_worker={(s, w): ("--outer-lr", "1", "--outer-momentum", "0") for s, w in _PAIRS},
        )
        print(f"synchronous SWARM: eval {sync.final_eval:.4f}", flush=True)
        diloco = run_job(
            tmp / "diloco",
            ("--outer-steps", str(sizes.steps // sizes.h + 1), "--sync-every", str(sizes.h)),
        )
        print(f"DiLoCo-SWARM: eval {diloco.final_eval:.4f}", flush=True)
        rates = {}
        for routing in ("weighted", "uniform"):
            job = run_job(
                tmp / routing,
                ("--outer-steps", "2", "--sync-every", str(sizes.routing_steps)),
                per_worker=routing_flags(routing),
                widths=ROUTING_WIDTHS,
            )
            rates[routing] = throughput(job)
            print(f"{routing} routing: {rates[routing]:.2f} micro-batches/s", flush=True)
        killed = run_job(
            tmp / "kill",
            ("--outer-steps", "2", "--sync-every", str(sizes.kill_steps)),
            during=kill_stage_worker(sizes.kill_after),
        )
    load_end = loadavg()
    loss_ratio = diloco.final_eval / sync.final_eval
    sync_ratio = stage_syncs(sync) / max(1, stage_syncs(diloco))
    speedup = rates["weighted"] / rates["uniform"]
    stall = kill_stall(killed)
    tokens = f"{2 * sizes.steps} x {BATCH} seqs"
    rows = [
        Row("single worker", f"eval loss ({tokens})", f"{single:.4f}"),
        Row("sync SWARM (H=1)", f"eval loss ({tokens})", f"{sync.final_eval:.4f}"),
        Row(f"DiLoCo-SWARM (H={sizes.h})", f"eval loss ({tokens})", f"{diloco.final_eval:.4f}"),
        Row(
            "DiLoCo / sync",
            "swarm_diloco_loss_ratio",
            f"{loss_ratio:.4f}",
            "<= 1.01",
            loss_ratio <= 1.01,
        ),
        Row("sync / DiLoCo", "stage_sync_ratio", f"{sync_ratio:.1f}", ">= 50", sync_ratio >= 50),
        Row("routing, 1 worker 2x slow", "weighted mb/s", f"{rates['weighted']:.2f}"),
        Row("routing, 1 worker 2x slow", "uniform mb/s", f"{rates['uniform']:.2f}"),
        Row(
            "weighted / uniform",
            "weighted_routing_speedup",
            f"{speedup:.2f}",
            ">= 1.3",
            speedup >= 1.3,
        ),
        Row(
            "stage worker SIGKILLed",
            "kill_pipeline_stall_s",
            f"{stall:.2f}",
            "<= 1 s",
            stall <= 1.0,
        ),
    ]
    print()
    print_table(rows)
    print(f"load average: start {load_start}, end {load_end} ({os.cpu_count()} cores)")
    write_json(
        args.json,
        {
            "quick": args.quick,
            "h": sizes.h,
            "single_eval_loss": single,
            "sync_swarm_eval_loss": sync.final_eval,
            "diloco_swarm_eval_loss": diloco.final_eval,
            "swarm_diloco_loss_ratio": loss_ratio,
            "stage_sync_ratio": sync_ratio,
            "weighted_throughput": rates["weighted"],
            "uniform_throughput": rates["uniform"],
            "weighted_routing_speedup": speedup,
            "kill_pipeline_stall_s": stall,
            "load_start": load_start,
            "load_end": load_end,
        },
    )


_PAIRS = [(s, w) for s in (0, 1) for w in (0, 1)]

if __name__ == "__main__":
    main()
