"""``ftdiloco hub``: the flags, and the process around :class:`ftdiloco.hub.server.HubServer`.

The flags are declared here without importing torch or aiohttp, so
``ftdiloco --help`` stays fast; ``run`` imports the server.  Like the
lighthouse, the hub prints one line to stdout once it accepts connections
(``hub listening on URL``), logs to stderr, and on SIGTERM/SIGINT saves its
state and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ftwire import logs, serving

__all__ = ["LISTENING", "add_arguments", "format_status", "listening_url", "run"]

LISTENING = "hub listening on "


def listening_url(line: str) -> str | None:
    """The URL in the hub's "listening on" line; None for any other line."""
    return serving.listening_url(line, LISTENING)


def format_status(doc: dict[str, Any], address: str) -> str:
    """A hub's /status for ``ftdiloco status``: the step, the round, a line per group."""
    outer = doc.get("outer") or {}
    lines = [
        f"hub {address} | step {doc.get('step')} (saved at {doc.get('saved_step')})"
        f" | outer lr {outer.get('lr', '-')} momentum {outer.get('momentum', '-')}"
        f" | failed rounds {doc.get('rounds_failed')}"
    ]
    r = doc.get("round")
    if r:
        who = r.get("members") or r.get("joined") or []
        lines.append(
            f"round at step {r.get('step')}: {', '.join(who)}; submitted"
            f" {', '.join(r.get('submitted') or []) or 'none'}"
            + (f"; failed: {r['failed']}" if r.get("failed") else "")
        )
    lines.append(f"{'group':<16} {'step':>6} {'stale':>6} {'rate/s':>8} {'seen':>8}")
    for g in doc.get("groups", []):
        rate = g.get("rate")
        shown = f"{rate:.2f}" if isinstance(rate, (int, float)) else "-"
        lines.append(
            f"{g.get('group', '?'):<16} {g.get('step', '-')!s:>6} {g.get('staleness', '-')!s:>6}"
            f" {shown:>8} {g.get('seen_s_ago', '-')!s:>7}s"
        )
    return "\n".join(lines)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--bind", type=serving.bind_address, default=("127.0.0.1", 29520), metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:29520; port 0: a free one)")  # fmt: skip
    add("--state", type=Path, default=Path("hub-state.safetensors"), metavar="PATH",
        help="the state file: loaded at start if it exists, saved atomically")  # fmt: skip
    add("--min-groups", type=_count, default=1, help="a round needs this many groups (1)")
    add("--join-timeout", type=_positive, default=60.0, metavar="S",
        help="after a round's first join, form it without the groups missing (60)")  # fmt: skip
    add("--round-timeout", type=_positive, default=60.0, metavar="S",
        help="fail a round whose submissions take longer (60)")  # fmt: skip
    add("--heartbeat-timeout", type=_positive, default=10.0, metavar="S",
        help="a group silent this long is gone (10)")  # fmt: skip
    add("--save-every", type=_count, default=1, metavar="N",
        help="save every N commits (1: a commit is saved before it is answered)")  # fmt: skip
    add("--outer-lr", type=_positive, help="outer learning rate (default: the first group's)")
    add("--outer-momentum", type=float, help="outer momentum (default: the first group's)")
    add("--token-file", metavar="PATH", help="the token, else $FTDILOCO_TOKEN")
    add("--log-format", choices=("auto", "console", "json"), default="auto")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ftdiloco.hub.server import HubOptions, HubServer

    host, port = args.bind
    options = HubOptions(
        state_path=args.state,
        token=serving.token_from(parser, args.token_file),
        min_groups=args.min_groups,
        join_timeout=args.join_timeout,
        round_timeout=args.round_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        save_every=args.save_every,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
    )
    logs.configure(args.log_format)
    try:
        server = HubServer(options)
    except (OSError, ValueError) as e:
        print(f"ftdiloco hub: cannot load {args.state}: {e}", file=sys.stderr)
        return 1
    return asyncio.run(
        serving.serve_until_stopped(
            server, host, port, program="ftdiloco hub", listening=LISTENING, token=options.token
        )
    )
