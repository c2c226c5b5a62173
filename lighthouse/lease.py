"""One serving lighthouse per job: an exclusive lock on a file that every candidate shares.

Groups may be given several lighthouse addresses for failover.  If two
lighthouses served one job at once, groups that ended up on different ones
would form separate quorums -- a forked history by construction.  So each
lighthouse of a highly available pair is started with the same ``--lease
PATH``; only the one holding the lock on that file serves joins, the others
answer 503 ``standby`` (clients then try the next address) and take the lock
over the moment its holder dies: the kernel drops a dead process's lock.

The file must live where every candidate reaches it with working POSIX
locks: one host's local disk (lighthouses on one machine, restarted by a
supervisor), or a shared filesystem whose locking is reliable.  What a
network partition between the lighthouses and that filesystem does is
that filesystem's guarantee, not ours.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Lease:
    """The lock, held or waited for; the holder writes who it is into the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, holder: str) -> bool:
        """Take the lock if it is free (never blocks); True if this process holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lease, as its holder wrote it ("" if unknown)."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock
