"""Compressed pseudo-gradient exchange: error bounds per format, fp32 averaging, error feedback.

The per-element bounds are derived from each format, not fitted:

- bf16 keeps 8 significant bits, round-to-nearest-even: |y - x| <= 2^-8 |x|
  (half a unit in the last place, relative to the leading power of two).
- fp16 keeps 11 significant bits: |y - x| <= 2^-11 |x| from 2^-14 up to 65504;
  below 2^-14 values are subnormal with spacing 2^-24, so |y - x| <= 2^-25.
- int8 maps a block's absmax A to 127 and rounds to the nearest integer:
  |y - x| <= half a step = A / 254.
- int4 maps A to 7 and rounds to the nearest integer in [-7, 7]: |y - x| <= A / 14.
- fp8 e4m3 maps A to 448 (scale s = A / 448) and keeps 4 significant bits:
  |y - x| <= 2^-4 |x| for normal codes (>= 2^-6 s), and 2^-10 s (half the
  subnormal spacing 2^-9) below; their sum bounds both cases.

The blockwise formats compute x * (qmax / A) and q * (A / qmax) in fp32: a few
roundings of relative size 2^-24 each, so they get A * 2^-22 of slack.

Averaging runs over real gloo groups, one thread per rank on a shared
HashStore: fast, and the same collectives the manager uses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar, cast

import pytest
import torch
from torch import Tensor
from torch._C._distributed_c10d import HashStore, PrefixStore, ProcessGroupGloo

from ftdiloco.training import compression
from ftdiloco.training.compression import (
    CODECS,
    BlockCodec,
    Codec,
    ExchangeGroup,
    Pending,
    compressed_allreduce,
    decode,
    get_codec,
)

T = TypeVar("T")

LOSSY = ("bf16", "fp16", "int8", "fp8", "int4")
BLOCKWISE = ("int8", "fp8", "int4")
FP32_SLACK = 2.0**-22  # of the block's absmax: fp32 roundings in scale and rescale

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


# -- data and bounds ----------------------------------------------------------------


def make_case(case: str, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if case == "one":
        return torch.tensor([-1.7])
    if case == "zeros":
        return torch.zeros(1000)
    if case.startswith("randn"):
        return torch.randn(int(case[len("randn") :]), generator=g)
    if case == "outliers":
        # One block holds a huge value and tiny ones; the next blocks are ordinary.
        x = torch.randn(4 * 256 + 3, generator=g)
        x[256:512] *= 1e-3
        x[300] = 3e4
        return x
    if case == "wide":
        # Magnitudes from 1e-6 to 1e4 in every block.
        return torch.randn(5000, generator=g) * 10.0 ** torch.randint(-6, 5, (5000,), generator=g)
    raise AssertionError(case)


CASES = ["one", "zeros", "randn255", "randn256", "randn4099", "randn300001", "outliers", "wide"]


def block_absmax(x: Tensor, block: int) -> Tensor:
    """Each element's block absmax, as a tensor like ``x``."""
    pad = -x.numel() % block
    padded = torch.cat([x.abs(), x.new_zeros(pad)]).view(-1, block)
    return padded.amax(dim=1).repeat_interleave(block)[: x.numel()]


def error_bound(name: str, x: Tensor, block: int = compression.DEFAULT_BLOCK) -> Tensor:
    """The largest |decode(encode(x)) - x| the format allows, per element."""
    ax = x.abs()
    if name == "fp32":
        return torch.zeros_like(x)
    if name == "bf16":
        return 2.0**-8 * ax
    if name == "fp16":
        assert bool((ax <= 65504).all())
        return 2.0**-11 * ax + 2.0**-25
    a = block_absmax(x, block)
    if name == "int8":
        return a / 254 + a * FP32_SLACK
    if name == "fp8":
        return 2.0**-4 * ax + 2.0**-10 * (a / 448) + a * FP32_SLACK
    if name == "int4":
        return a / 14 + a * FP32_SLACK
    raise AssertionError(name)


# -- codecs alone ----------------------------------------------------------------


def test_get_codec_names() -> None:
    for name in CODECS:
        assert get_codec(name).name == name
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8, fp8, int4"):
        get_codec("int3")


def test_fp8_needs_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        get_codec("fp8")


