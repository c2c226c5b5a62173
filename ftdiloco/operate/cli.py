"""The ``ftdiloco`` command: launch a job on this machine, and look at a running one.

``ftdiloco launch``     a lighthouse and N replica groups, optionally killed at random
``ftdiloco status``     the current quorum and its members, from a lighthouse's /status
``ftdiloco hub``        the hub of a job whose groups cannot reach each other
``ftdiloco lighthouse`` the lighthouse of a batch job: stops once every group is done
``ftdiloco kill GROUP`` / ``checkpoint`` / ``shutdown``  operate a running job, for scripts
``ftdiloco set-outer-lr X [--momentum M]``  change the outer optimizer of every group live

The operating commands find the lighthouse in ``--lighthouse`` or else in
``FTDILOCO_LIGHTHOUSE`` (or ``TORCHFT_LIGHTHOUSE``), and send the token from
``FTDILOCO_TOKEN`` / ``FTDILOCO_TOKEN_FILE`` when one is set.  Each prints one
line and exits 0 when done, 2 when the lighthouse (or a group) cannot be
reached or refuses.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ftwire import logs

if TYPE_CHECKING:
    from lighthouse.client import LighthouseClient

T = TypeVar("T")

EXIT_UNREACHABLE = 2


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _count(text: str) -> int:
    return int(_positive(int)(text))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftdiloco", description="Fault-tolerant DiLoCo: launch and operate jobs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    launch = commands.add_parser(
        "launch",
        help="run a lighthouse and N replica groups on this machine",
        description="Run a lighthouse and N replica groups (each a torchrun of SCRIPT) on this "
        "machine, stream their output, and stop them all at the end, on failure or on Ctrl-C. "
        "Arguments after `--` go to the script.",
        usage="ftdiloco launch [options] [-- SCRIPT_ARGS...]",
    )
    add = launch.add_argument
    add("--groups", type=_count, help="replica groups (default 3)")
    add(
        "--stages",
        type=_count,
        metavar="N",
        help="a DiLoCo-SWARM pipeline instead of groups: the example GPT in N >= 2 stages, "
        "each a room of the lighthouse (python -m ftdiloco.examples.train_swarm)",
    )
    add(
        "--workers-per-stage",
        type=_count,
        default=2,
        metavar="M",
        help="with --stages: workers per stage, each a replica group of its room (default 2)",
    )
    add(
        "--nproc-per-node",
        type=_count,
        default=1,
        metavar="K",
        help="ranks per group, torchrun's --nproc_per_node (default 1)",
    )
    add(
        "--min-replicas",
        type=_count,
        metavar="N",
        help="groups needed for a quorum and a commit (default 2; at most --groups); "
        "with --stages, workers of a stage (default 1: a stage goes on with one left)",
    )
    add(
        "--dylu",
        action="store_true",
        help="dynamic local updates: slower groups take fewer inner steps (FTDILOCO_DYLU=1)",
    )
    add(
        "--topology",
        choices=("direct", "hub"),
        default="direct",
        help="hub: the groups train through `ftdiloco hub` instead of reaching each other",
    )
    add(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="async: commit without a late group, merge its pseudo-gradient later (FTDILOCO_MODE)",
    )
    add(
        "--kill-every",
        type=_positive(float),
        metavar="SECONDS",
        help="SIGKILL a random group this often and start it again, to watch it heal",
    )
    add(
        "--duration",
        type=_positive(float),
        metavar="SECONDS",
        help="stop the whole job after this long (success if nothing failed before)",
    )
    add(
        "--outer-steps",
        type=_count,
        metavar="N",
        help="passed to the script as --outer-steps N",
    )
    add(
        "--script",
        metavar="PATH",
        help="training script run by torchrun in every group (default: the example that "
        "ships with the package, python -m ftdiloco.examples.train_diloco)",
    )
    add(
        "--timeout",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="FTDILOCO_TIMEOUT for the groups; short suits a local demo (default 10)",
    )
    add(
        "--out",
        metavar="DIR",
        help="keep each group's log, steps.jsonl (every group's outer steps), events.jsonl, "
        "summary.json and loss.png (needs matplotlib) in DIR",
    )
    add("--seed", type=int, help="seed for picking which group to kill")
    add("-v", "--verbose", action="store_true", help="show the library's info logs too")
    add(
        "--status-line",
        choices=("auto", "on", "off"),
        default="auto",
        help="live one-line status at the bottom (auto: when stdout is a terminal)",
    )

    status = commands.add_parser(
        "status",
        help="the current quorum and its members",
        description="Show a lighthouse's current quorum and members. Exits 2 if it cannot "
        "be reached.",
    )
    _operator_flags(status)
    status.add_argument("--json", action="store_true", help="print /status as raw JSON")

    kill = commands.add_parser(
        "kill",
        help="evict a replica group from the job (the lighthouse tells it to stop)",
        description="Ask the lighthouse to kill GROUP (a replica id such as group1, or its "
        "number). Needs the token when the job has one.",
    )
    kill.add_argument("group", metavar="GROUP", help="replica id (group1) or group number (1)")
    kill.add_argument("--reason", default="ftdiloco kill", help="recorded with the kill")
    _operator_flags(kill)

    checkpoint = commands.add_parser(
        "checkpoint",
        help="ask every connected group to save a checkpoint at its next outer step",
        description="POST /v1/checkpoint to the lighthouse, which asks the manager of every "
        "group connected to it. Groups without FTDILOCO_CHECKPOINT_DIR refuse.",
    )
    _operator_flags(checkpoint)

    outer_lr = commands.add_parser(
        "set-outer-lr",
        help="change the outer learning rate (and momentum) of every group, live",
        description="POST /v1/settings to the lighthouse. Every group applies the change at "
        "the same outer step: the one after the next quorum's. Needs the token when the job "
        "has one.",
    )
    outer_lr.add_argument("lr", type=_non_negative, metavar="X", help="the new outer lr")
    outer_lr.add_argument(
        "--momentum", type=_non_negative, metavar="M", help="the new outer momentum, in [0, 1)"
    )
    _operator_flags(outer_lr)

    shutdown = commands.add_parser(
        "shutdown",
        help="stop the lighthouse (every waiting join is answered first)",
        description="Ask the lighthouse to shut down. Needs the token when the job has one.",
    )
    _operator_flags(shutdown)

    hub = commands.add_parser(
        "hub",
        help="the hub: global weights and outer optimizer for groups that cannot reach "
        "each other (FTDILOCO_TOPOLOGY=hub)",
        description="Serve DiLoCo through one HTTP port: groups join, submit pseudo-gradients "
        "and take the new global weights (see the README's 'Hub topology').",
    )
    from ftdiloco.hub.cli import add_arguments as hub_arguments

    hub_arguments(hub)

    serve = commands.add_parser(
        "lighthouse",
        help="run the lighthouse for a batch job; it stops when every group is done",
        description="Run the lighthouse daemon until all GROUPS replica groups have "
        "connected and then left (no group connected for --idle-exit seconds), so that a "
        "batch job with a lighthouse role finishes. Arguments after `--` go to `lighthouse`.",
        usage="ftdiloco lighthouse --groups N [--idle-exit S] [--log-file PATH] "
        "[-- LIGHTHOUSE_ARGS...]",
    )
    serve.add_argument("--groups", type=_count, required=True, help="groups in the job")
    serve.add_argument(
        "--idle-exit",
        type=_positive(float),
        default=30.0,
        metavar="SECONDS",
        help="how long no group may be connected before the job counts as done (default 30); "
        "longer than a group takes to restart",
    )
    serve.add_argument(
        "--log-file",
        metavar="PATH",
        help="also append the daemon's output (stdout and stderr) to PATH, which outlives "
        "the job (its directory is created)",
    )
    return parser


def _operator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lighthouse",
        metavar="URL",
        help="lighthouse address, http://host:port or host:port (comma-separated for several); "
        "default: $FTDILOCO_LIGHTHOUSE",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=3.0,
        metavar="SECONDS",
        help="give up after this long (default 3)",
    )


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our arguments, and those after the first ``--`` (for the script or daemon)."""
    args = list(argv)
    if "--" in args:
        cut = args.index("--")
        return args[:cut], args[cut + 1 :]
    return args, []


