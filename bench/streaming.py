"""Streaming DiLoCo benchmark: how much of the sync the inner loop hides, per wire format.

    python bench/streaming.py [--quick] [--json PATH]

Two replica groups (bench/_streaming_worker.py, one process each, one torch
thread each) and a lighthouse process on this machine, talking over loopback.
Every run trains from the same seed on the same data (each group its own
shard) for a fixed number of inner steps; the parent releases both groups'
runs at the same moment.  The two worker processes live through all runs; each
DiLoCo run has its own Manager under a fresh replica id.

1. Throughput, on a model where a full-precision sync is a large share of an
   outer period: a wide MLP (many parameters, little compute per step: batch
   16, an outer step every 8 inner steps).  Configurations: plain DiLoCo
   (1 fragment, sync_delay 0) and streaming DiLoCo (2 fragments, sync_delay
   3) per wire format; --quick: plain fp32, streaming fp32 and int8, once;
   full: all ten, in 3 rounds of rotated order.  The baseline is measured
   inside every run, because this machine is shared and its load drifts from
   one run to the next: the same two processes also train the same number of
   inner steps without DiLoCo (no manager, no sync; both groups at once, so
   they share the cores as in the DiLoCo steps) just before entering DiLoCo
   and again just after leaving it, and the run's standalone rate is over
   both windows (a steady drift cancels).  A configuration's ratio is the
   median over rounds of (DiLoCo steps/s / its own run's standalone steps/s).
   Reported per configuration: inner steps/s over the timed steps (after an
   untimed outer period; the mean of the two groups) and that ratio; bytes per
   outer step (SyncReport.bytes_sent summed over one outer period's
   fragments); the mean SyncReport.hidden_fraction; per outer step the exposed
   time ((1/rate - 1/standalone rate) x sync_every) and the training thread's
   time inside DiLoCo's step hook, split into the quorum (joined on the
   training thread in plain DiLoCo; streaming joins on its sync thread),
   SyncReport.waited, the commit vote and the rest (DiLoCo's own work:
   pseudo-gradients, backups, the outer optimizer, and in plain DiLoCo the
   encoding and decoding); and the CPU time per outer step beyond the same
   run's standalone steps (all threads of a process: the sync thread's,
   gloo's and the manager's included).  The outer optimizer is SGD with
   Nesterov momentum, fused (one pass over its tensors), as we recommend.

2. Loss, on the example GPT ('tiny') and the default corpus: streaming
   DiLoCo with each wire format (--quick: fp32 and int8; full: every format,
   plain fp32 and int8 with error feedback) for the same number of inner
   steps; at the end every fragment is synced and the global weights are
   evaluated on held-out windows of the corpus (the last 256, which no group
   trains on).  Both groups must end with identical weights.

Goals (from the issue): streaming + int8 hides >= 90 % of communication
(mean hidden_fraction >= 0.9 and throughput >= 0.9 x standalone), int8 sends
>= 4x fewer bytes than fp32, and its held-out loss is within 1 % of fp32's.

Limits of this machine: on loopback, "communication" is CPU work (copies
through the kernel, gloo's threads, encoding and decoding) on the same few
cores the two groups train on, so what streaming can hide is bounded by
CPU, not by a network; compressing saves bytes but spends CPU.  No link
shaping is available (no tc), so the table states the measured sync time
against the compute time instead of simulating a slow link.  Nor does
sync_delay overlap what the training thread does itself at a fragment's
start and end (the pseudo-gradient, the vote, backups and the outer
optimizer): the table shows that time and the throughput ratio it alone
allows.  Synchronous training also goes at the slower group's pace, while
the standalone rate is the mean of both groups' own: the table shows the
ceiling that alone sets (the slower group's standalone rate / the mean).
The machine is also shared with other work; the standalone range and the
per-configuration ranges show how much the load moved during the run.

Bytes: an int8 payload is one byte per value plus one fp32 scale per block
of 256 values, 1 + 4/256 bytes against fp32's 4 on a two-group ring, so
fp32 / int8 cannot exceed 4 / (1 + 4/256) = 3.94 with these blocks; 4x
exactly would need payloads with no scales at all.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from tests.procs import Proc, process_pool, start_lighthouse, temporary_log  # noqa: E402

WORKER = str(ROOT / "bench" / "_streaming_worker.py")
FORMATS = ("fp32", "bf16", "fp16", "int8", "fp8")
GOAL_HIDDEN = 0.9
GOAL_THROUGHPUT = 0.9
GOAL_BYTES = 4.0
GOAL_LOSS = 0.01  # |int8 / fp32 - 1|

SYNC_EVERY = 8
FRAGMENTS = 2
SYNC_DELAY = 3  # < SYNC_EVERY // FRAGMENTS: one fragment on the wire at a time
ROUNDS = 3
MLP_WIDTH = 2048
MLP_BATCH = 16
GPT_BATCH = 16
GPT_LR = 1e-3
EVAL_WINDOWS = 256  # as in the worker


# -- processes ---------------------------------------------------------------------------


def run_all(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Both groups' results for every run, in order."""
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2", "--join-timeout-ms", "60000")
        groups = []
        for group in range(2):
            env = {
                "BENCH_RUNS": json.dumps(runs),
                "REPLICA_GROUP_ID": str(group),
                "NUM_REPLICA_GROUPS": "2",
                "FTDILOCO_LIGHTHOUSE": url,
                "FTDILOCO_HOST": "127.0.0.1",
                "FTDILOCO_TIMEOUT": "120",
                "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
                "OMP_NUM_THREADS": "1",
            }
            log = temporary_log(f"streaming-group{group}")
            groups.append(Proc(f"group{group}", [sys.executable, WORKER], env, log=log))
            procs.append(groups[-1])
        results = []
        for run in runs:
            for proc in groups:
                event = proc.next_event(timeout=120)
                assert event["kind"] == "ready" and event["name"] == run["name"], event
            for proc in groups:  # release both together
                proc.send("go")
            pair = [proc.next_event(timeout=600) for proc in groups]
            for event in pair:
                assert event["kind"] == "result" and event["name"] == run["name"], event
            results.append(pair)
            print(f"  {run['name']:<28} {summary(run, pair)}", file=sys.stderr, flush=True)
        return results


