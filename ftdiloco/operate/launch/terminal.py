"""What the launcher prints: prefixed child lines under a status line that nothing overwrites."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from typing import TextIO

from ftdiloco.training import events

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def printable(text: str) -> str:
    """A child's line as one line: what a carriage return would have left, no escapes.

    A child's own progress line (``\\r`` and an erase) must not move our
    cursor, or it would overwrite the status line or the line above.
    """
    kept = text.rstrip("\r").rsplit("\r", 1)[-1]
    return _CONTROL.sub("", kept)


class _Output:
    """Prefixed lines above a live status line (only on a terminal).

    Every write survives a closed stream (``| head`` that exited, ``| tee``
    killed by the same Ctrl-C): the first failure calls ``on_closed`` once and
    later output is dropped, never raised into the launcher.
    """

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live
        self.status = ""
        self.closed = False
        self.on_closed: Callable[[], None] | None = None

    def line(self, prefix: str, text: str) -> None:
        self._write(f"{self._clear()}[{prefix}] {printable(text)}\n{self._draw()}")

    def plain(self, text: str) -> None:
        self._write(f"{self._clear()}{text}\n{self._draw()}")

    def set_status(self, text: str) -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        clear = self._clear()
        self.status = text[:width]
        self._write(clear + self._draw())

    def finish(self) -> None:
        clear = self._clear()
        self.status = ""
        self._write(clear)

    def _clear(self) -> str:
        return "\r\x1b[K" if self.live and self.status else ""

    def _draw(self) -> str:
        return self.status if self.live else ""

    def _write(self, text: str) -> None:
        if self.closed:
            return
        try:
            # One write per call: a status line is never left half drawn.
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ConnectionResetError, ValueError):
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()


def compact_log(line: str, verbose: bool) -> str | None:
    """A library JSON log line, shortened; None to hide it; other lines unchanged.

    Structured events (:mod:`ftdiloco.training.events`) repeat the line
    printed for people, so they show only with ``verbose``.
    """
    text = line.rstrip("\n")
    if text.startswith(events.PREFIX):
        return text if verbose else None
    if not text.startswith("{"):
        return text
    try:
        record = json.loads(text)
    except ValueError:
        return text
    if not isinstance(record, dict) or "event" not in record:
        return text
    level = str(record.pop("level", "info"))
    if not verbose and level not in ("warning", "error", "critical", "exception"):
        return None
    event = record.pop("event")
    record.pop("timestamp", None)
    fields = " ".join(f"{k}={v}" for k, v in record.items())
    return f"{level}: {event}" + (f" | {fields}" if fields else "")
