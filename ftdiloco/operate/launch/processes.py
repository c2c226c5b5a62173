"""The launcher's children: whole process trees, started in their own sessions, ended by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Sequence

# A stopped child gets this long to exit after SIGTERM before its process
# group is SIGKILLed.
STOP_GRACE_S = 5.0


# -- process trees -------------------------------------------------------------------
#
# torchrun starts every worker in a session of its own, so the process group
# of a torchrun does not hold its workers: killing that group orphans them and
# they train on.  The launcher therefore finds a child's whole tree (Linux
# /proc; elsewhere only the process group is reached) and signals every
# process in it by PID, checking each PID's start time so that a PID reused
# since the walk is never hit.

ProcessId = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def process_tree(root: int) -> list[ProcessId]:
    """``root`` and every descendant alive now, parents first."""
    me = _stat(root)
    if me is None:
        return []
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _stat(int(entry))
                if stat is not None:
                    children.setdefault(stat[0], []).append(int(entry))
    tree, todo = [(root, me[1])], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            stat = _stat(pid)
            if stat is not None:
                tree.append((pid, stat[1]))
                todo.append(pid)
    return tree


def alive(process: ProcessId) -> bool:
    stat = _stat(process[0])
    return stat is not None and stat[1] == process[1]


def signal_processes(processes: Sequence[ProcessId], sig: signal.Signals) -> None:
    for process in processes:
        if alive(process):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process[0], sig)


class Child:
    """One process we started, in a session of its own (its process group id is its pid)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        stat = _stat(proc.pid)
        # Who this pid is: once it is gone and reaped, the number may be reused.
        self.identity: ProcessId | None = None if stat is None else (proc.pid, stat[1])
        self.started = time.monotonic()
        self.killed = False  # by the launcher, on purpose: restart, don't fail
        self.stopping = False  # by the launcher, at the end
        self.watcher: asyncio.Task[None] | None = None

    def kill(self) -> None:
        """SIGKILL this process, its process group and every descendant, at once."""
        if self.identity is not None and alive(self.identity):
            # Frozen, it cannot start a worker while we look for its workers.
            signal_processes([self.identity], signal.SIGSTOP)
            signal_processes(process_tree(self.pid)[1:], signal.SIGKILL)
            signal_processes([self.identity], signal.SIGKILL)
        self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM, a grace period to exit, then SIGKILL for whatever is left of the tree."""
        self.stopping = True
        # Walked before it exits: afterwards its orphans are no longer below it.
        tree = process_tree(self.pid) if self.identity and alive(self.identity) else []
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
        self.kill()  # what is still below it, if it is still there
        signal_processes(tree, signal.SIGKILL)  # what it left behind
        return await self.proc.wait()


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+), so that no outgoing
    connection (gloo opens many) can take it between now and its use."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")