# -- the runs --------------------------------------------------------------------------


def throughput_runs(quick: bool) -> list[dict[str, Any]]:
    """Every DiLoCo run also times standalone training before and after it."""
    base = {
        "part": "throughput",
        "model": "mlp",
        "width": MLP_WIDTH,
        "batch": MLP_BATCH,
        "sync_every": SYNC_EVERY,
        "warmup": SYNC_EVERY,
        "steps": SYNC_EVERY * (6 if quick else 12),  # long runs: one hiccup weighs less
    }
    if quick:
        configs = [plain("plain fp32", "fp32")]
        configs += [streaming(f"streaming {fmt}", fmt) for fmt in ("fp32", "int8")]
    else:
        configs = [plain(f"plain {fmt}", fmt) for fmt in FORMATS]
        configs += [streaming(f"streaming {fmt}", fmt) for fmt in FORMATS]
    runs = []
    rounds = 1 if quick else ROUNDS
    for r in range(rounds):
        shift = r * len(configs) // rounds
        for config in configs[shift:] + configs[:shift]:  # a rotated order per round
            runs.append({**base, **config, "round": r, "baseline": True})
    return runs


def loss_runs(quick: bool) -> list[dict[str, Any]]:
    base = {
        "part": "loss",
        "model": "tiny",
        "batch": GPT_BATCH,
        "lr": GPT_LR,
        "sync_every": SYNC_EVERY,
        "warmup": 0,
        "steps": SYNC_EVERY * (6 if quick else 50),
        "eval": True,
        "round": 0,
    }
    if quick:
        configs = [streaming("gpt streaming fp32", "fp32"), streaming("gpt streaming int8", "int8")]
    else:
        configs = [plain("gpt plain fp32", "fp32")]
        configs += [streaming(f"gpt streaming {fmt}", fmt) for fmt in FORMATS]
        configs.append({**streaming("gpt streaming int8+ef", "int8"), "error_feedback": True})
    return [{**base, **c} for c in configs]


def plain(name: str, fmt: str) -> dict[str, Any]:
    return {"name": name, "compression": fmt, "fragments": 1, "sync_delay": 0}


def streaming(name: str, fmt: str) -> dict[str, Any]:
    return {
        "name": name,
        "compression": fmt,
        "fragments": FRAGMENTS,
        "sync_delay": SYNC_DELAY,
    }


# -- reading the results ---------------------------------------------------------------------

Result = list[dict[str, Any]]  # both groups' result lines for one run


def rate(pair: Result) -> float:
    """Inner steps/s of the two groups together (the mean of their rates)."""
    return statistics.fmean(r["steps_per_s"] for r in pair)


def timed_reports(pair: Result) -> list[dict[str, Any]]:
    return [rep for r in pair for rep in r["reports"] if rep["timed"]]


def per_outer_step(run: dict[str, Any], pair: Result, key: str) -> float:
    """A group's total of ``key`` over the timed steps, per outer period (mean of groups)."""
    periods = run["steps"] / run["sync_every"]
    return statistics.fmean(r[key] / periods for r in pair)


def report_total(run: dict[str, Any], pair: Result, key: str) -> float:
    """Sum of SyncReport ``key`` over a group's timed steps, per outer period (mean of groups)."""
    periods = run["steps"] / run["sync_every"]
    return statistics.fmean(
        sum(rep[key] for rep in r["reports"] if rep["timed"]) / periods for r in pair
    )


def bytes_per_outer_step(run: dict[str, Any], pair: Result) -> float:
    """What one group sends per outer period (its fragments' syncs together)."""
    return report_total(run, pair, "bytes_sent")


def mean_of(pair: Result, key: str) -> float:
    values = [rep[key] for rep in timed_reports(pair)]
    return statistics.fmean(values) if values else float("nan")


def alone_rate(pair: Result) -> float:
    """Inner steps/s of the same two groups without DiLoCo, over both windows (mean of groups)."""
    return statistics.fmean(
        sum(w["steps_per_s"] * w["seconds"] for w in r["alone"])
        / sum(w["seconds"] for w in r["alone"])
        for r in pair
    )


def straggler_ceiling(pair: Result) -> float:
    """The slower group's standalone rate / the mean: what lockstep training can reach."""
    rates = [
        sum(w["steps_per_s"] * w["seconds"] for w in r["alone"])
        / sum(w["seconds"] for w in r["alone"])
        for r in pair
    ]
    return min(rates) / statistics.fmean(rates)


def alone_cpu(pair: Result) -> float:
    """CPU seconds of a group's standalone window (mean of windows and groups)."""
    return statistics.fmean(w["cpu_s"] for r in pair for w in r["alone"])


def summary(run: dict[str, Any], pair: Result) -> str:
    text = f"{rate(pair):6.2f} steps/s"
    if "alone" in pair[0]:
        text += f" (standalone {alone_rate(pair):6.2f})"
    text += f"  {bytes_per_outer_step(run, pair) / 1e6:7.2f} MB/outer step"
    text += f"  hidden {mean_of(pair, 'hidden_fraction'):.2f}"
    text += f"  in DiLoCo {per_outer_step(run, pair, 'hook_s') * 1e3:.0f} ms/outer step"
    if "eval_loss" in pair[0]:
        text += f"  eval loss {pair[0]['eval_loss']:.4f}"
    return text


def check_runs(runs: list[dict[str, Any]], results: list[Result]) -> None:
    """Every sync committed with both groups; eval runs end with identical weights."""
    for run, pair in zip(runs, results, strict=True):
        for r in pair:
            bad = [rep for rep in r["reports"] if not rep["committed"] or rep["participants"] != 2]
            if bad:
                raise AssertionError(f"{run['name']}: group {r['group']} had failed syncs: {bad}")
        if run.get("eval") and pair[0]["weights"] != pair[1]["weights"]:
            raise AssertionError(f"{run['name']}: the groups ended with different weights")


