"""A replica-group process for bench/streaming.py: one process per group, many runs.

    BENCH_RUNS='[{...}, ...]' REPLICA_GROUP_ID=0 FTDILOCO_LIGHTHOUSE=... \\
        python bench/_streaming_worker.py

Each run in BENCH_RUNS (a JSON list) trains from scratch: the same seed for the
model, the same data for this group.  Before each run the worker prints
``@ {"kind": "ready"}`` and waits for a line on stdin, so the parent can start
both groups together (a standalone window has no collective to line them up).
A run's fields:

  name         label; the run's replica id is made from its index instead
  model        ``mlp`` (synthetic regression, ``width`` wide) or ``tiny`` /
               ``small`` (the example GPT on the default corpus)
  batch, lr, sync_every, warmup, steps   ``warmup`` untimed inner steps, then
               ``steps`` timed ones (multiples of ``sync_every``)
  compression, error_feedback, fragments, sync_delay   DiLoCo's settings
  baseline     if true, also time ``steps`` inner steps of the same training
               without DiLoCo (no sync at all) twice: before entering DiLoCo
               (after their own warm-up) and right after leaving it
  eval         after training, finish every fragment's sync and report the
               loss of the resulting (global) weights on held-out data

BENCH_THREADS sets torch's threads (default 1: one core per group).  Every
result is one ``@ {json}`` line on stdout; logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from model import GPT, MODEL_SIZES, ByteDataset, default_corpus  # noqa: E402

from ftdiloco.config import Config  # noqa: E402
from ftdiloco.coordination.manager import Manager  # noqa: E402
from ftdiloco.training.data import ShardSampler  # noqa: E402
from ftdiloco.training.diloco import DiLoCo  # noqa: E402
from ftdiloco.training.outer_loop import SyncReport, tensors_hash  # noqa: E402
from ftwire import logs  # noqa: E402

GROUPS = 2
MLP_IN = 256
EVAL_WINDOWS = 256  # held-out windows of the corpus (never trained on)
Batch = tuple[torch.Tensor, torch.Tensor]


def emit(**fields: object) -> None:
    print("@ " + json.dumps(fields), flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of every thread of this process (gloo's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- models and data ---------------------------------------------------------------------


class WideMLP(nn.Module):
    """Many parameters for little compute per step: a sync is large next to an inner step."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(MLP_IN, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, MLP_IN),
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net(x), y)


# A fixed random teacher: the target is learnable and the same for every run.
_TEACHER = torch.randn(MLP_IN, MLP_IN, generator=torch.Generator().manual_seed(1234)) / 16


def mlp_batches(batch: int, group: int) -> Iterator[Batch]:
    data = torch.Generator().manual_seed(100 + group)
    while True:
        x = torch.randn(batch, MLP_IN, generator=data)
        yield x, torch.tanh(x @ _TEACHER)


_CORPUS: dict[int, ByteDataset] = {}


def corpus_windows(block_size: int) -> ByteDataset:
    if block_size not in _CORPUS:
        _CORPUS[block_size] = ByteDataset(default_corpus(), block_size)
    return _CORPUS[block_size]


def gpt_batches(dataset: ByteDataset, batch: int, group: int) -> Iterator[Batch]:
    """This group's shard of the training windows (all but the held-out tail), in order."""
    sampler = ShardSampler(
        len(dataset) - EVAL_WINDOWS, replica_group=group, num_replica_groups=GROUPS, seed=0
    )

    def forever() -> Iterator[int]:
        while True:
            yield from sampler  # the next epoch after the last window

    indices = forever()
    while True:
        pairs = [dataset[next(indices)] for _ in range(batch)]
        yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def build(
    run: dict[str, Any], group: int
) -> tuple[nn.Module, Callable[..., torch.Tensor], Iterator[Batch], list[Batch]]:
    """Model (seeded alike in every group and run), its loss, training batches, held-out batches."""
    torch.manual_seed(0)
    if run["model"] == "mlp":
        mlp = WideMLP(int(run["width"]))
        held_out = torch.Generator().manual_seed(999)
        x = torch.randn(512, MLP_IN, generator=held_out)
        return mlp, mlp.loss, mlp_batches(int(run["batch"]), group), [(x, torch.tanh(x @ _TEACHER))]
    gpt = GPT(MODEL_SIZES[run["model"]])

    def gpt_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor | None = gpt(x, y)[1]
        assert loss is not None
        return loss

    dataset = corpus_windows(gpt.config.block_size)
    tail = [dataset[i] for i in range(len(dataset) - EVAL_WINDOWS, len(dataset))]
    held = [
        (
            torch.stack([p[0] for p in tail[i : i + 64]]),
            torch.stack([p[1] for p in tail[i : i + 64]]),
        )
        for i in range(0, EVAL_WINDOWS, 64)
    ]
    return gpt, gpt_loss, gpt_batches(dataset, int(run["batch"]), group), held


def timed(
    fn: Callable[[], Any], totals: dict[str, float], key: str, timing: list[bool]
) -> Callable[[], Any]:
    """``fn``, adding its duration to ``totals[key]`` while ``timing[0]`` is set.

    Only calls on the training thread count: streaming DiLoCo joins its quorums
    on its sync thread, where they cost the inner loop nothing.
    """

    def wrapper() -> Any:
        began = time.perf_counter()
        try:
            return fn()
        finally:
            if timing[0] and threading.current_thread() is threading.main_thread():
                totals[key] += time.perf_counter() - began

    return wrapper