@pytest.mark.parametrize("name", CODECS)
def test_payload_bytes(name: str) -> None:
    """Values at 4, 2 or 1 byte each, 4 bytes of scale per started block, padded to 16."""
    codec = get_codec(name)
    for numel in (0, 1, 255, 256, 257, 1 << 20):
        if name == "int4":  # two values per byte
            exact = 4 * -(-numel // compression.DEFAULT_BLOCK) + (numel + 1) // 2
        elif name in BLOCKWISE:
            exact = 4 * -(-numel // compression.DEFAULT_BLOCK) + numel
        else:
            exact = numel * {"fp32": 4, "bf16": 2, "fp16": 2}[name]
        nbytes = codec.payload_bytes(numel)
        assert nbytes % 16 == 0 and exact <= nbytes < exact + 16
    assert get_codec("int8", block=1024).payload_bytes(4096) == 4 * 4 + 4096


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CODECS)
def test_roundtrip_within_bound(name: str, case: str, device: str) -> None:
    x = make_case(case).to(device)
    codec = get_codec(name)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(x.numel())
    y = decode(codec, payload, x.numel())
    err = (y - x).abs().cpu()
    bound = error_bound(name, x.cpu())
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{name} {case}: element {worst} = {float(x[worst])}: error {float(err[worst])} "
        f"> bound {float(bound[worst])}"
    )
    if case == "zeros":
        assert bool((y == 0).all())
    if name == "fp32":
        assert torch.equal(y, x)


@pytest.mark.parametrize("block", [1, 100, 1024])
@pytest.mark.parametrize("name", BLOCKWISE)
def test_blockwise_bound_holds_for_other_blocks(name: str, block: int) -> None:
    if name == "int4" and block % 2:  # two codes per byte: blocks must fill whole bytes
        with pytest.raises(ValueError, match="even"):
            get_codec(name, block=block)
        return
    x = make_case("wide")
    y = decode(get_codec(name, block=block), get_codec(name, block=block).encode(x), x.numel())
    assert bool(((y - x).abs() <= error_bound(name, x, block)).all())


@pytest.mark.parametrize("name", BLOCKWISE)
def test_blockwise_error_shrinks_with_smaller_blocks(name: str) -> None:
    """An outlier costs precision only in its own block."""
    x = make_case("outliers")
    errors = []
    for block in (64, 1024):
        codec = get_codec(name, block=block)
        errors.append(float((decode(codec, codec.encode(x), x.numel()) - x).abs().sum()))
    assert errors[0] < errors[1] / 2


def test_fp8_decode_matches_torch_cast() -> None:
    """The bit-level e4m3 decode agrees with torch's cast on every finite code."""
    codec = get_codec("fp8", block=256)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    payload = torch.zeros(codec.payload_bytes(256), dtype=torch.uint8)
    payload[:4].view(torch.float32)[0] = 1.0 * 448  # scale 448: codes scaled by 448
    payload[4:260] = codes
    reference = codes.view(torch.float8_e4m3fn).to(torch.float32) * 448
    finite = reference.isfinite()
    assert int(finite.sum()) == 254  # 0x7f and 0xff are NaN
    assert torch.equal(decode(codec, payload, 256)[finite], reference[finite])


def test_fp16_overflow_is_inf() -> None:
    """Documented: fp16 carries no scale, so values past 65504 do not survive."""
    y = decode(get_codec("fp16"), get_codec("fp16").encode(torch.tensor([7e4, -7e4, 1.0])), 3)
    assert y.tolist() == [float("inf"), float("-inf"), 1.0]


@pytest.mark.parametrize("name", LOSSY)
def test_non_finite_values_are_not_hidden(name: str) -> None:
    x = torch.randn(3 * 256)
    x[10], x[300] = float("nan"), float("inf")
    y = decode(get_codec(name), get_codec(name).encode(x), x.numel())
    assert not bool(y[:256].isfinite().all()) and not bool(y[256:512].isfinite().all())
    assert bool(y[512:].isfinite().all())  # other blocks unharmed
    if name in BLOCKWISE:  # the whole block is poisoned, not just the element
        assert not bool(y[:512].isfinite().any())


@pytest.mark.parametrize("name", BLOCKWISE)
def test_blocks_of_tiny_values(name: str) -> None:
    """An absmax so small that qmax / absmax overflows fp32 still decodes finite and close."""
    x = torch.tensor([1e-38, -3e-39, 1e-45, 0.0] * 64 + [1.0] * 256)
    y = decode(get_codec(name), get_codec(name).encode(x), x.numel())
    assert bool(y.isfinite().all())
    assert bool(((y - x).abs()[:256] <= 1e-38).all())
    assert bool(((y - x).abs()[256:] <= error_bound(name, x)[256:]).all())


