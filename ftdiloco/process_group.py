"""The process group that spans one rank of every replica group in a quorum.

It is rebuilt whenever the quorum id changes, on a store prefix unique to
that quorum, so a group that died and came back never meets stale keys, and a
half-built group from an abandoned quorum never meets a new one.  Gloo on CPU,
NCCL on GPU; every operation carries the collective deadline.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol, cast

import structlog
import torch
from torch._C._distributed_c10d import (
    PrefixStore,
    ProcessGroupGloo,
    TCPStore,
    Work,
)

log = structlog.get_logger(__name__)


class CrossGroup(Protocol):
    """What the manager uses of a gloo or NCCL backend (the stubs omit collectives)."""

    def allreduce(self, tensors: list[torch.Tensor]) -> Work: ...

    def allgather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor]
    ) -> Work: ...

    def abort(self) -> None: ...


def host_store(host: str, port: int, timeout: float) -> TCPStore:
    """The TCPStore a group's rank 0 hosts for the quorums that pick it."""
    return TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
        use_libuv=True,
    )


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"store address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def connect(
    *,
    backend: str,
    store_address: str,
    prefix: str,
    rank: int,
    world_size: int,
    timeout: float,
    host: str,
) -> CrossGroup:
    """Build the cross-group process group; blocks until every member connects.

    Callers run this off the main thread: a member that died after the quorum
    formed would otherwise hold the caller until the deadline.
    """
    store_host, store_port = split_address(store_address)
    deadline = timedelta(seconds=timeout)
    client = TCPStore(store_host, store_port, is_master=False, timeout=deadline, use_libuv=True)
    store = PrefixStore(prefix, client)
    if backend == "gloo":
        opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = deadline
        opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        pg = cast(CrossGroup, ProcessGroupGloo(store, rank, world_size, opts))
    elif backend == "nccl":
        from torch._C._distributed_c10d import ProcessGroupNCCL  # absent from CPU builds

        nccl_opts = ProcessGroupNCCL.Options()
        nccl_opts._timeout = deadline
        pg = cast(CrossGroup, ProcessGroupNCCL(store, rank, world_size, nccl_opts))
        # NCCL connects lazily; a first tiny collective makes every member
        # meet now, inside the caller's deadline, not in the first allreduce.
        probe = torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()))
        pg.allreduce([probe]).wait()
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'gloo' or 'nccl'")
    log.debug("process group ready", prefix=prefix, rank=rank, world_size=world_size)
    return pg


def abort(pg: CrossGroup) -> None:
    """Abandon a group whose peers are gone, releasing the collectives stuck in it."""
    try:
        pg.abort()
    except Exception as e:  # aborting a broken group may itself fail; nothing to do
        log.debug("process group abort failed", error=repr(e))