# -- one run ---------------------------------------------------------------------------


def train(run: dict[str, Any], group: int, index: int) -> dict[str, Any]:
    model, loss_fn, batches, held_out = build(run, group)
    is_gpt = run["model"] != "mlp"
    inner = torch.optim.AdamW(
        model.parameters(), lr=float(run.get("lr", 1e-3)), betas=(0.9, 0.95), weight_decay=0.1
    )
    # Fused: one pass over the weights, the momentum and the update (on CPU and GPU).
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True, fused=True)
    sync_every, warmup, steps = int(run["sync_every"]), int(run["warmup"]), int(run["steps"])
    diloco: DiLoCo | None = None
    reports: list[dict[str, Any]] = []
    last_report: SyncReport | None = None
    # Seconds the training thread spent inside DiLoCo's step hook, and inside the
    # manager's blocking round trips (quorum, vote), while ``timing[0]`` is set.
    blocked = {"hook": 0.0, "quorum": 0.0, "vote": 0.0}
    timing = [False]
    marks = [0.0]

    def after_diloco(*_: object) -> None:
        if timing[0]:
            blocked["hook"] += time.perf_counter() - marks[0]

    def run_steps(n: int) -> None:
        nonlocal last_report
        for _ in range(n):
            x, y = next(batches)
            torch.autograd.backward(loss_fn(x, y))
            if is_gpt:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            inner.step()  # DiLoCo's outer steps run inside this call
            inner.zero_grad()
            report = diloco.last_sync if diloco is not None else None
            if report is not None and report is not last_report:
                last_report = report
                reports.append(
                    {
                        "timed": timing[0],
                        "bytes_sent": report.bytes_sent,
                        "seconds": report.seconds,
                        "waited": report.waited,
                        "hidden_fraction": report.hidden_fraction,
                        "committed": report.committed,
                        "participants": report.participants,
                    }
                )

    def measure(n: int) -> dict[str, Any]:
        """``n`` timed inner steps: wall and CPU seconds, and when (for the overlap check)."""
        began, cpu, mono = time.perf_counter(), cpu_seconds(), time.monotonic()
        timing[0] = True
        run_steps(n)
        timing[0] = False
        seconds = time.perf_counter() - began
        return {
            "seconds": seconds,
            "steps_per_s": n / seconds,
            "cpu_s": cpu_seconds() - cpu,
            "window": [mono, time.monotonic()],
        }

    emit(kind="ready", name=run["name"])
    sys.stdin.readline()  # the parent releases both groups at once
    result: dict[str, Any] = {
        "kind": "result",
        "name": run["name"],
        "group": group,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
    }
    alone: list[dict[str, Any]] = []
    if run.get("baseline"):
        run_steps(warmup)
        alone.append(measure(steps))

    # A fresh replica id per run: the lighthouse sees new members, not restarts.
    manager = Manager(Config.from_env(replica_id=f"r{index}g{group}"))
    manager.start_quorum = timed(manager.start_quorum, blocked, "quorum", timing)  # type: ignore[method-assign]
    manager.should_commit = timed(manager.should_commit, blocked, "vote", timing)  # type: ignore[method-assign]
    options: dict[str, Any] = {
        "fragments": int(run["fragments"]),
        "sync_delay": int(run["sync_delay"]),
    }
    if run["compression"] != "fp32" or run.get("error_feedback"):
        options["compression"] = run["compression"]
        options["error_feedback"] = bool(run.get("error_feedback", False))
    # Optimizer post-hooks run in registration order: one before DiLoCo's (which
    # entering registers), one after it.
    before = inner.register_step_post_hook(lambda *_: marks.__setitem__(0, time.perf_counter()))
    diloco = DiLoCo(manager, model, inner, outer, sync_every, **options)
    entered = time.perf_counter()
    diloco.__enter__()  # the job's first (empty) outer step
    result["enter_s"] = time.perf_counter() - entered
    after = inner.register_step_post_hook(after_diloco)
    run_steps(warmup)
    result.update(measure(steps), reports=reports)
    result.update({f"{key}_s": value for key, value in blocked.items()})
    if diloco.in_flight is not None or diloco.inner_steps % sync_every:
        diloco.sync()  # the end of training: every fragment's outer step, now
    diloco.__exit__(None, None, None)
    before.remove()
    after.remove()
    diloco = None
    if run.get("eval"):
        model.eval()
        with torch.no_grad():
            held = [float(loss_fn(x, y)) for x, y in held_out]
        result["eval_loss"] = sum(held) / len(held)
        result["weights"] = tensors_hash(model.parameters())
        model.train()
    if run.get("baseline"):
        alone.append(measure(steps))  # warm already: right after the DiLoCo steps
        result["alone"] = alone
    manager.close()
    return result


def main() -> None:
    logs.configure("json", level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    group = int(os.environ["REPLICA_GROUP_ID"])
    runs = json.loads(os.environ["BENCH_RUNS"])
    for index, run in enumerate(runs):
        emit(**train(run, group, index))
    emit(kind="done")


if __name__ == "__main__":
    main()
