"""Averaging tensors across groups in buckets, each sent as soon as it is ready.

The manager owns the process group, the deadline and the bookkeeping of a
failed step; this module owns how tensors are laid out for the collective
(buckets and in-place slices), the thread discipline that keeps torch's
OpenMP team from fighting gloo for the cores, and the :class:`Work` handle
the training loop waits on.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# The allreduce goes in buckets of at most BUCKET_BYTES, each sent as soon as
# it is ready, so copying, sending and averaging overlap (smaller buckets
# measured slower with gloo: each collective has a fixed cost).  Tensors of at
# least DIRECT_BYTES are sent in place, sliced to BUCKET_BYTES; smaller ones
# are copied into flat buckets, so a model's many small vectors cost few
# collectives.
BUCKET_BYTES = 16 << 20
DIRECT_BYTES = 1 << 20
# torch's parallel grain (at::internal::GRAIN_SIZE): smaller ops stay on the
# calling thread.  See serially.
SERIAL_NUMEL = 32768


class Work:
    """An allreduce in flight; ``wait`` returns whether it succeeded."""

    def __init__(self, finish: Callable[[], bool]) -> None:
        self._finish = finish
        self._ok: bool | None = None
        # Payload bytes this group sent, when the exchange knows them.
        self.nbytes: int | None = None
        # True when the wait was given up while the collective still ran: a
        # thread of the aborted backend may yet write into the tensors, so the
        # caller must not reuse them (DiLoCo takes fresh buffers).
        self.abandoned = False

    def wait(self) -> bool:
        if self._ok is None:
            self._ok = self._finish()
        return self._ok

    @classmethod
    def done(cls, ok: bool) -> Work:
        return cls(lambda: ok)


class Bucketer:
    """Lays tensors out for the collective, reusing its flat buffers from step to step."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def pack(
        self, tensors: Sequence[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The buckets to allreduce, each with (tensor, its summed values in the bucket) pairs.

        Lazy, so the caller sends each bucket before the next is copied.  First
        the tensors sent in place (contiguous, and large or alone), sliced to
        BUCKET_BYTES: no copy, so the first collective starts at once.  Then
        the others, copied into flat buffers of at most BUCKET_BYTES (or one
        tensor's size, for a large tensor that is not contiguous).
        """
        small = []
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if t.is_contiguous() and (nbytes >= DIRECT_BYTES or len(tensors) == 1):
                whole, step = t.view(-1), max(1, BUCKET_BYTES // t.element_size())
                for start in range(0, whole.numel(), step):
                    piece = whole[start : start + step]
                    yield piece, [(piece, piece)]
            else:
                small.append(t)
        groups: list[list[torch.Tensor]] = []
        size = 0
        for t in small:
            same = groups and groups[-1][0].dtype == t.dtype and groups[-1][0].device == t.device
            if not same or size + t.numel() * t.element_size() > BUCKET_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.numel() * t.element_size()
        for index, group in enumerate(groups):
            numel = sum(t.numel() for t in group)
            key = (index, group[0].dtype, group[0].device, numel)
            cached = self._cache.get(key)
            flat = (
                cached[0]
                if cached
                else torch.empty(numel, dtype=group[0].dtype, device=group[0].device)
            )
            self._cache[key] = [flat]
            parts, offset = [], 0
            for t in group:
                summed = flat[offset : offset + t.numel()].view_as(t)
                serially(lambda out, src: out.copy_(src), summed, t)
                parts.append((t, summed))
                offset += t.numel()
            yield flat, parts


def serially(
    op: Callable[[torch.Tensor, torch.Tensor], object], out: torch.Tensor, src: torch.Tensor
) -> None:
    """``op(out, src)`` for an elementwise op, on the calling thread alone.

    A large op on CPU tensors goes to torch's OpenMP team, whose threads then
    compete for the cores with gloo's, busy with the other buckets; when they
    do not all get a core the team waits for its slowest member (2 processes
    on 2 cores: 30 ms instead of 0.3 ms to divide 4 MB).  Slices below torch's
    parallel grain never leave the calling thread.
    """
    at_once = (
        src.device.type != "cpu"
        or torch.get_num_threads() == 1
        or src.numel() <= SERIAL_NUMEL
        or not (out.is_contiguous() and src.is_contiguous())
    )
    if at_once:
        op(out, src)
        return
    out, src = out.view(-1), src.view(-1)
    for start in range(0, src.numel(), SERIAL_NUMEL):
        op(out[start : start + SERIAL_NUMEL], src[start : start + SERIAL_NUMEL])


def start_thread(fn: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run ``fn`` on a fresh daemon thread: an abandoned call must not block the next one."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=target, name=f"ftdiloco-{name}", daemon=True).start()
    return future
