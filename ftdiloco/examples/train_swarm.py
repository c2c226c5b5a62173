"""Train the example GPT cut into pipeline stages, several workers per stage (DiLoCo-SWARM).

One command per worker; the lighthouse serves one room per stage::

    lighthouse --bind 127.0.0.1:29510 --rooms stage0,stage1 &
    for s in 0 1; do for w in 0 1; do
      FTDILOCO_LIGHTHOUSE=http://127.0.0.1:29510 REPLICA_GROUP_ID=$w NUM_REPLICA_GROUPS=2 \\
        python -m ftdiloco.examples.train_swarm --stage $s --stages 2 --outer-steps 10 &
    done; done

(or ``ftdiloco launch --stages 2 --workers-per-stage 2``).  Each worker builds
the whole model from the same seed, keeps its stage, and is an ordinary
DiLoCo replica group of its stage's room: the workers of a stage average
their pseudo-gradients every ``--sync-every`` inner steps, heal from each
other, roll back together.  Workers of the first stage read their shards of
the text and send activations on; the last stage computes the loss and the
gradients flow back the same way.  Every micro-batch is one inner step of
each worker it passes.  The first stage's workers print the loss (and the
held-out loss, through the whole pipeline) at each outer step and stop after
``--outer-steps``; later stages print their own outer steps and stop once no
worker of the stage before them has been alive for ``--upstream-grace``
seconds (the job ended).
"""

from __future__ import annotations

from ftdiloco import train_extra_missing

if __name__ == "__main__" and (_missing := train_extra_missing("ftdiloco.examples.train_swarm")):
    raise SystemExit(_missing)

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import IO

import torch
import torch.nn.functional as F
from torch import nn

from ftdiloco.config import Config, exit_on_config_error
from ftdiloco.coordination.manager import Manager
from ftdiloco.examples.model import GPT, MODEL_SIZES, VOCAB_SIZE, default_corpus, load_corpus
from ftdiloco.examples.train_diloco import (
    build_loader,
    forever,
    heldout_batches,
    split_heldout,
)
from ftdiloco.operate.launch.swarm import stage_room
from ftdiloco.swarm import FORWARD, INFO_ADDRESS, Forwarder, StageServer, StageWorker, split_layers
from ftdiloco.swarm.worker import Room
from ftdiloco.training import events
from ftdiloco.training.diloco import DiLoCo
from ftdiloco.training.outer_loop import optimizer_tensors, tensors_hash
from ftwire import logs
from lighthouse.rooms import room_url

PROGRAM = "ftdiloco.examples.train_swarm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="One worker of one pipeline stage of the example GPT (DiLoCo-SWARM).",
        epilog="The worker's index in its stage and the workers per stage come from "
        "REPLICA_GROUP_ID and NUM_REPLICA_GROUPS; the lighthouse (started with "
        "--rooms stage0,...) from FTDILOCO_LIGHTHOUSE.",
    )
    add = parser.add_argument
    add("--stage", type=int, default=0, help="this worker's stage, from 0 (%(default)s)")
    add("--stages", type=int, default=2, help="stages of the pipeline (%(default)s)")
    add("--outer-steps", type=int, default=10, help="first stage's outer steps (%(default)s)")
    add("--sync-every", type=int, default=50, help="inner steps per outer step (%(default)s)")
    add("--batch-size", type=int, default=16, help="sequences per micro-batch (%(default)s)")
    add("--lr", type=float, default=1e-3, help="inner AdamW learning rate (%(default)s)")
    add("--outer-lr", type=float, default=0.7, help="outer Nesterov lr (%(default)s)")
    add("--outer-momentum", type=float, default=0.9, help="outer momentum (%(default)s)")
    add("--grad-clip", type=float, default=1.0, help="max gradient norm (%(default)s)")
    add("--model-size", choices=sorted(MODEL_SIZES), default="tiny", help="(%(default)s)")
    add("--seed", type=int, default=0, help="model and data order seed (%(default)s)")
    add("--data", help="train on this file instead of the standard library's sources")
    add("--eval-every", type=int, default=5, help="held-out loss every N outer steps")
    add("--eval-batches", type=int, default=8, help="held-out batches (%(default)s)")
    add("--slowdown", type=float, default=1.0, help="compute this many times slower (bench)")
    add(
        "--routing",
        choices=("weighted", "uniform"),
        default="weighted",
        help="next-stage worker drawn by measured throughput (SWARM) or uniformly, as the "
        "DiLoCo-SWARM report's code does, to compare (%(default)s)",
    )
    add("--times", help="first stage: append each finished micro-batch's wall time here (bench)")
    add("--upstream-grace", type=float, default=10.0, help="see above (%(default)s s)")
    add("--records", help="append one JSON line per outer step to this file (tests)")
    args = parser.parse_args(argv)
    if not 0 <= args.stage < args.stages or args.stages < 2:
        parser.error(
            f"--stage {args.stage} of --stages {args.stages}: need 0 <= stage < stages, >= 2"
        )
    return args


