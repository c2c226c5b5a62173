"""The ``lighthouse`` command: flags in, a running daemon out.

It prints exactly one line to stdout, ``lighthouse listening on URL``, once the
socket is bound (scripts wait for it to learn the port); logs go to stderr.
SIGINT and SIGTERM answer every waiting join and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from ftwire import logs, serving

if TYPE_CHECKING:
    from lighthouse.server import LighthouseServer, ServerConfig

DEFAULT_BIND = "0.0.0.0:29510"

_log = structlog.get_logger()


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lighthouse",
        description="Decides, for every outer step, which replica groups take part.",
    )
    # The reference spells its flags with underscores; both spellings work.
    add = parser.add_argument
    add(
        "--min-replicas",
        "--min_replicas",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="replicas needed to form a quorum (default 1)",
    )
    add(
        "--join-timeout-ms",
        "--join_timeout_ms",
        type=_int_at_least(0),
        default=60_000,
        metavar="MS",
        help="how long to wait for stragglers after the first join (default 60000)",
    )
    add(
        "--quorum-tick-ms",
        "--quorum_tick_ms",
        type=_int_at_least(1),
        default=100,
        metavar="MS",
        help="longest the timer sleeps between re-evaluations (default 100)",
    )
    add(
        "--heartbeat-timeout-ms",
        "--heartbeat_timeout_ms",
        type=_int_at_least(1),
        default=5_000,
        metavar="MS",
        help="a replica silent this long is dead (default 5000)",
    )
    add(
        "--bind",
        type=serving.bind_address,
        default=DEFAULT_BIND,
        metavar="HOST:PORT",
        help=f"address to listen on; port 0 picks a free one (default {DEFAULT_BIND})",
    )
    add(
        "--lease",
        metavar="PATH",
        help="file whose lock decides which of several lighthouses serves the job;"
        " give every lighthouse of a highly available set the same one (default: none,"
        " this lighthouse always serves)",
    )
    add(
        "--rooms",
        metavar="NAMES",
        help="comma-separated names of extra quorums this daemon serves besides the default"
        " one, each at /rooms/NAME (the stages of a DiLoCo-SWARM job, or several jobs;"
        " lighthouse.rooms)",
    )
    add(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="uvloop (if installed: pip install uvloop) spends less CPU per request and"
        " per WebSocket frame, which is what limits a daemon serving ~1000 replicas on"
        " one core (default asyncio)",
    )
    add(
        "--token-file",
        "--token_file",
        metavar="PATH",
        help=f"file holding the shared token (default: ${serving.TOKEN_ENV}, else no token)",
    )
    add(
        "--log-format",
        "--log_format",
        choices=("auto", "console", "json"),
        default="auto",
        help="auto: console lines on a terminal, JSON lines otherwise (default auto)",
    )
    return parser


LISTENING = "lighthouse listening on "


def listening_url(line: str) -> str | None:
    """The URL in the daemon's "listening on" line; None for any other line."""
    return serving.listening_url(line, LISTENING)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    token = serving.token_from(parser, args.token_file)
    # Imported after the flags are checked, so that mistakes are answered without loading aiohttp.
    from lighthouse.server import ServerConfig

    host, port = args.bind
    config = ServerConfig(
        min_replicas=args.min_replicas,
        join_timeout=args.join_timeout_ms / 1000,
        heartbeat_timeout=args.heartbeat_timeout_ms / 1000,
        quorum_tick=args.quorum_tick_ms / 1000,
        token=token,
        lease=args.lease,
    )
    run = _event_loop(parser, args.event_loop)
    logs.configure(args.log_format)
    daemon = _daemon(parser, config, args.rooms)
    sys.exit(
        run(
            serving.serve_until_stopped(
                daemon, host, port, program="lighthouse", listening=LISTENING, token=token
            )
        )
    )


def _event_loop(
    parser: argparse.ArgumentParser, name: str
) -> Callable[[Coroutine[Any, Any, int]], int]:
    """What runs the daemon's main coroutine: asyncio's own loop, or uvloop's."""
    if name == "asyncio":
        return asyncio.run
    try:
        # By name: uvloop is optional, and mypy checks this file without it too.
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        parser.error("--event-loop uvloop: uvloop is not installed (pip install uvloop)")
    run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return run


def _daemon(
    parser: argparse.ArgumentParser, config: ServerConfig, rooms: str | None
) -> LighthouseServer:
    """The plain daemon, or with ``--rooms`` the one that also serves named rooms."""
    from lighthouse.server import LighthouseServer

    if rooms is None:
        return LighthouseServer(config)
    from lighthouse.rooms import RoomsLighthouse, parse_rooms

    try:
        return RoomsLighthouse(config, parse_rooms(rooms))
    except ValueError as e:
        parser.error(f"--rooms: {e}")


if __name__ == "__main__":
    main()