def overlap(pair: Result) -> float:
    """Of the longer of the groups' standalone windows, the share when both were timing."""
    shares: list[float] = []
    for (a0, a1), (b0, b1) in zip(*([w["window"] for w in r["alone"]] for r in pair), strict=True):
        shares.append(max(0.0, min(a1, b1) - max(a0, b0)) / max(a1 - a0, b1 - b0))
    return min(shares)


@dataclass
class Paired:
    """One DiLoCo run and the standalone windows timed just before and after it."""

    run: dict[str, Any]
    pair: Result

    @property
    def baseline(self) -> float:
        return alone_rate(self.pair)

    @property
    def ratio(self) -> float:
        return rate(self.pair) / self.baseline

    @property
    def exposed(self) -> float:
        """Seconds per outer step beyond standalone's."""
        return (1 / rate(self.pair) - 1 / self.baseline) * float(self.run["sync_every"])


def throughput_report(
    runs: list[dict[str, Any]], results: list[Result]
) -> tuple[list[Row], dict[str, Any]]:
    by_name: dict[str, list[Paired]] = {}
    for run, pair in zip(runs, results, strict=True):
        by_name.setdefault(run["name"], []).append(Paired(run, pair))
    alone = [alone_rate(p) for p in results]
    standalone = statistics.median(alone)
    cpu_alone = statistics.median(
        alone_cpu(p) / run["steps"] for run, p in zip(runs, results, strict=True)
    )
    params = results[0][0]["params"]
    rounds = max(run["round"] for run in runs) + 1

    def med(name: str, value: Callable[[Paired], float]) -> float:
        return statistics.median(value(p) for p in by_name[name])

    def pooled(name: str, key: str) -> float:
        return statistics.fmean(rep[key] for p in by_name[name] for rep in timed_reports(p.pair))

    def per_outer(name: str, key: str) -> float:
        return med(name, lambda p: per_outer_step(p.run, p.pair, key))

    def spread(name: str) -> str:
        ratios = [p.ratio for p in by_name[name]]
        return f"{min(ratios):.2f}..{max(ratios):.2f}"

    def mb(name: str) -> float:
        return med(name, lambda p: bytes_per_outer_step(p.run, p.pair)) / 1e6

    period = SYNC_EVERY / standalone
    plain_sync = per_outer("plain fp32", "hook_s")
    rows = [
        Row(
            "setup",
            "throughput model",
            f"wide MLP ({MLP_WIDTH} wide), {params / 1e6:.2f}M params "
            f"({params * 4 / 1e6:.1f} MB fp32), batch {MLP_BATCH}, sync_every {SYNC_EVERY}, "
            f"{runs[0]['steps']} timed steps per run, {rounds} round(s)",
        ),
        Row(
            "setup",
            "streaming",
            f"fragments {FRAGMENTS}, sync_delay {SYNC_DELAY}; 2 groups x 1 torch thread, "
            f"{os.cpu_count()} CPUs",
        ),
        Row(
            "standalone",
            "steps/s; CPU ms/step (all threads)",
            f"{standalone:.2f} (windows {min(alone):.2f}..{max(alone):.2f}); "
            f"{cpu_alone * 1e3:.0f}; the groups' windows overlap >= "
            f"{min(overlap(p) for p in results):.0%}",
        ),
        Row(
            "standalone",
            "slower group's rate / mean of both (the most lockstep allows)",
            f"{statistics.median(straggler_ceiling(p) for p in results):.3f} (median of runs)",
        ),
        Row(
            "plain fp32",
            "comm vs compute per outer step",
            f"{plain_sync * 1e3:.0f} ms in the sync vs {period * 1e3:.0f} ms of compute "
            f"(standalone): {plain_sync / (period + plain_sync):.0%} of a plain outer period",
        ),
    ]
    metrics: dict[str, Any] = {
        "params": params,
        "standalone_steps_per_s": round(standalone, 4),
        "standalone_steps_per_s_range": [round(min(alone), 4), round(max(alone), 4)],
        "standalone_cpu_ms_per_step": round(cpu_alone * 1e3, 3),
        "straggler_ceiling": round(statistics.median(straggler_ceiling(p) for p in results), 4),
        "rounds": rounds,
        "configs": {},
        # Every run in order, for reading the drift: (name, steps/s, standalone steps/s).
        "runs": [
            [run["name"], round(rate(p), 3), round(alone_rate(p), 3)]
            for run, p in zip(runs, results, strict=True)
        ],
    }
    for name in by_name:
        steps = med(name, lambda p: rate(p.pair))
        cpu = per_outer(name, "cpu_s") / SYNC_EVERY
        # CPU beyond standalone's (same run), all threads: the sync's own cost.
        extra_cpu = med(
            name,
            lambda p: (
                (statistics.fmean(g["cpu_s"] for g in p.pair) - alone_cpu(p.pair))
                / (p.run["steps"] / SYNC_EVERY)
            ),
        )
        rows.append(
            Row(
                name,
                "steps/s (x standalone, range); MB/outer step; hidden_fraction",
                f"{steps:.2f} ({med(name, lambda p: p.ratio):.2f}x, {spread(name)}); "
                f"{mb(name):.2f} MB; {pooled(name, 'hidden_fraction'):.2f}",
            )
        )
        hook, quorum, vote = (per_outer(name, k) for k in ("hook_s", "quorum_s", "vote_s"))
        waited = med(name, lambda p: report_total(p.run, p.pair, "waited"))
        rows.append(
            Row(
                "",
                "ms/outer step: exposed; in DiLoCo = quorum+wait+vote+own work; extra CPU",
                f"{med(name, lambda p: p.exposed) * 1e3:.0f}; {hook * 1e3:.0f} = "
                f"{quorum * 1e3:.0f}+{waited * 1e3:.0f}+{vote * 1e3:.0f}"
                f"+{(hook - quorum - waited - vote) * 1e3:.0f}; {extra_cpu * 1e3:.0f}",
            )
        )
        metrics["configs"][name] = {
            "steps_per_s": round(steps, 4),
            "throughput_ratio": round(med(name, lambda p: p.ratio), 4),
            "throughput_ratios": [round(p.ratio, 4) for p in by_name[name]],
            "bytes_per_outer_step": round(mb(name) * 1e6),
            "hidden_fraction": round(pooled(name, "hidden_fraction"), 4),
            "exposed_ms_per_outer_step": round(med(name, lambda p: p.exposed) * 1e3, 2),
            "in_diloco_ms_per_outer_step": round(hook * 1e3, 2),
            "quorum_ms_per_outer_step": round(quorum * 1e3, 2),
            "vote_ms_per_outer_step": round(vote * 1e3, 2),
            "waited_ms_per_outer_step": round(waited * 1e3, 2),
            "sync_seconds_per_sync": round(pooled(name, "seconds"), 5),
            "cpu_ms_per_step": round(cpu * 1e3, 2),
            "extra_cpu_ms_per_outer_step": round(extra_cpu * 1e3, 2),
        }
    # Of the time plain DiLoCo's sync costs the inner loop, the share streaming removes.
    # (against plain fp32 where the same format's plain run is not in the plan).
    for fmt in FORMATS:
        if f"streaming {fmt}" in by_name:
            reference = f"plain {fmt}" if f"plain {fmt}" in by_name else "plain fp32"
            removed = 1 - med(f"streaming {fmt}", lambda p: p.exposed) / med(
                reference, lambda p: p.exposed
            )
            metrics["configs"][f"streaming {fmt}"]["exposed_removed_vs_plain"] = round(removed, 4)

    hidden = pooled("streaming int8", "hidden_fraction")
    throughput = med("streaming int8", lambda p: p.ratio)
    byte_ratio = mb("streaming fp32") / mb("streaming int8")
    # What the training thread does in an outer step itself (quorum, vote, own work)
    # is not overlapped by sync_delay: the ratio it alone allows, were the wire free.
    own = per_outer("streaming int8", "hook_s") - statistics.median(
        report_total(p.run, p.pair, "waited") for p in by_name["streaming int8"]
    )
    bound = period / (period + own)
    rows += [
        Row(
            "streaming int8",
            "training-thread ms/outer step besides waiting; ratio it allows",
            f"{own * 1e3:.0f} of {period * 1e3:.0f} ms compute: <= {bound:.2f}x",
        ),
        Row(
            "streaming int8",
            "mean SyncReport.hidden_fraction",
            f"{hidden:.3f}",
            f">= {GOAL_HIDDEN}",
            hidden >= GOAL_HIDDEN,
        ),
        Row(
            "streaming int8",
            "steps/s / standalone (median of paired runs)",
            f"{throughput:.3f} ({spread('streaming int8')})",
            f">= {GOAL_THROUGHPUT}",
            throughput >= GOAL_THROUGHPUT,
        ),
        Row(
            "int8 vs fp32",
            "bytes per outer step, fp32 / int8",
            f"{byte_ratio:.3f}",
            f">= {GOAL_BYTES}",
            byte_ratio >= GOAL_BYTES,
        ),
    ]
    metrics.update(
        hidden_fraction_int8=round(hidden, 4),
        throughput_ratio_int8=round(throughput, 4),
        throughput_bound_int8=round(bound, 4),
        bytes_ratio_int8=round(byte_ratio, 4),
    )
    return rows, metrics