class Embed(nn.Module):
    """The GPT's first layer as a module of its own: token plus position embeddings."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        out: torch.Tensor = self.drop(self.wte(idx) + self.wpe(positions))
        return out


class Head(nn.Module):
    """The GPT's last layer: final LayerNorm and the output projection, to logits.

    The whole model ties the projection to the token embedding; across a
    stage cut they cannot share storage, so the head starts from a copy.
    """

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f = gpt.ln_f
        self.lm_head = nn.Linear(gpt.config.n_embd, VOCAB_SIZE, bias=False)
        self.lm_head.weight = nn.Parameter(gpt.lm_head.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.ln_f(x))
        return out


def gpt_layers(gpt: GPT) -> list[nn.Module]:
    """The GPT as a sequence of layers for :func:`ftdiloco.swarm.split_layers`."""
    return [Embed(gpt), *gpt.blocks, Head(gpt)]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure()
    with exit_on_config_error(PROGRAM):
        config = Config.from_env()
    if config.standalone or not config.lighthouse:
        raise SystemExit(f"{PROGRAM}: a pipeline needs a lighthouse with rooms (not 'none')")
    base = config.lighthouse[0]
    # This worker's quorum is its stage's room: a lighthouse address like any other.
    config = dataclasses.replace(config, lighthouse=(room_url(base, stage_room(args.stage)),))
    first, last = args.stage == 0, args.stage == args.stages - 1
    name = f"stage{args.stage}/worker{config.replica_group_id}"

    torch.manual_seed(args.seed)  # every worker builds the same model, then keeps its stage
    gpt = GPT(MODEL_SIZES[args.model_size])
    module = split_layers(gpt_layers(gpt), args.stages)[args.stage]
    inner = torch.optim.AdamW(module.parameters(), lr=args.lr, betas=(0.9, 0.95))
    outer = torch.optim.SGD(
        module.parameters(),
        lr=args.outer_lr,
        momentum=args.outer_momentum,
        nesterov=args.outer_momentum > 0,  # momentum 0 (plain averaging) is not Nesterov
    )

    def paused(reason: str | None) -> None:
        print(f"{name} | pipeline {'paused: ' + reason if reason else 'resumed'}", flush=True)

    server = None if first else StageServer(FORWARD, token=config.token, host=config.host)
    forwarder = (
        None
        if last
        else Forwarder(
            room_url(base, stage_room(args.stage + 1)),
            args.stage,
            token=config.token,
            timeout=config.collective_timeout,
            on_pause=paused,
            seed=args.seed * 1000 + args.stage * 100 + int(config.replica_group_id),
            weighted=args.routing == "weighted",
        )
    )
    upstream = None if first else Room(room_url(base, stage_room(args.stage - 1)), config.token)
    worker = StageWorker(
        module,
        inner,
        server=server,
        forwarder=forwarder,
        loss_fn=next_token_loss,
        grad_clip=args.grad_clip,
        slowdown=args.slowdown,
    )
    records: IO[str] | None = open(args.records, "a") if args.records else None  # noqa: SIM115
    times: IO[str] | None = open(args.times, "a") if args.times else None  # noqa: SIM115
    print(
        f"{name} | {sum(p.numel() for p in module.parameters()) / 1e6:.3f}M parameters"
        f" | room {config.lighthouse[0]}",
        flush=True,
    )
    manager = Manager(config)
    if server is not None:
        manager.set_join_info({INFO_ADDRESS: server.address})
    diloco = DiLoCo(manager, module, inner, outer, sync_every=args.sync_every)
    losses: list[float] = []
    last_loss = math.nan
    previous = None
    started = time.monotonic()

    def after_step(eval_batches: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """The outer-step line, event and record, once per outer step."""
        nonlocal previous, last_loss
        report = diloco.last_sync
        if report is None or report is previous:
            return
        previous = report
        if losses:
            last_loss = sum(losses) / len(losses)
            losses.clear()
        evaluated = None
        if eval_batches and report.committed and manager.step % args.eval_every == 0:
            evaluated = pipeline_eval(worker, eval_batches)
        counters = forwarder.counters if forwarder is not None else None
        traffic = (
            f" | sent {counters.sent}, busy {counters.busy}, resent {counters.resent},"
            f" dropped {counters.dropped}"
            if counters is not None
            else ""
        )
        orphaned = f" | orphaned {server.orphaned}" if server is not None else ""
        shown = f" | loss {last_loss:.3f}" if first and math.isfinite(last_loss) else ""
        shown += f" | eval {evaluated:.3f}" if evaluated is not None else ""
        print(
            f"{name} | outer step {report.step}{shown} | participants {report.participants}"
            f" | inner steps {worker.inner_steps}{traffic}{orphaned}"
            f" | {'committed' if report.committed else 'rolled back'}"
            f"{' | healed' if report.healed else ''}",
            flush=True,
        )
        events.emit(events.StepEvent.of(report, last_loss if first else math.nan, evaluated))
        if records is not None:
            outer_state = optimizer_tensors("outer", outer)
            state = [*diloco.backup, *(outer_state[k] for k in sorted(outer_state))]
            pairs = zip(diloco.params, diloco.backup, strict=True)
            record = {
                "group": name,
                "rank": 0,
                "incarnation": manager.incarnation,
                "step": report.step,
                "committed": report.committed,
                "healed": report.healed,
                "hash": tensors_hash(state),
                "rolled_back_to_backup": report.committed
                or all(torch.equal(p.detach(), b) for p, b in pairs),
                "loss": last_loss if first and math.isfinite(last_loss) else None,
                "eval_loss": evaluated,
                "inner_steps": worker.inner_steps,
                "time": time.time(),
                **(dataclasses.asdict(counters) if counters is not None else {}),
            }
            records.write(json.dumps(record) + "\n")
            records.flush()

    with manager, diloco:
        if server is not None:
            server.ready()  # joined and healed: take micro-batches from now on
        if first:
            corpus = load_corpus(args.data) if args.data else default_corpus()
            train_text, heldout = split_heldout(corpus)
            block = gpt.config.block_size
            loader = build_loader(train_text, block, args.batch_size, args.seed, config)
            eval_batches = heldout_batches(heldout, block, args.batch_size, args.eval_batches)
            after_step(None)
            batches = forever(loader) if manager.step < args.outer_steps else iter([])
            for x, y in batches:
                loss = worker.train(x, y)
                if loss is not None:
                    losses.append(loss)
                    if times is not None:
                        times.write(f"{time.time():.6f}\n")
                        times.flush()
                after_step(eval_batches)
                if manager.step >= args.outer_steps:
                    break
            final = pipeline_eval(worker, eval_batches)
            print(
                f"{name} | done | {manager.step} outer steps | {worker.inner_steps} inner steps"
                f" in {time.monotonic() - started:.1f}s | final loss {last_loss:.3f}"
                f" | final eval {final:.3f}",
                flush=True,
            )
            events.emit(events.DoneEvent(manager.step, 0, last_loss, final))
        else:
            assert upstream is not None
            after_step(None)
            alone_since: float | None = None
            while True:  # until the stage before is done (it counts the outer steps)
                if worker.serve(timeout=0.5):
                    alone_since = None
                    after_step(None)
                    continue
                if upstream.live() > 0:
                    alone_since = None
                elif alone_since is None:
                    alone_since = time.monotonic()
                elif time.monotonic() - alone_since > args.upstream_grace:
                    print(f"{name} | the stage before has no live worker: stopping", flush=True)
                    break
            print(f"{name} | done | {manager.step} outer steps", flush=True)
            events.emit(events.DoneEvent(manager.step, 0, None, None))
    for part in (forwarder, upstream, server):
        if part is not None:
            part.close()
    for file in (records, times):
        if file is not None:
            file.close()
    return 0


def pipeline_eval(worker: StageWorker, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean held-out loss through the whole pipeline (batches dropped on the way are skipped)."""
    was_training = worker.module.training
    worker.module.eval()
    losses = [loss for x, y in batches if (loss := worker.evaluate(x, y)) is not None]
    worker.module.train(was_training)
    return sum(losses) / len(losses) if losses else math.nan


if __name__ == "__main__":
    sys.exit(main())
