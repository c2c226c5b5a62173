"""Convergence study in the simulator: data parallel vs DiLoCo, failures, streaming, H.

    python bench/convergence.py [--quick] [--json PATH]

The example's GPT (``examples/model.py``, size ``tiny``) on its default corpus
(the standard library's sources; the last 10% held out), every run at equal
tokens: ``--steps`` inner steps per worker, M=4 workers at batch B, against
data parallel simulated as one worker at batch 4B (the same gradient a
4-way allreduce would average).  Each run's final global model is evaluated
on the same held-out batches.  Rows:

- ``diloco_loss_ratio``: DiLoCo (M=4, H=50) eval loss / data parallel;
  ``sync_ratio``: data parallel's syncs (one per step) / DiLoCo's;
- ``failure_loss_ratio``: the same DiLoCo with a failure every ~10 outer steps
  per worker (MTBF 10 H inner steps, down for H) / failure-free DiLoCo;
- streaming (N=4 fragments, tau=5) with int8 and int4: loss ratio to data
  parallel and ``bits_ratio_4bit``: bits each worker sends over the run,
  data parallel (fp32 gradients every step) / streaming int4 (the library's
  payload accounting; the ring/allgather wire figure is given beside it);
- H in {10, 50, 200}: eval loss per H;
- what-if from the network model alone: 1B parameters, 0.5 s per inner step,
  H=100, M=4: compute utilization at 10 Gbit/s, 1 Gbit/s, 100 Mbit/s.

The loss curves are plotted next to the JSON (``<json>.png``, else
``convergence.png`` in the current directory).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
# The repository, not bench/ (whose lighthouse.py would shadow the package),
# and the example's model module.
sys.path[0] = str(ROOT)
sys.path.insert(1, str(ROOT / "examples"))

from model import GPT, MODEL_SIZES, VOCAB_SIZE, ByteDataset, default_corpus  # noqa: E402

from bench._common import Row, parser, print_table, write_json  # noqa: E402
from ftdiloco.sim import DilocoSimulator, FailurePlan, NetworkModel, what_if  # noqa: E402
from ftdiloco.sim.output import plot_losses  # noqa: E402

SIZE = "tiny"
WORKERS = 4


class LM(GPT):
    """The example GPT as diloco-sim calls a model: ``model(x)`` returns logits."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        logits, _ = super().forward(idx)
        return logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


def datasets(block: int) -> tuple[ByteDataset, ByteDataset]:
    corpus = default_corpus()
    cut = len(corpus) * 9 // 10
    return ByteDataset(corpus[:cut], block), ByteDataset(corpus[cut:], block)


@torch.no_grad()
def held_out_loss(path: Path, held_out: ByteDataset, batches: int, batch: int) -> float:
    model = LM(MODEL_SIZES[SIZE])
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    model.eval()
    loader = DataLoader(
        held_out, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1234)
    )
    losses = []
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        losses.append(float(lm_loss(model(x), y)))
    return sum(losses) / len(losses)


