"""Train a small byte-level GPT with fault-tolerant DiLoCo.

Run one replica group per command; groups can start, crash and rejoin at any
time while the lighthouse decides who takes part in each outer step::

    lighthouse --bind 127.0.0.1:29510 --min-replicas 1 &
    FTDILOCO_LIGHTHOUSE=http://127.0.0.1:29510 REPLICA_GROUP_ID=0 NUM_REPLICA_GROUPS=3 \\
      torchrun --nproc_per_node=1 --master_port=29600 examples/train_diloco.py --outer-steps 20

(repeat with REPLICA_GROUP_ID=1 and 2, each with its own --master_port).

With ``--checkpoint-dir`` every rank also saves its state to disk (every
``--checkpoint-every`` outer steps, on ``POST /v1/checkpoint`` to the group's
manager, and on SIGTERM, after which it exits); ``--resume`` continues a job
restarted from there, at the saved step, data position included.

The script is an ordinary training loop; the library adds two lines, the
``Manager`` (this group's membership in each outer step) and ``DiLoCo``
(which runs the outer step inside every ``sync_every``-th ``inner_opt.step()``).
Every group initialises the model from the same seed, so all start from the
same global weights, and reads its own shard of the data.  Ranks within a
group (``--nproc_per_node`` > 1) each read a shard too and average their
gradients, i.e. plain data parallelism inside the group.  Runs on the CPU.
"""

from __future__ import annotations

from ftdiloco import train_extra_missing

# Run as a program without torch: one line saying what to install, not a traceback.
if __name__ == "__main__" and (_missing := train_extra_missing("ftdiloco.examples.train_diloco")):
    raise SystemExit(_missing)

import argparse
import math
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ftdiloco.config import Config, exit_on_config_error
from ftdiloco.examples.model import GPT, MODEL_SIZES, ByteDataset, default_corpus, load_corpus
from ftdiloco.training import events
from ftdiloco.training.data import ShardSampler
from ftwire import logs

if TYPE_CHECKING:
    from ftdiloco.training.outer_loop import SyncReport