@pytest.mark.parametrize("name", CODECS)
def test_zero_payload_decodes_to_zero(name: str) -> None:
    """What a non-contributing rank sends."""
    codec = get_codec(name)
    payload = torch.zeros(codec.payload_bytes(777), dtype=torch.uint8)
    assert bool((decode(codec, payload, 777) == 0).all())


@pytest.mark.parametrize("name", CODECS)
def test_chunking_does_not_change_payload(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk boundaries (inside and across blocks) leave payloads and decodes unchanged."""
    x = make_case("randn4099")
    codec = get_codec(name, block=100)
    whole = codec.encode(x)
    decoded = decode(codec, whole, x.numel())
    monkeypatch.setattr(compression, "_CPU_CHUNK", 250)  # 200 elements: 2 blocks a chunk
    assert torch.equal(codec.encode(x), whole)
    assert torch.equal(decode(codec, whole, x.numel()), decoded)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CODECS)
def test_decode_mean_is_the_fp32_sum_in_order_divided(
    name: str, out_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk by chunk it computes exactly what decoding whole payloads in turn computes."""
    codec = get_codec(name, block=100)
    inputs = [make_case("randn4099", seed=r) for r in range(3)]
    payloads = [codec.encode(x) for x in inputs]
    acc = torch.zeros(4099)
    for payload in payloads:
        codec.decode_add(payload, 4099, acc)
    want = (acc / 3).to(out_dtype)
    monkeypatch.setattr(compression, "_CPU_CHUNK", 250)  # many chunks, split inside blocks
    out = torch.full((4099,), 7.0, dtype=out_dtype)  # stale contents must not leak in
    codec.decode_mean(payloads, 4099, out, 3)
    assert torch.equal(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CODECS)
def test_error_feedback_residual(name: str, device: str) -> None:
    """encode(x, residual=r) sends x + r and keeps exactly what was not sent."""
    codec = get_codec(name)
    x = make_case("randn4099").to(device)
    residual = make_case("randn4099", seed=1).to(device) * 1e-2
    target = x + residual
    payload = codec.encode(x, residual=residual)
    assert torch.equal(payload, codec.encode(target))
    assert torch.equal(residual, target - decode(codec, payload, x.numel()))


@pytest.mark.parametrize("name", CODECS)
def test_low_precision_input(name: str) -> None:
    """A bf16 tensor is encoded as its exact fp32 value."""
    x = make_case("randn4099").to(torch.bfloat16)
    codec = get_codec(name)
    assert torch.equal(codec.encode(x), codec.encode(x.float()))


def test_encode_checks_arguments() -> None:
    codec = get_codec("int8")
    with pytest.raises(ValueError, match="1-D"):
        codec.encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="elements"):
        codec.encode(torch.zeros(5), residual=torch.zeros(4))
    with pytest.raises(ValueError, match="bytes"):
        codec.encode(torch.zeros(5), out=torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode_add(torch.zeros(5, dtype=torch.uint8), 5, torch.zeros(5))
    with pytest.raises(ValueError, match="block"):
        BlockCodec("int8", 0)


def test_pending_wait_once() -> None:
    calls: list[int] = []

    def fail() -> None:
        calls.append(1)
        raise RuntimeError("peer lost")

    pending = Pending(fail, 8)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="peer lost"):
            pending.wait()
    assert calls == [1]


# -- averaging over a real gloo group ----------------------------------------------------


def run_ranks(n: int, fn: Callable[[int, ExchangeGroup], T]) -> list[T]:
    """Run ``fn(rank, pg)`` on ``n`` threads, each rank with its own gloo group."""
    store = HashStore()
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            opts._timeout = timedelta(seconds=20)
            opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            pg = ProcessGroupGloo(PrefixStore("test", store), rank, n, opts)
            results[rank] = fn(rank, pg)  # type: ignore[arg-type]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return [results[r] for r in range(n)]