def run(
    name: str,
    args: Any,
    train: ByteDataset,
    held_out: ByteDataset,
    curves: dict[str, list[dict[str, Any]]],
    **overrides: Any,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "num_nodes": WORKERS,
        "batch_size": args.batch,
        "diloco_interval": 50,
    }
    settings.update(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        sim = DilocoSimulator(
            model_cls=LM,
            model_kwargs={"config": MODEL_SIZES[SIZE]},
            loss_fn=lm_loss,
            train_dataset=train,
            optimizer_kwargs={"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
            max_local_step=args.steps,
            num_epochs=100,
            save_dir=tmp,
            grad_clip=1.0,
            seed=0,
            progress=False,
            network=NetworkModel(step_time=0.5, bandwidth=1e9, latency=1e-3),
            **settings,
        )
        started = time.perf_counter()
        result = sim.train()
        seconds = time.perf_counter() - started
        loss = held_out_loss(
            Path(tmp) / f"model_iter_{args.steps}.safetensors", held_out, args.eval_batches, 16
        )
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    curves[name] = [json.loads(line) for line in lines]
    out = {
        "eval_loss": loss,
        "outer_steps": result.outer_steps,
        "committed": result.committed,
        "rolled_back": result.rolled_back,
        "failures": result.failures,
        "bytes_sent": result.bytes_sent,
        "wire_bytes": result.wire_bytes,
        "params": sim.numel,
        "seconds": round(seconds, 1),
    }
    print(
        f"  {name}: eval loss {loss:.4f}  ({seconds:.0f} s, {result.outer_steps} outer steps,"
        f" {result.failures} failures, {result.rolled_back} rolled back)",
        flush=True,
    )
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="inner steps per worker")
    p.add_argument("--batch", type=int, default=None, help="sequences per worker step")
    p.add_argument("--eval-batches", type=int, default=None)
    args = p.parse_args()
    args.steps = args.steps or (120 if args.quick else 1000)
    args.batch = args.batch or (8 if args.quick else 16)
    args.eval_batches = args.eval_batches or (8 if args.quick else 40)
    torch.set_num_threads(1)  # shared 2-core machine; runs are single-threaded and comparable
    block = MODEL_SIZES[SIZE].block_size
    train, held_out = datasets(block)
    curves: dict[str, list[dict[str, Any]]] = {}
    H = 50
    runs: dict[str, dict[str, Any]] = {}
    print(
        f"{args.steps} inner steps per worker, batch {args.batch} x {WORKERS} workers", flush=True
    )
    runs["data parallel"] = run(
        "data parallel",
        args,
        train,
        held_out,
        curves,
        num_nodes=1,
        batch_size=args.batch * WORKERS,
        algorithm="localsgd",
        diloco_interval=args.steps,
    )
    runs["diloco H=50"] = run("diloco H=50", args, train, held_out, curves)
    runs["diloco H=50 + failures"] = run(
        "diloco H=50 + failures",
        args,
        train,
        held_out,
        curves,
        failures=FailurePlan(mtbf=10 * H, down_for=H, unit="steps"),
    )
    for codec in ("int8", "int4"):
        runs[f"streaming {codec}"] = run(
            f"streaming {codec}",
            args,
            train,
            held_out,
            curves,
            fragments=4,
            sync_delay=5,
            compression=codec,
        )
    for h in (10, 200):
        runs[f"diloco H={h}"] = run(
            f"diloco H={h}", args, train, held_out, curves, diloco_interval=h
        )

    dp = runs["data parallel"]
    numel = dp["params"]
    dp_bytes = args.steps * numel * 4  # an fp32 gradient per step, the library's accounting
    dp_wire = args.steps * round(2 * (WORKERS - 1) * numel * 4 / WORKERS)
    s4 = runs["streaming int4"]
    metrics: dict[str, Any] = {
        "steps": args.steps,
        "batch": args.batch,
        "workers": WORKERS,
        "params": numel,
        "runs": runs,
        "diloco_loss_ratio": runs["diloco H=50"]["eval_loss"] / dp["eval_loss"],
        "sync_ratio": args.steps / (args.steps // H),
        "failure_loss_ratio": runs["diloco H=50 + failures"]["eval_loss"]
        / runs["diloco H=50"]["eval_loss"],
        "streaming_int8_loss_ratio": runs["streaming int8"]["eval_loss"] / dp["eval_loss"],
        "streaming_int4_loss_ratio": s4["eval_loss"] / dp["eval_loss"],
        "bits_ratio_4bit": dp_bytes / s4["bytes_sent"],
        "bits_ratio_4bit_wire": dp_wire / s4["wire_bytes"],
        "loss_vs_H": {h: runs[f"diloco H={h}"]["eval_loss"] for h in (10, 50, 200)},
    }
    what: dict[str, dict[str, float]] = {}
    common = {"params": 10**9, "step_seconds": 0.5, "workers": WORKERS, "sync_every": 100}
    configs = {
        "data parallel": {"data_parallel": True},
        "diloco": {},
        "streaming fp32": {"fragments": 4, "sync_delay": 5},
        "streaming 4-bit": {
            "fragments": 4,
            "sync_delay": 5,
            "coded": True,
            "bytes_per_value": 0.5 + 4 / 256,
        },
    }
    for name, extra in configs.items():
        what[name] = {
            label: what_if(**common, bandwidth=bw, **extra).utilization  # type: ignore[arg-type]
            for label, bw in (("10Gbit", 10e9), ("1Gbit", 1e9), ("100Mbit", 100e6))
        }
    metrics["what_if_utilization"] = what

    rows = [
        Row("data parallel (1 worker, 4x batch)", "eval loss", f"{dp['eval_loss']:.4f}"),
        Row(
            "DiLoCo M=4 H=50",
            "diloco_loss_ratio",
            f"{metrics['diloco_loss_ratio']:.4f}",
            "<= 1.02",
            metrics["diloco_loss_ratio"] <= 1.02,
        ),
        Row("", "sync_ratio", f"{metrics['sync_ratio']:.0f}", ">= 50", metrics["sync_ratio"] >= 50),
        Row(
            "DiLoCo + failure every ~10 outer steps/worker",
            "failure_loss_ratio",
            f"{metrics['failure_loss_ratio']:.4f}",
            "<= 1.03",
            metrics["failure_loss_ratio"] <= 1.03,
        ),
        Row(
            "",
            "failures / rolled back",
            f"{runs['diloco H=50 + failures']['failures']} / "
            f"{runs['diloco H=50 + failures']['rolled_back']}",
        ),
        Row(
            "streaming N=4 tau=5 int8",
            "loss ratio",
            f"{metrics['streaming_int8_loss_ratio']:.4f}",
            "<= 1.02",
            metrics["streaming_int8_loss_ratio"] <= 1.02,
        ),
        Row(
            "streaming N=4 tau=5 int4",
            "loss ratio",
            f"{metrics['streaming_int4_loss_ratio']:.4f}",
            "<= 1.02",
            metrics["streaming_int4_loss_ratio"] <= 1.02,
        ),
        Row(
            "",
            "bits_ratio_4bit (payload)",
            f"{metrics['bits_ratio_4bit']:.0f}",
            ">= 400",
            metrics["bits_ratio_4bit"] >= 400,
        ),
        Row("", "same, ring/allgather wire bytes", f"{metrics['bits_ratio_4bit_wire']:.0f}"),
        Row(
            "DiLoCo M=4, loss vs H",
            "H=10 / 50 / 200",
            " / ".join(f"{metrics['loss_vs_H'][h]:.4f}" for h in (10, 50, 200)),
        ),
    ]
    for name, by_bw in what.items():
        rows.append(
            Row(
                f"what-if 1B, 0.5 s/step, H=100: {name}",
                "utilization 10G / 1G / 100M",
                " / ".join(f"{100 * u:.1f}%" for u in by_bw.values()),
                "~95% at 1 Gbit/s" if name == "streaming 4-bit" else "",
                by_bw["1Gbit"] >= 0.95 if name == "streaming 4-bit" else None,
            )
        )
    print_table(rows)
    write_json(args.json, metrics)
    png = args.json.with_suffix(".png") if args.json is not None else Path("convergence.png")
    plot_losses(curves, png)
    print(f"loss curves: {png}")


if __name__ == "__main__":
    main()