PROGRAM = "ftdiloco.examples.train_diloco"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a small byte-level GPT with fault-tolerant DiLoCo.",
        epilog="Replica group and rank come from REPLICA_GROUP_ID, NUM_REPLICA_GROUPS and "
        "torchrun; the lighthouse from FTDILOCO_LIGHTHOUSE.",
    )
    parser.add_argument(
        "--outer-steps", type=int, default=20, help="committed outer steps to run (%(default)s)"
    )
    parser.add_argument(
        "--sync-every", type=int, default=50, help="inner steps per outer step (%(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per inner step (%(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="inner AdamW learning rate (%(default)s)"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=0.1, help="inner AdamW decay (%(default)s)"
    )
    parser.add_argument(
        "--grad-clip", type=float, default=1.0, help="max gradient norm (%(default)s)"
    )
    parser.add_argument(
        "--outer-lr", type=float, default=0.7, help="outer Nesterov SGD rate (%(default)s)"
    )
    parser.add_argument(
        "--outer-momentum", type=float, default=0.9, help="outer momentum (%(default)s)"
    )
    parser.add_argument(
        "--data",
        action="append",
        metavar="PATH",
        help="text file or directory to train on (repeatable); without it, the Python "
        "standard library's own source",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="model init and data order (%(default)s)"
    )
    parser.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default="small",
        help="tiny for tests and smoke runs (%(default)s)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        metavar="PATH",
        help="save checkpoints under PATH (default: FTDILOCO_CHECKPOINT_DIR, else none)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="save every N committed outer steps (default: FTDILOCO_CHECKPOINT_EVERY, else "
        "only at the end, on request and on SIGTERM)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=5,
        metavar="N",
        help="held-out loss every N committed outer steps, and at the end (%(default)s)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=8,
        metavar="B",
        help="batches of the held-out split per evaluation (%(default)s)",
    )
    parser.add_argument(
        "--sample-bytes",
        type=int,
        default=160,
        metavar="N",
        help="length of the text sample printed at the end; 0: none (%(default)s)",
    )
    parser.add_argument(
        "--dylu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dynamic local updates: slower groups take fewer inner steps per outer step "
        "(default: FTDILOCO_DYLU)",
    )
    parser.add_argument(
        "--mode",
        choices=("sync", "async"),
        help="async: commit without a group later than the grace window; its pseudo-gradient "
        "joins a later step (default: FTDILOCO_MODE, else sync)",
    )
    parser.add_argument(
        "--slowdown",
        type=float,
        default=0.0,
        metavar="S",
        help="sleep S seconds after every inner step: a slower machine, for trying DyLU and "
        "async (%(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the checkpoint directory",
    )
    args = parser.parse_args(argv)
    if args.sample_bytes < 0:
        parser.error("--sample-bytes must be >= 0")
    if not args.slowdown >= 0:
        parser.error("--slowdown must be >= 0")
    for name in (
        "outer_steps",
        "sync_every",
        "batch_size",
        "checkpoint_every",
        "eval_every",
        "eval_batches",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def speed_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--dylu and --mode as Config fields; flags win over the environment."""
    overrides: dict[str, Any] = {}
    if args.dylu is not None:
        overrides["dylu"] = args.dylu
    if args.mode is not None:
        overrides["mode"] = args.mode
    return overrides


def checkpoint_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint flags as Config fields; flags win over the environment."""
    overrides: dict[str, Any] = {}
    if args.checkpoint_dir is not None:
        overrides["checkpoint_dir"] = args.checkpoint_dir
    if args.checkpoint_every is not None:
        overrides["checkpoint_every"] = args.checkpoint_every
    return overrides


def build_model(size: str, seed: int) -> GPT:
    # Seeded identically on every group and rank, so that all start from the
    # same global weights and the ranks of a group stay in lockstep.
    torch.manual_seed(seed)
    return GPT(MODEL_SIZES[size])


def build_optimizers(
    model: GPT, args: argparse.Namespace
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW inside a group, Nesterov SGD across groups: the DiLoCo paper's pairing.

    The outer optimizer is fused: one pass over its tensors, since the inner
    loop waits for it at every sync.
    """
    inner = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    outer = torch.optim.SGD(
        model.parameters(),
        lr=args.outer_lr,
        momentum=args.outer_momentum,
        nesterov=True,
        fused=True,
    )
    return inner, outer


def shard_of(config: Config) -> tuple[int, int]:
    """(replica group index, number of groups) for the sampler, from the environment."""
    groups = config.num_replica_groups or 1
    group_id = config.replica_group_id
    if not group_id.isdigit() or int(group_id) >= groups:
        raise SystemExit(
            f"REPLICA_GROUP_ID={group_id!r} must be an integer below NUM_REPLICA_GROUPS="
            f"{groups} (set NUM_REPLICA_GROUPS so that each group reads its own shard)"
        )
    return int(group_id), groups


def build_loader(
    corpus: bytes, block_size: int, batch_size: int, seed: int, config: Config
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    dataset = ByteDataset(corpus, block_size)
    group, groups = shard_of(config)
    sampler = ShardSampler(
        len(dataset),
        replica_group=group,
        num_replica_groups=groups,
        rank=config.rank,
        world_size=config.world_size,
        seed=seed,
    )
    if len(sampler) < batch_size:
        raise SystemExit(
            f"each shard has {len(sampler)} sequences, fewer than --batch-size={batch_size}: "
            "give more --data or use fewer groups or ranks"
        )
    # drop_last: every batch has the same shape, and every rank the same
    # number of batches (the shards are equally long), so the gradient
    # allreduce never waits for a rank that ran out.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)


def forever(
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches without end; the sampler moves to a new epoch (a new order) each pass."""
    while True:
        yield from loader


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Data parallelism within the group: every rank then takes the same inner step."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


HELDOUT_FRACTION = 0.1


def split_heldout(corpus: bytes, fraction: float = HELDOUT_FRACTION) -> tuple[bytes, bytes]:
    """(training text, held-out text): the last ``fraction`` is never trained on.

    Every group holds out the same bytes and evaluates on all of them (the
    held-out split is not sharded), so groups' held-out losses compare.
    """
    cut = len(corpus) - int(len(corpus) * fraction)
    return corpus[:cut], corpus[cut:]


def heldout_batches(
    heldout: bytes, block_size: int, batch_size: int, batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same evaluation batches on every group: windows evenly spaced over the split."""
    dataset = ByteDataset(heldout, block_size)
    count = min(len(dataset), batches * batch_size)
    if count == 0:
        raise SystemExit(
            f"the held-out split ({len(heldout)} bytes) holds no window of {block_size + 1} "
            "bytes: give more --data"
        )
    windows = [dataset[i * len(dataset) // count] for i in range(count)]
    return [
        (
            torch.stack([x for x, _ in windows[i : i + batch_size]]),
            torch.stack([y for _, y in windows[i : i + batch_size]]),
        )
        for i in range(0, count, batch_size)
    ]


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over the held-out batches, weighted by their sizes."""
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    for x, y in batches:
        _, loss = model(x, y)
        assert loss is not None
        total += loss.item() * len(x)
        count += len(x)
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample_text(model: GPT, prompt: bytes, length: int, seed: int = 0) -> str:
    """``length`` bytes the model writes after ``prompt`` (temperature 0.8), as one line."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([list(prompt)], dtype=torch.long)
    for _ in range(length):
        logits, _ = model(tokens[:, -model.config.block_size :])
        probs = torch.softmax(logits[0, -1] / 0.8, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, token.view(1, 1)], dim=1)
    model.train(was_training)
    text = bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    # One line for the launcher and the log: newlines and tabs spelled out.
    return "".join({"\n": "\\n", "\t": "\\t"}.get(c, c if c.isprintable() else "?") for c in text)


def sync_line(
    report: SyncReport, loss: float, eval_loss: float | None = None, *, paced: bool = False
) -> str:
    """The outer-step line; ``paced`` (DyLU or async) adds this group's H and staleness."""
    outcome = "committed" if report.committed else "rolled back"
    healed = " | healed" if report.healed else ""
    evaluated = "" if eval_loss is None else f" | eval {eval_loss:.3f}"
    pace = f"H {report.local_steps}, stale {report.staleness} | " if paced else ""
    return (
        f"outer step {report.step} | loss {loss:.3f}{evaluated} | "
        f"participants {report.participants} | "
        f"sync {report.seconds:.3f}s | sent {report.bytes_sent / 1e6:.1f} MB | "
        f"waited {report.waited:.3f}s, {report.hidden_fraction:.0%} hidden | "
        f"{pace}{outcome}{healed}"
    )


class Progress:
    """A one-line inner-step counter, only on a terminal: in a log file it is noise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty()

    def show(self, text: str) -> None:
        if self.enabled:
            print(f"\r{text}", end="", flush=True)

    def clear(self) -> None:
        if self.enabled:
            print("\r\x1b[K", end="", flush=True)  # back to column 0, erase the line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here, not above, so that `--help` and the helpers above work
    # (and are tested) without the fault-tolerance machinery.
    from ftdiloco.coordination.manager import Manager
    from ftdiloco.coordination.standalone import STANDALONE_NOTE, StandaloneManager
    from ftdiloco.hub.client import HubManager
    from ftdiloco.training.diloco import DiLoCo

    logs.configure()
    # Read (and validate) the environment before building anything.
    # A bad setting is one line naming the variable, not a traceback.
    with exit_on_config_error(PROGRAM):
        config = Config.from_env(**checkpoint_overrides(args), **speed_overrides(args))
    if args.resume and config.checkpoint_dir is None:
        raise SystemExit("--resume needs --checkpoint-dir (or FTDILOCO_CHECKPOINT_DIR)")
    if config.standalone and config.checkpoint_dir is not None:
        raise SystemExit(
            f"{PROGRAM}: checkpoints need a real job; FTDILOCO_LIGHTHOUSE=none trains standalone"
        )
    leader = config.rank == 0  # the group's rank 0 speaks for it
    if leader and config.standalone:
        print(STANDALONE_NOTE, flush=True)
    if config.world_size > 1:
        dist.init_process_group("gloo")  # torchrun's env:// rendezvous, this group only

    model = build_model(args.model_size, args.seed)
    corpus = load_corpus(args.data) if args.data else default_corpus()
    train_text, heldout = split_heldout(corpus)
    loader = build_loader(train_text, model.config.block_size, args.batch_size, args.seed, config)
    eval_batches = heldout_batches(
        heldout, model.config.block_size, args.batch_size, args.eval_batches
    )
    inner_opt, outer_opt = build_optimizers(model, args)
    if leader:
        print(
            f"group {config.replica_group_id} | {args.model_size} model, "
            f"{model.num_parameters() / 1e6:.2f}M parameters | {len(corpus) / 1e6:.1f} MB of "
            f"text, {len(loader)} batches per epoch per rank",
            flush=True,
        )

    progress = Progress(leader)
    losses: list[float] = []  # inner losses since the last outer step
    last_loss = math.nan
    rolled_back = inner_steps = 0
    started = time.monotonic()
    # The topology is configuration: a lighthouse (Manager), the hub
    # (FTDILOCO_TOPOLOGY=hub), or alone (FTDILOCO_LIGHTHOUSE=none).
    manager: Manager | StandaloneManager | HubManager
    if config.topology == "hub":
        manager = HubManager(config)
    elif config.standalone:
        manager = StandaloneManager(config)
    else:
        manager = Manager(config)
    with manager:
        paced = config.dylu or config.mode == "async"
        diloco = DiLoCo(
            manager,
            model,
            inner_opt,
            outer_opt,
            sync_every=args.sync_every,
            dylu=config.dylu,
            mode="async" if config.mode == "async" else "sync",
            grace=config.async_grace,
            momentum_every=config.momentum_every or config.num_replica_groups or 1,
            tokens_per_step=args.batch_size * model.config.block_size * config.world_size,
        )
        sampler = loader.sampler
        assert isinstance(sampler, ShardSampler)
        if isinstance(manager, Manager):
            # Saved with every checkpoint, so a resumed run reads on where it stopped.
            manager.checkpoint_metadata = lambda: {"sampler": sampler.state_dict()}
        if args.resume and isinstance(manager, Manager):
            if manager.resume():
                assert manager.resumed_metadata is not None
                if "sampler" in manager.resumed_metadata:
                    sampler.load_state_dict(manager.resumed_metadata["sampler"])
                if leader:
                    print(f"resumed from step {manager.step}", flush=True)
            elif leader:
                print(f"no checkpoint in {config.checkpoint_dir}; starting at step 0", flush=True)
        if config.checkpoint_dir is not None and isinstance(manager, Manager):
            manager.install_sigterm_handler()
        # Entering joins the job's next outer step before any inner step (a
        # restarted group heals there), so resuming comes first.
        with diloco:
            previous = None
            # A run resumed at or past --outer-steps has nothing left to do.
            batches = forever(loader) if manager.step < args.outer_steps else iter([])
            for x, y in batches:
                _, loss = model(x, y)
                assert loss is not None  # targets were given
                loss.backward()
                if config.world_size > 1:
                    average_gradients(model, config.world_size)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                inner_opt.step()  # every sync_every-th step also runs the outer step
                inner_opt.zero_grad(set_to_none=True)
                inner_steps += 1
                if args.slowdown:
                    time.sleep(args.slowdown)  # a slower machine, on purpose (--slowdown)
                losses.append(loss.item())

                report = diloco.last_sync
                if report is not None and report is not previous:
                    previous = report
                    last_loss = sum(losses) / len(losses)
                    losses.clear()
                    rolled_back += not report.committed
                    progress.clear()
                    evaluated = None
                    if leader and report.committed and manager.step % args.eval_every == 0:
                        evaluated = evaluate(model, eval_batches)
                    if isinstance(manager, Manager):  # exported on the manager port's /metrics
                        manager.report_loss(last_loss, eval_loss=evaluated)
                    if leader:
                        print(sync_line(report, last_loss, evaluated, paced=paced), flush=True)
                        events.emit(events.StepEvent.of(report, last_loss, evaluated))
                else:
                    progress.show(f"inner step {len(losses)}/{args.sync_every}")
                if manager.step >= args.outer_steps:
                    break
        committed = manager.step
        if config.checkpoint_dir is not None and isinstance(manager, Manager):
            manager.save_checkpoint()  # a later --resume with more --outer-steps goes on from here

    if leader:
        # The model holds the last committed global weights: the same on every group.
        eval_loss = evaluate(model, eval_batches)
        print(
            f"done | {committed} outer steps committed, {rolled_back} rolled back | "
            f"{inner_steps} inner steps in {time.monotonic() - started:.1f}s | "
            f"final loss {last_loss:.3f} | final eval {eval_loss:.3f}",
            flush=True,
        )
        events.emit(events.DoneEvent(committed, rolled_back, last_loss, eval_loss))
        if args.sample_bytes:
            prompt = b"def "
            text = sample_text(model, prompt, args.sample_bytes, seed=args.seed)
            print(f"sample | {text}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