def reference_average(codec: Codec, inputs: list[Tensor], contributors: int) -> Tensor:
    """What every rank must compute: decoded payloads summed in fp32, in rank order."""
    acc = torch.zeros(inputs[0].numel())
    for x in inputs:
        codec.decode_add(codec.encode(x), x.numel(), acc)
    return acc / contributors


@pytest.mark.parametrize("name", CODECS)
def test_average_is_identical_and_close(name: str) -> None:
    n = 3
    inputs = [make_case("randn5003", seed=r) for r in range(n)]
    codec = get_codec(name)

    def rank_fn(rank: int, pg: ExchangeGroup) -> Tensor:
        flat = inputs[rank].clone()
        pending = compressed_allreduce(pg, flat, codec, world_size=n, contributors=n)
        pending.wait()
        pending.wait()  # a second wait changes nothing
        return flat

    out = run_ranks(n, rank_fn)
    for o in out[1:]:
        assert torch.equal(o.view(torch.int32), out[0].view(torch.int32))  # bitwise
    mean = torch.stack(inputs).double().mean(0)
    if name != "fp32":  # fp32 sums on the wire, in gloo's order
        assert torch.equal(out[0], reference_average(codec, inputs, n))
    # The mean of per-rank errors is bounded by the mean of per-rank bounds, plus
    # fp32 rounding of the sum and the division.
    bound = torch.stack([error_bound(name, x) for x in inputs]).double().mean(0)
    slack = 4 * 2.0**-24 * torch.stack(inputs).abs().double().sum(0)
    assert bool(((out[0].double() - mean).abs() <= bound + slack).all())


@pytest.mark.parametrize("name", CODECS)
def test_non_contributing_rank_does_not_move_the_mean(name: str) -> None:
    n = 3
    inputs = [make_case("randn1001", seed=r) for r in range(n)]
    codec = get_codec(name)
    garbage = torch.full((1001,), 1e3)

    def rank_fn(rank: int, pg: ExchangeGroup) -> tuple[Tensor, Tensor]:
        healing = rank == 2
        flat = garbage.clone() if healing else inputs[rank].clone()
        residual = torch.full((1001,), 7.0) if healing else torch.zeros(1001)
        compressed_allreduce(
            pg, flat, codec, world_size=n, contributors=2, residual=residual, contribute=not healing
        ).wait()
        return flat, residual

    out = run_ranks(n, rank_fn)
    expected = reference_average(codec, inputs[:2], 2)
    for flat, _ in out:
        assert torch.equal(flat, expected)  # fp32 too: adding a zero is exact
        assert torch.equal(flat.view(torch.int32), out[0][0].view(torch.int32))
    assert bool((out[2][1] == 7.0).all())  # the healing rank's residual is left alone


def test_fp16_sums_do_not_overflow() -> None:
    """Three fp16 payloads near 40000 sum past fp16's 65504: the sum must be fp32."""
    n = 3
    # Exactly representable in fp16 (spacing 32 from 32768), so no quantization error.
    values = [40000.0, 40032.0, 40064.0]

    def rank_fn(rank: int, pg: ExchangeGroup) -> Tensor:
        flat = torch.full((300,), values[rank])
        compressed_allreduce(pg, flat, get_codec("fp16"), world_size=n, contributors=n).wait()
        return flat

    for flat in run_ranks(n, rank_fn):
        assert bool((flat == 40032.0).all())


def test_bf16_sums_are_exact_in_fp32() -> None:
    """1 + 2^-8 + 2^-8 rounds to 1 in bf16 twice; fp32 keeps 1 + 2^-7."""
    n = 3
    values = [1.0, 2.0**-8, 2.0**-8]  # each exact in bf16

    def rank_fn(rank: int, pg: ExchangeGroup) -> Tensor:
        flat = torch.full((10,), values[rank])
        compressed_allreduce(pg, flat, get_codec("bf16"), world_size=n, contributors=n).wait()
        return flat

    expected = torch.tensor((1.0 + 2.0**-7) / 3, dtype=torch.float32)
    for flat in run_ranks(n, rank_fn):
        assert bool((flat == expected).all())


def test_low_precision_flat_gets_the_fp32_average() -> None:
    n = 2
    inputs = [make_case("randn600", seed=r).to(torch.bfloat16) for r in range(n)]
    codec = get_codec("int8")

    def rank_fn(rank: int, pg: ExchangeGroup) -> Tensor:
        flat = inputs[rank].clone()
        compressed_allreduce(pg, flat, codec, world_size=n, contributors=n).wait()
        return flat

    expected = reference_average(codec, [x.float() for x in inputs], n).to(torch.bfloat16)
    for flat in run_ranks(n, rank_fn):
        assert flat.dtype == torch.bfloat16 and torch.equal(flat, expected)


