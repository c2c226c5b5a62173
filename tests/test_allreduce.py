"""The allreduce's layout (ftdiloco.coordination.allreduce), without a process group.

What the manager relies on: every tensor is covered exactly once, large
contiguous tensors travel in place (no copy) in slices of at most a bucket,
small ones are copied into flat buckets of one dtype that never exceed a
bucket, the flat buffers are reused from step to step, and the elementwise
helper gives the same result serially as at once.
"""

from __future__ import annotations

import pytest
import torch

from ftdiloco.coordination import allreduce
from ftdiloco.coordination.allreduce import Bucketer, Work, serially


def small_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64-byte buckets, "large" from 32 bytes: every rule shows on tiny tensors.
    monkeypatch.setattr(allreduce, "BUCKET_BYTES", 64)
    monkeypatch.setattr(allreduce, "DIRECT_BYTES", 32)


def test_every_tensor_is_covered_once_in_place_or_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    small_bucket(monkeypatch)
    large = torch.arange(40, dtype=torch.float32)  # 160 bytes: in place, 3 slices
    smalls = [torch.full((3,), float(i)) for i in range(7)]  # 12 bytes each: copied
    halves = [torch.ones(2, dtype=torch.float16)]  # another dtype: its own bucket
    strided = torch.arange(20, dtype=torch.float32)[::2]  # not contiguous: copied
    tensors = [large, *smalls, *halves, strided]
    buckets = list(Bucketer().pack(tensors))

    covered: dict[int, int] = {}
    for bucket, parts in buckets:
        assert bucket.numel() * bucket.element_size() <= 64 or len(parts) == 1
        assert len({t.dtype for t, _ in parts}) == 1
        for t, summed in parts:
            assert summed.shape == t.shape
            if t is not summed:  # copied: the bucket holds its values now
                assert torch.equal(summed, t)
            covered[id(t)] = covered.get(id(t), 0) + summed.numel()
    # The large tensor's slices are views of it, with no copy.
    in_place = [b for b, parts in buckets if parts[0][0] is parts[0][1]]
    assert [b.numel() for b in in_place] == [16, 16, 8]
    assert all(
        b.untyped_storage().data_ptr() == large.untyped_storage().data_ptr() for b in in_place
    )
    # Every element of every other tensor is in exactly one bucket.
    for t in tensors[1:]:
        assert covered[id(t)] == t.numel()


def test_flat_buffers_are_reused_from_step_to_step(monkeypatch: pytest.MonkeyPatch) -> None:
    small_bucket(monkeypatch)
    bucketer = Bucketer()
    tensors = [torch.randn(3) for _ in range(4)]
    first = [b.data_ptr() for b, _ in bucketer.pack(tensors)]
    second = [b.data_ptr() for b, _ in bucketer.pack([t * 2 for t in tensors])]
    assert first == second


def test_serially_equals_the_op_at_once() -> None:
    src = torch.randn(allreduce.SERIAL_NUMEL * 3 + 7)
    out_serial, out_once = torch.empty_like(src), torch.empty_like(src)
    serially(lambda out, s: torch.div(s, 3, out=out), out_serial, src)
    torch.div(src, 3, out=out_once)
    assert torch.equal(out_serial, out_once)


def test_work_waits_once_and_remembers_the_outcome() -> None:
    calls = []
    work = Work(lambda: calls.append(1) or True)
    assert work.wait() and work.wait()
    assert calls == [1] and not work.abandoned
    assert not Work.done(False).wait()