def main(argv: Sequence[str] | None = None) -> None:
    ours, rest = _split(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(ours)
    if rest and args.command in OPERATOR_COMMANDS:
        parser.error(f"{args.command} takes no arguments after --")
    if args.command == "launch":
        sys.exit(_launch(parser, args, rest))
    if args.command in OPERATOR_COMMANDS:
        sys.exit(_operate(args))
    if args.command == "hub":
        from ftdiloco.hub.cli import run as run_hub

        sys.exit(run_hub(parser, args))
    from ftdiloco.operate.launch import serve_lighthouse

    sys.exit(serve_lighthouse(rest, args.groups, args.idle_exit, log_file=args.log_file))


def _launch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    from ftdiloco.operate.launch import LaunchOptions, launch
    from ftdiloco.operate.launch.swarm import StageLayout

    try:
        swarm = None if args.stages is None else StageLayout(args.stages, args.workers_per_stage)
        if swarm is not None and args.groups is not None:
            raise ValueError("--groups and --stages: a pipeline's groups are its stage workers")
        options = LaunchOptions(
            groups=swarm.workers if swarm else args.groups or 3,
            nproc_per_node=args.nproc_per_node,
            min_replicas=args.min_replicas or (1 if swarm else 2),
            dylu=args.dylu,
            mode=args.mode,
            topology=args.topology,
            kill_every=args.kill_every,
            duration=args.duration,
            outer_steps=args.outer_steps,
            script=args.script,
            script_args=tuple(rest),
            timeout=args.timeout,
            verbose=args.verbose,
            seed=args.seed,
            status_line={"auto": None, "on": True, "off": False}[args.status_line],
            out_dir=args.out,
            swarm=swarm,
        )
    except ValueError as e:
        # One line, no usage: the flags parsed, their combination or a file is wrong.
        print(f"ftdiloco launch: {e}", file=sys.stderr)
        return 2
    return launch(options)


# -- operating a running job ------------------------------------------------------------

OPERATOR_COMMANDS = ("status", "kill", "checkpoint", "shutdown", "set-outer-lr")


def _operate(args: argparse.Namespace) -> int:
    from ftdiloco.config import ConfigError

    # The client's retry warnings would bury the one line that matters.
    logs.configure("auto", level=logging.ERROR)
    program = f"ftdiloco {args.command}"
    try:
        address, token = lighthouse_and_token(args.lighthouse)
    except ConfigError as e:
        print(f"{program}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.command == "status":
        return status(address, as_json=args.json, timeout=args.timeout, token=token)
    if args.command == "kill":
        return kill(address, args.group, args.reason, timeout=args.timeout, token=token)
    if args.command == "checkpoint":
        return checkpoint(address, timeout=args.timeout, token=token)
    if args.command == "set-outer-lr":
        return set_outer_lr(address, args.lr, args.momentum, timeout=args.timeout, token=token)
    return shutdown(address, timeout=args.timeout, token=token)


def lighthouse_and_token(
    flag: str | None, env: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    """The lighthouse address (the flag, else the environment's) and the token, if any.

    Raises :class:`ftdiloco.config.ConfigError` naming the variable when
    neither gives an address, or a variable is invalid.
    """
    from ftdiloco.config import Config, ConfigError

    env = os.environ if env is None else env
    overrides: dict[str, Any] = {} if flag is None else {"lighthouse": flag}
    try:
        config = Config.from_env(env, **overrides)
    except ConfigError as e:
        if flag is None and "is not set" in str(e):
            raise ConfigError(
                "no lighthouse: give --lighthouse URL or set FTDILOCO_LIGHTHOUSE"
            ) from None
        raise
    if config.standalone:
        raise ConfigError("FTDILOCO_LIGHTHOUSE=none: a standalone job has no lighthouse")
    if config.hub is not None:
        return config.hub, config.token  # status works against the hub too
    return ",".join(config.lighthouse), config.token


def _client(address: str, timeout: float, token: str | None) -> LighthouseClient:
    from lighthouse.client import LighthouseClient

    # Quiet: each command prints its own one line.
    return LighthouseClient(
        address, token, connect_timeout=timeout, retry_deadline=timeout, say_waiting=False
    )


class _Unreachable(enum.Enum):
    """What :func:`_ask` returns once it has said, in one line, why the request failed."""

    FAILED = enum.auto()


def _ask(
    command: str,
    address: str,
    timeout: float,
    token: str | None,
    call: Callable[[LighthouseClient], T],
    context: str = "",
) -> T | _Unreachable:
    """One request of an operator command; a failure is one line on stderr, never a traceback."""
    from lighthouse.client import LighthouseError

    try:
        with _client(address, timeout, token) as client:
            return call(client)
    except (LighthouseError, ValueError) as e:
        print(f"ftdiloco {command}: {context}{e}", file=sys.stderr)
        return _Unreachable.FAILED


def kill(
    address: str, group: str, reason: str, *, timeout: float = 3.0, token: str | None = None
) -> int:
    """Evict ``group`` (a replica id, or a number meaning ``group<N>``)."""
    replica_id = f"group{group}" if group.isdigit() else group
    known = _ask("kill", address, timeout, token, lambda c: c.kill(replica_id, reason))
    if known is _Unreachable.FAILED:
        return EXIT_UNREACHABLE
    if not known:
        print(f"ftdiloco kill: the lighthouse knows no live replica {replica_id}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"killed {replica_id}")
    return 0


def set_outer_lr(
    address: str,
    lr: float,
    momentum: float | None = None,
    *,
    timeout: float = 3.0,
    token: str | None = None,
) -> int:
    """Change every group's outer lr (and momentum) from the step after the next quorum's."""
    pending = _ask(
        "set-outer-lr",
        address,
        timeout,
        token,
        lambda c: c.set_settings(outer_lr=lr, outer_momentum=momentum),
    )
    if pending is _Unreachable.FAILED:
        return EXIT_UNREACHABLE
    shown = ", ".join(f"{name} {value:g}" for name, value in sorted(pending.items()))
    print(f"{shown}: every group applies it from the step after the next quorum's")
    return 0


def shutdown(address: str, *, timeout: float = 3.0, token: str | None = None) -> int:
    if _ask("shutdown", address, timeout, token, lambda c: c.shutdown()) is _Unreachable.FAILED:
        return EXIT_UNREACHABLE
    print(f"lighthouse {address} is shutting down")
    return 0


def checkpoint(address: str, *, timeout: float = 3.0, token: str | None = None) -> int:
    """Ask every connected group, through the lighthouse, to save at its next outer step."""
    answers = _ask("checkpoint", address, timeout, token, lambda c: c.checkpoint_all())
    if answers is _Unreachable.FAILED:
        return EXIT_UNREACHABLE
    if not answers:
        print("ftdiloco checkpoint: no connected group", file=sys.stderr)
        return EXIT_UNREACHABLE
    failed = False
    for replica_id, answer in sorted(answers.items()):
        print(f"{replica_id}: {answer}")
        failed |= not answer.startswith("checkpoint requested")
    return EXIT_UNREACHABLE if failed else 0


# -- status -------------------------------------------------------------------------------


def status(
    address: str, *, as_json: bool = False, timeout: float = 3.0, token: str | None = None
) -> int:
    """Print the lighthouse's /status as a table (or JSON); 2 if it cannot be reached."""
    doc = _ask(
        "status",
        address,
        timeout,
        token,
        lambda c: c.status(),
        "cannot read the lighthouse's status: ",
    )
    if doc is _Unreachable.FAILED:
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif doc.get("kind") == "hub":
        from ftdiloco.hub.cli import format_status as format_hub_status

        print(format_hub_status(doc, address))
    else:
        print(format_status(doc, address))
    return 0


def format_status(doc: dict[str, Any], address: str) -> str:
    """The /status document as a few lines and a table, for a terminal."""
    lines = [f"lighthouse {address}"]
    prev = doc.get("previous_quorum")
    if prev is None:
        lines.append("quorum: none formed yet")
    else:
        members = [str(m.get("replica_id")) for m in prev.get("members", [])]
        number = int(prev["quorum_id"]) - int(doc.get("epoch", 0))
        lines.append(
            f"quorum {prev['quorum_id']} (#{number} since the lighthouse started), "
            f"{len(members)} members: {', '.join(members) or '-'}"
        )
    joiners = doc.get("joiners", [])
    if joiners:
        waiting = ", ".join(str(j.get("replica_id")) for j in joiners)
        lines.append(f"waiting to join the next quorum: {waiting}")
    if doc.get("reason"):
        lines.append(f"reason: {doc['reason']}")
    header = ("REPLICA", "STEP", "ADDRESS", "HEARTBEAT", "CONNECTED", "IN QUORUM", "RECOVERING")
    rows = [header]
    for r in doc.get("replicas", []):
        age = r.get("heartbeat_age_s")
        rows.append(
            (
                str(r.get("replica_id")),
                "-" if r.get("step") is None else str(r["step"]),
                str(r.get("address") or "-"),
                "-" if age is None else f"{age:.1f}s ago",
                _yes(r.get("connected")),
                _yes(r.get("in_quorum")),
                _yes(r.get("recovering")),
            )
        )
    if len(rows) == 1:
        lines.append("no replicas known")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _yes(value: object) -> str:
    return "yes" if value else "no"


if __name__ == "__main__":
    main()
