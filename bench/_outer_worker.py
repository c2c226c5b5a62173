"""A replica-group process for bench/outer_step.py (one process per group).

    python bench/_outer_worker.py overhead   # the allreduce variants, side by side
    python bench/_outer_worker.py train      # paced DiLoCo training, for the kill test

Configured like a training script (REPLICA_GROUP_ID, FTDILOCO_*), plus:
  BENCH_STORE    (overhead) host:port of the rendezvous store for the raw gloo group
  BENCH_REPS     (overhead) timed repetitions of every variant
  BENCH_BUCKET_BYTES, BENCH_DIRECT_BYTES  override the manager's constants
  BENCH_VICTIM   (train) ``between``: after its BENCH_AT-th counted commit,
                 stop (report ``paused``) and wait to be killed; ``mid``: in
                 the outer step after that, stop inside the allreduce (report
                 ``hanging``) and wait to be killed
  BENCH_GROUPS   (train) the commits counted are those with this many groups
                 taking part (for ``mid``: once a quorum had more, i.e. after
                 a group was lost)

Everything the parent reads is one line ``@ {json}`` on stdout; logs go to
stderr.  Times are ``time.monotonic()``: the same clock in every process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftdiloco.coordination import manager as manager_module  # noqa: E402
from ftdiloco.coordination import process_group  # noqa: E402
from ftdiloco.coordination.allreduce import Work  # noqa: E402
from ftdiloco.coordination.manager import Manager  # noqa: E402
from ftdiloco.training.diloco import DiLoCo  # noqa: E402
from ftwire import logs  # noqa: E402

# A 10M-parameter transformer's tensors: an embedding, two blocks of
# attention + MLP (weights, biases, layer norms) and a final norm.
HIDDEN = 512
VOCAB = 7220


def model_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(VOCAB, HIDDEN)]
    for _ in range(2):
        shapes += [
            (HIDDEN, 3 * HIDDEN),
            (3 * HIDDEN,),
            (HIDDEN, HIDDEN),
            (HIDDEN,),
            (HIDDEN,),
            (HIDDEN,),
            (HIDDEN, 4 * HIDDEN),
            (4 * HIDDEN,),
            (4 * HIDDEN, HIDDEN),
            (HIDDEN,),
        ]
    shapes.append((HIDDEN,))
    return shapes


def emit(**fields: object) -> None:
    print("@ " + json.dumps(fields), flush=True)


# -- overhead: every variant on the same data, interleaved ----------------------------


def overhead() -> None:
    reps = int(os.environ["BENCH_REPS"])
    manager = Manager()
    # The first quorum syncs every group from one (FTDILOCO_INIT_SYNC); a heal
    # needs registered state, and a small one keeps start_quorum's publish cheap.
    marker = torch.zeros(1)
    manager.register_state("bench", lambda: {"marker": marker}, lambda s: None)
    rank = int(manager.config.replica_group_id)
    raw = process_group.connect(
        backend="gloo",
        store_address=os.environ["BENCH_STORE"],
        prefix="raw",
        rank=rank,
        world_size=2,
        timeout=60,
        host="127.0.0.1",
    )
    shapes = model_shapes()
    total = sum(torch.Size(s).numel() for s in shapes)
    sources = [torch.randn(total, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    source = sources[rank]
    tensors = [torch.empty(s) for s in shapes]  # separate allocations, like parameters
    flat = torch.empty(total)
    token = torch.zeros(1)

    def refill_tensors() -> None:
        offset = 0
        for t in tensors:
            t.view(-1).copy_(source[offset : offset + t.numel()])
            offset += t.numel()

    def refill_flat() -> None:
        flat.copy_(source)

    def barrier() -> None:
        raw.allreduce([token]).wait()

    def raw_flat() -> float:
        refill_flat()
        barrier()
        began = time.monotonic()
        raw.allreduce([flat]).wait()
        return time.monotonic() - began

    def raw_flat_then_divide() -> float:
        refill_flat()
        barrier()
        began = time.monotonic()
        raw.allreduce([flat]).wait()
        flat.div_(2)
        return time.monotonic() - began

    def raw_per_tensor() -> float:
        refill_tensors()
        barrier()
        began = time.monotonic()
        works = [raw.allreduce([t]) for t in tensors]
        for w in works:
            w.wait()
        return time.monotonic() - began

    def through_manager(data: Sequence[torch.Tensor]) -> float:
        manager.start_quorum()
        barrier()
        began = time.monotonic()
        ok = manager.allreduce(data).wait()
        seconds = time.monotonic() - began
        if not ok or not manager.should_commit():
            raise RuntimeError(f"outer step failed: {manager.error!r}")
        return seconds

    def manager_tensors() -> float:
        refill_tensors()
        return through_manager(tensors)

    def manager_flat() -> float:
        refill_flat()
        return through_manager([flat])

    def full_step() -> float:
        refill_tensors()
        barrier()
        began = time.monotonic()
        manager.start_quorum()
        ok = manager.allreduce(tensors).wait()
        committed = manager.should_commit()
        seconds = time.monotonic() - began
        if not (ok and committed):
            raise RuntimeError(f"outer step failed: {manager.error!r}")
        return seconds

    variants: dict[str, Callable[[], float]] = {
        "raw_flat": raw_flat,
        "raw_flat_div": raw_flat_then_divide,
        "raw_per_tensor": raw_per_tensor,
        "manager_tensors": manager_tensors,
        "manager_flat": manager_flat,
        "full_step": full_step,
    }
    check(manager, tensors, flat, sources)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(-3, reps):  # three untimed warm-up rounds
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every round
            seconds = variants[name]()
            if rep >= 0:
                times[name].append(seconds)
    emit(kind="times", rank=rank, times=times, total=total, tensors=len(tensors))
    manager.close()


def check(
    manager: Manager, tensors: list[torch.Tensor], flat: torch.Tensor, sources: list[torch.Tensor]
) -> None:
    """The manager's result is the plain average of both groups' values, bit for bit."""
    rank = int(manager.config.replica_group_id)
    # The first outer step syncs every group from one (FTDILOCO_INIT_SYNC): the
    # others contribute zeros.  From the second on everyone contributes.
    manager.start_quorum()
    manager.allreduce(tensors).wait()
    manager.should_commit()
    expected = (sources[0] + sources[1]) / 2
    offset = 0
    for t in tensors:
        t.view(-1).copy_(sources[rank][offset : offset + t.numel()])
        offset += t.numel()
    flat.copy_(sources[rank])
    for data in (tensors, [flat]):
        manager.start_quorum()
        ok = manager.allreduce(data).wait() and manager.should_commit()
        got = torch.cat([t.view(-1) for t in data])
        if not ok or not torch.equal(got, expected):
            diff = (got - expected).abs().max().item()
            raise AssertionError(f"manager allreduce gave a wrong average (ok={ok}, diff {diff})")


# -- train: paced DiLoCo on a small model; one group may be the victim -----------------

INNER_STEP_S = 0.02
SYNC_EVERY = 5


def train() -> None:
    victim = os.environ.get("BENCH_VICTIM", "")
    stop_after = int(os.environ.get("BENCH_AT", "0"))
    groups = int(os.environ.get("BENCH_GROUPS", "0"))
    counted = 0  # commits towards BENCH_AT
    most = 0  # the most groups seen in a quorum
    # Four groups share the machine's cores: a tiny model gains nothing from
    # more threads, and idle OpenMP threads spinning between ops would make
    # every group's pace depend on the others'.
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every group starts from the same weights
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    manager = Manager()
    data = torch.Generator().manual_seed(int(manager.config.replica_group_id))

    if victim == "mid":
        real_allreduce = manager.allreduce

        def allreduce(tensors: Sequence[torch.Tensor], **options: Any) -> Work:
            if counted >= stop_after:
                emit(kind="hanging", time=time.monotonic(), step=manager.step)
                while True:  # inside the outer step's allreduce until SIGKILL
                    time.sleep(3600)
            return real_allreduce(tensors, **options)

        manager.allreduce = allreduce  # type: ignore[method-assign]

    with manager, DiLoCo(manager, model, inner, outer, sync_every=SYNC_EVERY) as diloco:
        reported = None
        deadline = time.monotonic()
        while True:
            x = torch.randn(32, 64, generator=data)
            loss = (model(x) - x[:, :16]).pow(2).mean()
            loss.backward()
            inner.step()  # every SYNC_EVERY-th step runs the outer step inside this call
            inner.zero_grad()
            report = diloco.last_sync
            if report is not None and report is not reported:
                reported = report
                most = max(most, report.participants)
                after_loss = victim != "mid" or most > groups
                counted += report.committed and report.participants == groups and after_loss
                emit(
                    kind="sync",
                    time=time.monotonic(),
                    step=report.step,
                    committed=report.committed,
                    participants=report.participants,
                    seconds=report.seconds,
                )
                deadline = time.monotonic()  # the next period starts after the sync
                if victim == "between" and counted >= stop_after:
                    emit(kind="paused", time=time.monotonic(), step=manager.step)
                    while True:  # between syncs until SIGKILL
                        time.sleep(3600)
            deadline += INNER_STEP_S
            pause = deadline - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def main() -> None:
    logs.configure("json")
    for name in ("BUCKET_BYTES", "DIRECT_BYTES"):
        if os.environ.get(f"BENCH_{name}"):
            setattr(manager_module, name, int(os.environ[f"BENCH_{name}"]))
    {"overhead": overhead, "train": train}[sys.argv[1]]()


if __name__ == "__main__":
    main()
