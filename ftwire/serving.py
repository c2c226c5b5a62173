"""Running one of the project's servers from its command line.

The lighthouse and the hub start the same way: a ``HOST:PORT`` flag, a token
from a file or the environment, a warning when a token-less server listens
beyond loopback, SIGINT/SIGTERM for a clean stop, and one ``... listening on
URL`` line that scripts and tests wait for.  This module is that, once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Protocol

import structlog

from ftwire import guard

_log = structlog.get_logger(__name__)

# The environment variable every server and client reads its bearer token from.
TOKEN_ENV = "FTDILOCO_TOKEN"


class Server(Protocol):
    """What :func:`serve_until_stopped` needs of a server."""

    async def start(self, host: str, port: int) -> str: ...

    def request_stop(self) -> None: ...

    async def wait_stopped(self) -> None: ...


def bind_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) for ``--bind``, as an argparse type."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:29510
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with PORT in 0-65535, got {text!r}")
    return host, int(port_text)


def token_from(parser: argparse.ArgumentParser, path: str | None) -> str | None:
    """The token in ``path`` (--token-file), else $FTDILOCO_TOKEN; a bad file is a usage error."""
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read --token-file {path}: {e}")
    if not token:
        parser.error(f"--token-file {path} is empty")
    return token


def listening_url(line: str, listening: str) -> str | None:
    """The URL in a server's ``listening`` line; None for any other line."""
    return line[len(listening) :].strip() if line.startswith(listening) else None


async def serve_until_stopped(
    server: Server, host: str, port: int, *, program: str, listening: str, token: str | None
) -> int:
    """Serve until SIGINT, SIGTERM or the server's own stop; the process's exit code."""
    if token is None and not guard.is_loopback(host):
        _log.warning(
            "no token on a non-loopback address",
            bind=host,
            risk=f"anyone who can reach the {program} can use every endpoint",
            fix=f"set --token-file or ${TOKEN_ENV}",
        )
    try:
        url = await server.start(host, port)
    except OSError as e:
        print(f"{program}: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    # Only now: a script that signals us as soon as it reads the URL gets a clean stop.
    print(f"{listening}{url}", flush=True)
    await server.wait_stopped()
    return 0
