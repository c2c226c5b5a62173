"""Real processes for integration tests: started here, ended here, by PID.

Each child's output is read on a thread into a queue so a test can await a
line ("listening on", "IN_COLLECTIVE") with a deadline instead of sleeping;
every line is also kept with the wall-clock time it arrived, so a test can
time events from the outside.  Signals go to one PID each: SIGKILL, SIGSTOP
and SIGCONT (``kill``, ``freeze``, ``thaw``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from ftdiloco.operate.launch.processes import free_port
from lighthouse.cli import LISTENING, listening_url

__all__ = [
    "EVENT_PREFIX",
    "ROOT",
    "Proc",
    "free_port",
    "process_pool",
    "start_lighthouse",
    "temporary_log",
]

ROOT = Path(__file__).resolve().parent.parent
# Lines a bench worker prints for its driver: this, then one JSON object.
EVENT_PREFIX = "@ "


class Proc:
    """A child process; its stdout lines arrive on a queue, read on a thread.

    Lines that start with :data:`EVENT_PREFIX` carry one JSON object each
    (the bench workers' results): they go to :meth:`next_event` instead.
    With ``log``, stderr goes to that file rather than into the output (a
    chatty child's logs then cost the reader nothing); :meth:`tail` shows both.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        *,
        log: IO[str] | None = None,
    ) -> None:
        self.name = name
        self.lines: queue.Queue[str | None] = queue.Queue()  # None: the output ended
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.output: list[str] = []
        self.stamped: list[tuple[float, str]] = []  # (time.time() on arrival, line)
        self.started = time.time()
        self.log = log
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if log is None else log,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.stamped.append((time.time(), line))
            self.output.append(line)
            if line.startswith(EVENT_PREFIX):
                self.events.put(json.loads(line[len(EVENT_PREFIX) :]))
            else:
                self.lines.put(line)
        self.lines.put(None)
        self.events.put(None)

    def next_event(self, timeout: float) -> dict[str, Any]:
        """The next ``@ {json}`` event, waiting at most ``timeout`` seconds."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no event in {timeout:g}s\n{self.tail()}") from None
        if event is None:
            self.events.put(None)
            raise EOFError(f"{self.name} exited ({self.popen.wait()})\n{self.tail()}")
        return event

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, text: str, timeout: float) -> str:
        """The first (not yet consumed) line containing ``text``."""
        return self.wait_line(lambda line: text in line, timeout, repr(text))

    def wait_line(
        self, match: Callable[[str], bool], timeout: float, what: str = "the line awaited"
    ) -> str:
        """The first (not yet consumed) line for which ``match`` is true."""
        text = what
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name}: no line with {text} in {timeout}s:\n{self.tail()}"
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)
                code = self.popen.wait()
                msg = f"{self.name} exited ({code}) before printing {text}:\n{self.tail()}"
                raise EOFError(msg)
            if match(line):
                return line

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye (a frozen one dies too)."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):  # it ended since the poll
                os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def freeze(self) -> None:
        """SIGSTOP: alive, sockets open, but it runs nothing until ``thaw``."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def lines_since(self, when: float) -> list[str]:
        """Every line that arrived at or after ``when`` (time.time())."""
        return [line for t, line in list(self.stamped) if t >= when]

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def tail(self, n: int = 40) -> str:
        text = "".join(self.output[-n:])
        if self.log is not None:
            self.log.flush()
            logged = Path(self.log.name).read_text(errors="replace").splitlines()[-n:]
            text += f"-- {self.name}'s stderr --\n" + "\n".join(logged)
        return text


def temporary_log(name: str) -> IO[str]:
    """A file for a child's stderr (``Proc(log=...)``); process_pool closes and deletes it."""
    return tempfile.NamedTemporaryFile("w", prefix=f"ftdiloco-{name}-", suffix=".log")


@contextmanager
def process_pool(save_to: Path | None = None) -> Iterator[list[Proc]]:
    """Every process a test starts goes in here; all are killed at the end.

    With ``save_to``, each process's output (with arrival times) is written
    there as ``<name>-<pid>.log`` for a post-mortem.
    """
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            if proc.log is not None:
                proc.log.close()
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            for proc in procs:
                lines = [f"{t:.3f} {line}" for t, line in list(proc.stamped)]
                (save_to / f"{proc.name}-{proc.pid}.log").write_text("".join(lines))


def start_lighthouse(
    procs: list[Proc],
    *flags: str,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    log: IO[str] | None = None,
) -> tuple[Proc, str]:
    """A lighthouse on loopback (``port`` 0: a free one) and its URL, once it listens."""
    proc = Proc(
        "lighthouse",
        [sys.executable, "-m", "lighthouse.cli", "--bind", f"127.0.0.1:{port}", *flags],
        env=env,
        log=log,
    )
    procs.append(proc)
    url = listening_url(proc.wait_for(LISTENING, timeout=30))
    assert url is not None
    return proc, url
