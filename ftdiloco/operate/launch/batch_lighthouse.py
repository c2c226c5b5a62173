"""The lighthouse of a batch job (the torchx component's lighthouse role).

The plain daemon runs until it is stopped, so a job with a lighthouse role
would never finish; this one stops it once every group has connected and
then left.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from lighthouse.cli import listening_url
from lighthouse.client import LighthouseClient, LighthouseError


def serve_lighthouse(
    lighthouse_args: Sequence[str],
    groups: int,
    idle_exit: float,
    poll: float = 0.5,
    log_file: str | None = None,
) -> int:
    """Run the lighthouse until every one of ``groups`` has connected and then left.

    "Left" means no replica connected and none waiting to join for
    ``idle_exit`` seconds, long enough for a crashed group to be restarted.
    With ``log_file``, the daemon's stdout and stderr are also appended there.
    Returns the daemon's exit code (0 after a clean stop).
    """
    copy: TextIO | None = None
    if log_file is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            copy = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 -- closed below
        except OSError as e:
            print(f"ftdiloco lighthouse: cannot write --log-file {log_file}: {e}", file=sys.stderr)
            return 2
    try:
        return _serve_lighthouse(lighthouse_args, groups, idle_exit, poll, copy)
    finally:
        if copy is not None:
            copy.close()


def _serve_lighthouse(
    lighthouse_args: Sequence[str],
    groups: int,
    idle_exit: float,
    poll: float,
    copy: TextIO | None,
) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lighthouse.cli", *lighthouse_args],
        stdout=subprocess.PIPE,
        # Into the log file too, when there is one; else straight to ours.
        stderr=subprocess.STDOUT if copy is not None else None,
        text=True,
    )
    assert proc.stdout is not None
    url = None
    for line in proc.stdout:
        _emit(line, copy)
        url = listening_url(line)
        if url is not None:
            break
    if url is None:
        return proc.wait()
    forwarder = threading.Thread(target=_forward, args=(proc.stdout, copy), daemon=True)
    forwarder.start()

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    seen: set[str] = set()
    idle_since: float | None = None
    try:
        with LighthouseClient(url, connect_timeout=2, retry_deadline=1) as client:
            while not stop.is_set() and proc.poll() is None:
                try:
                    status = client.status()
                except LighthouseError:
                    stop.wait(poll)
                    continue
                replicas = status.get("replicas", [])
                connected = {r["replica_id"] for r in replicas if r.get("connected")}
                # Polled, so a group is noticed if it stays longer than a poll; a
                # training group stays connected for its whole run.
                for replica_id in sorted({r["replica_id"] for r in replicas} - seen):
                    seen.add(replica_id)
                    _note(f"ftdiloco: saw {replica_id} ({len(seen)} of {groups} groups)", copy)
                if connected or status.get("joiners"):
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= idle_exit:
                    if len(seen) >= groups:
                        came = f"ftdiloco: all {groups} groups came and went; stopping"
                        _note(f"{came} the lighthouse", copy)
                        break
                    # Said once per idle spell, so a user (and a test) sees why it stays.
                    _note(
                        f"ftdiloco: idle with {len(seen)} of {groups} groups seen;"
                        " waiting for the others",
                        copy,
                    )
                    idle_since = math.inf  # until the next busy moment resets it
                stop.wait(poll)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.terminate()
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    # The daemon has exited: its pipe ends, and the last lines reach the log file.
    forwarder.join(timeout=5)
    return code


def _emit(line: str, copy: TextIO | None) -> None:
    if copy is not None:
        copy.write(line)
        copy.flush()
    with contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.write(line)
        sys.stdout.flush()


def _forward(stream: TextIO, copy: TextIO | None) -> None:
    for line in stream:
        _emit(line, copy)


def _note(text: str, copy: TextIO | None) -> None:
    """One line on stderr, and in the log file when there is one."""
    if copy is not None:
        copy.write(text + "\n")
    print(text, file=sys.stderr, flush=True)