@pytest.mark.parametrize("name", BLOCKWISE)
def test_error_feedback_keeps_the_running_sum(name: str) -> None:
    """Small values beside an outlier lose precision every sync; feedback carries it over.

    With feedback, sum(sent) = sum(inputs) - final residual, so the running sum
    of the averages stays within one quantization error (the bound at the last
    encoded value x + r) of the true running sum.  Without it the same rounding
    error repeats every sync (the inputs repeat) and grows linearly.
    """
    n, syncs, size = 2, 64, 512

    def inputs(rank: int) -> Tensor:
        g = torch.Generator().manual_seed(rank)
        x = 1e-3 * (1 + 0.1 * torch.rand(size, generator=g))
        x[0] = x[256] = 1.0  # sets the scale of each block
        return x

    codec = get_codec(name)

    def rank_fn(rank: int, pg: ExchangeGroup) -> tuple[Tensor, Tensor]:
        with_ef = torch.zeros(size, dtype=torch.float64)
        without = torch.zeros(size, dtype=torch.float64)
        residual = torch.zeros(size)
        for _ in range(syncs):
            a, b = inputs(rank), inputs(rank)
            compressed_allreduce(
                pg, a, codec, world_size=n, contributors=n, residual=residual
            ).wait()
            compressed_allreduce(pg, b, codec, world_size=n, contributors=n).wait()
            with_ef += a
            without += b
        return with_ef, without

    truth = syncs * torch.stack([inputs(r) for r in range(n)]).double().mean(0)
    (with_ef, without), _ = run_ranks(n, rank_fn)
    # What gets encoded, x + r: at most 1.1e-3 plus a residual, so below 1.2e-3
    # (int8: a residual below 1/254, the bound depends on the absmax only); the
    # block absmax stays below 1.01.
    magnitude = torch.full((size,), 1.2e-3)
    magnitude[0] = magnitude[256] = 1.01
    bound = error_bound(name, magnitude).double()
    ef_error = (with_ef - truth).abs()
    assert bool((ef_error <= bound + 1e-9).all()), float((ef_error - bound).max())
    plain_error = (without - truth).abs().max()
    if name != "int4":  # int4's bound (1/14) exceeds what 64 syncs of 1e-3 can drift
        assert plain_error > 8 * bound[1:256].max(), (float(plain_error), float(bound.max()))
    else:  # every small value rounds to 0 without feedback: all of it is lost
        assert float(plain_error) > 0.9 * syncs * 1e-3


def test_compressed_allreduce_checks_arguments() -> None:
    pg = cast(ExchangeGroup, object())  # never reached
    codec = get_codec("int8")
    with pytest.raises(ValueError, match="contributors"):
        compressed_allreduce(pg, torch.zeros(4), codec, world_size=2, contributors=3)
    with pytest.raises(ValueError, match="contributors"):
        compressed_allreduce(pg, torch.zeros(4), codec, world_size=2, contributors=0)
    with pytest.raises(ValueError, match="elements"):
        compressed_allreduce(
            pg, torch.zeros(4), codec, world_size=2, contributors=2, residual=torch.zeros(3)
        )
    compressed_allreduce(pg, torch.zeros(0), codec, world_size=2, contributors=2).wait()


@pytest.mark.parametrize("device", DEVICES)
def test_int4_packs_two_exact_codes_per_byte(device: str) -> None:
    """Multiples of absmax / 7 survive exactly; element 2i is byte i's low nibble."""
    codec = get_codec("int4", block=16)
    x = (torch.arange(-7, 8, dtype=torch.float32) * 0.5).to(device)  # 15 values, absmax 3.5
    payload = codec.encode(x)
    assert codec.payload_bytes(15) == 16  # 4 (one scale) + 8 (15 nibbles), padded to 16
    assert torch.equal(decode(codec, payload, 15), x)
    codes = payload[4:12].cpu()
    assert int(codes[0]) & 0xF == (-7) & 0xF and int(codes[0]) >> 4 == (-6) & 0xF
    assert int(codes[7]) >> 4 == 0  # the padding nibble after the last value