def loss_report(
    runs: list[dict[str, Any]], results: list[Result]
) -> tuple[list[Row], dict[str, Any]]:
    losses = {run["name"]: pair[0]["eval_loss"] for run, pair in zip(runs, results, strict=True)}
    first = runs[0]
    reference = losses["gpt streaming fp32"]
    rows = [
        Row(
            "setup",
            "loss model",
            f"example GPT tiny ({results[0][0]['params'] / 1e6:.2f}M params), default corpus, "
            f"batch {first['batch']}, lr {first['lr']}, {first['steps']} inner steps, "
            f"sync_every {SYNC_EVERY}; loss on {EVAL_WINDOWS} held-out windows",
        )
    ]
    metrics: dict[str, Any] = {"eval_loss": {}}
    for run, pair in zip(runs, results, strict=True):
        name = run["name"]
        rows.append(
            Row(
                name,
                "held-out loss (/ streaming fp32); MB/outer step; steps/s",
                f"{losses[name]:.4f} ({losses[name] / reference:.4f}); "
                f"{bytes_per_outer_step(run, pair) / 1e6:.3f}; {rate(pair):.1f}",
            )
        )
        metrics["eval_loss"][name] = round(losses[name], 5)
    loss_ratio = losses["gpt streaming int8"] / reference
    rows.append(
        Row(
            "streaming int8",
            "held-out loss / streaming fp32",
            f"{loss_ratio:.4f}",
            f"within {GOAL_LOSS:.0%}",
            abs(loss_ratio - 1) <= GOAL_LOSS,
        )
    )
    metrics["loss_ratio_int8"] = round(loss_ratio, 5)
    return rows, metrics


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    load = os.getloadavg()[0]
    started = time.monotonic()
    a_runs, b_runs = throughput_runs(args.quick), loss_runs(args.quick)
    results = run_all(a_runs + b_runs)
    check_runs(a_runs + b_runs, results)
    a_rows, a_metrics = throughput_report(a_runs, results[: len(a_runs)])
    b_rows, b_metrics = loss_report(b_runs, results[len(a_runs) :])
    end_load = os.getloadavg()[0]
    rows = [
        Row(
            "setup",
            "machine",
            f"{os.cpu_count()} CPUs, load average {load:.1f} at start, {end_load:.1f} at end",
        )
    ]
    print_table(rows + a_rows + b_rows)
    metrics = {
        "cpus": os.cpu_count(),
        "load_average": [round(load, 2), round(end_load, 2)],
        "seconds": round(time.monotonic() - started, 1),
        **a_metrics,
        **b_metrics,
    }
    write_json(args.json, metrics)


if __name__ == "__main__":
    main()
