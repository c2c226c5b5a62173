"""Compressed pseudo-gradient exchange: fp32, bf16, fp16, int8, fp8 and int4 payloads.

Every format works the same on CPU and GPU (torch ops only, no accelerator
path), and averaging never sums in the compressed type::

    quantize -> exchange (allgather of flat byte payloads) -> dequantize -> sum in fp32

Each rank decodes every rank's payload, its own included, in rank order, so
all ranks end with bitwise identical averages (what invariant I1 needs).  The
``fp32`` codec is lossless and goes through a plain fp32 ``allreduce`` (sum),
the fastest path.

Payloads are flat ``uint8`` tensors whose size depends only on the element
count (:meth:`Codec.payload_bytes`), so every rank knows the buffer sizes and
any dtype travels through one ordinary collective.  Layouts:

- ``fp32`` / ``bf16`` / ``fp16``: the values, cast with round-to-nearest-even;
- ``int8`` / ``fp8``: ``ceil(numel / block)`` fp32 scales, then one byte per
  value.  A block's scale maps its absolute maximum to the top of the code
  range (127 for int8, 448 for fp8 e4m3fn); int8 rounds to nearest, fp8 with
  the e4m3 cast (round-to-nearest-even).  A block holding a non-finite value
  decodes as non-finite (NaN/inf), so a diverged group is not silently hidden.
- ``int4``: ``ceil(numel / block)`` fp32 scales, then two values per byte
  (element ``2i`` in the low nibble, ``2i + 1`` in the high one), each a
  signed integer in [-7, 7]: the block's absmax maps to 7, rounded to
  nearest.  4 bits per value plus 32 per block (4.125 at block 256): the
  format of streaming DiLoCo's 4-bit exchange.

Every payload is padded (with zeros) to a multiple of 16 bytes, so the payloads
of a gathered buffer stay aligned.  An all-zero payload decodes to zeros in
every format: that is what a group that contributes nothing sends.

Error feedback: ``encode(x, residual=r)`` sends ``x + r`` and leaves in ``r``
what the payload failed to carry, ``(x + r) - decode(payload)``, for the next
sync.  The sum of what was sent then tracks the sum of the inputs to within
one quantization error, instead of drifting.

Bounds per element (derived in the tests), for ``y = decode(encode(x))``:

- fp32: exact;  bf16: ``|y - x| <= 2^-8 |x|``;
- fp16: ``|y - x| <= 2^-11 |x|`` for ``2^-14 <= |x| <= 65504`` (beyond: inf;
  below: absolute error up to 2^-25) -- prefer bf16 or int8 for small values;
- int8: ``|y - x| <= absmax(block) / 254``;
- fp8: ``|y - x| <= 2^-4 |x| + 2^-10 absmax(block) / 448``;
- int4: ``|y - x| <= absmax(block) / 14``;

each up to a few fp32 roundings (relative 2^-22 of the block's absmax).

Memory: encoding and decoding work chunk by chunk with chunk-sized scratch
buffers, so a whole-model flat tensor costs no full-size temporaries beyond
the payloads.  The allgather receives ``world_size`` payloads.

Traffic: an allgather moves ``(world_size - 1)`` payloads through each rank,
where a ring fp32 allreduce moves ``2 (world_size - 1) / world_size * 4``
bytes per element.  So int8/fp8 (~1.02 bytes per element) send less for up
to 7 ranks and bf16/fp16 for up to 3; larger quorums would need a
reduce-scatter shaped exchange (not built: it quantizes twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor
from torch._C._distributed_c10d import Work

__all__ = [
    "CODECS",
    "DEFAULT_BLOCK",
    "BlockCodec",
    "CastCodec",
    "Codec",
    "ExchangeGroup",
    "Int4Codec",
    "Pending",
    "compressed_allreduce",
    "decode",
    "get_codec",
]

CODECS = ("fp32", "bf16", "fp16", "int8", "fp8", "int4")
DEFAULT_BLOCK = 256
_ALIGN = 16  # payload sizes are multiples of this many bytes
_CPU_CHUNK = 1 << 18  # elements per chunk: scratch stays cache-sized on a CPU
_GPU_CHUNK = 1 << 24  # few kernel launches on an accelerator

_INT8_MAX = 127.0
_INT4_MAX = 7.0  # symmetric: -8 is never produced, so a code and its negation both exist
_FLT_MAX = torch.finfo(torch.float32).max
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
# An e4m3fn byte b placed as (b << 20) in an int32 puts its sign at bit 31 (after
# masking the sign extension), its 4 exponent bits at the bottom of fp32's
# exponent field and its 3 mantissa bits at the top of fp32's mantissa.  Read as
# fp32 that is the e4m3 value times 2^-120 (subnormals included: they land on
# fp32 subnormals), so one exact multiply by 2^120 finishes the decode.  Much
# faster than torch's float8 -> float32 cast on a CPU, and exact (the tests check
# all 254 finite codes).  Caveat: with torch.set_flush_denormal(True) the e4m3
# subnormals (|code| < 2^-6) decode to 0.
_FP8_BITS_MASK = 0x87F00000 - (1 << 32)  # as a signed int32
_FP8_EXP_SHIFT = 2.0**120


class Codec(Protocol):
    """A pseudo-gradient wire format."""

    @property
    def name(self) -> str: ...

    def payload_bytes(self, numel: int) -> int:
        """The payload size for ``numel`` values (the same on every rank)."""
        ...

    def encode(
        self, x: Tensor, *, residual: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        """``x`` (1-D, contiguous, floating) as a flat uint8 payload.

        With ``residual`` (fp32, like ``x``): encode ``x + residual`` and set
        ``residual`` to what the payload does not carry (error feedback).
        """
        ...

    def decode_add(self, payload: Tensor, numel: int, acc: Tensor) -> None:
        """Dequantize ``payload`` and add it into the fp32 accumulator ``acc``."""
        ...

    def decode_mean(
        self, payloads: Sequence[Tensor], numel: int, out: Tensor, divisor: int
    ) -> None:
        """``out = sum(decoded payloads) / divisor``, summed in fp32 in the order given."""
        ...


def get_codec(name: str, *, block: int = DEFAULT_BLOCK) -> Codec:
    """The codec called ``name``; ``block`` sets int8/fp8/int4 values per scale."""
    if name == "fp32":
        return CastCodec("fp32", torch.float32)
    if name == "bf16":
        return CastCodec("bf16", torch.bfloat16)
    if name == "fp16":
        return CastCodec("fp16", torch.float16)
    if name == "int8":
        return BlockCodec("int8", block)
    if name == "fp8":
        if not hasattr(torch, "float8_e4m3fn"):
            raise ValueError(
                f"codec 'fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks"
            )
        return BlockCodec("fp8", block)
    if name == "int4":
        return Int4Codec(block)
    raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")


def decode(codec: Codec, payload: Tensor, numel: int) -> Tensor:
    """A payload's values as a new fp32 tensor (on the payload's device)."""
    out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
    codec.decode_add(payload, numel, out)
    return out


# -- codecs --------------------------------------------------------------------------


class _ChunkedCodec:
    """Works through ``x`` a chunk at a time; subclasses code one chunk."""

    def __init__(self, name: str, chunk_multiple: int) -> None:
        self._name = name
        self._multiple = chunk_multiple

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"

    def payload_bytes(self, numel: int) -> int:
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        return -(-self._raw_bytes(numel) // _ALIGN) * _ALIGN

    @torch.no_grad()
    def encode(
        self, x: Tensor, *, residual: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        _check_vector("x", x, None)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        numel = x.numel()
        if residual is not None:
            _check_vector("residual", residual, numel, x.device)
        nbytes = self.payload_bytes(numel)
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        else:
            _check_payload(out, nbytes, x.device)
        out[self._raw_bytes(numel) :].zero_()
        chunk = self._chunk(x.device)
        size = min(chunk, numel)
        scratch = torch.empty(size, dtype=torch.float32, device=x.device)
        staged = residual is not None or x.dtype != torch.float32
        sum_buf = torch.empty_like(scratch) if staged else scratch
        for start in range(0, numel, chunk):
            stop = min(start + chunk, numel)
            part = x[start:stop]
            if residual is not None:
                work = torch.add(part, residual[start:stop], out=sum_buf[: stop - start])
            elif staged:
                work = sum_buf[: stop - start].copy_(part)
            else:
                work = part
            self._encode_chunk(work, out, start, numel, scratch[: stop - start])
            if residual is not None:
                sent = scratch[: stop - start]
                self._decode_chunk(out, start, stop, numel, sent, None)
                torch.sub(work, sent, out=residual[start:stop])
        return out

    @torch.no_grad()
    def decode_add(self, payload: Tensor, numel: int, acc: Tensor) -> None:
        _check_vector("acc", acc, numel, payload.device)
        if acc.dtype != torch.float32:
            raise TypeError(f"acc must be float32, got {acc.dtype}")
        _check_payload(payload, self.payload_bytes(numel), payload.device)
        chunk = self._chunk(acc.device)
        scratch = torch.empty(min(chunk, numel), dtype=torch.float32, device=acc.device)
        for start in range(0, numel, chunk):
            stop = min(start + chunk, numel)
            self._decode_chunk(
                payload, start, stop, numel, scratch[: stop - start], acc[start:stop]
            )

    @torch.no_grad()
    def decode_mean(
        self, payloads: Sequence[Tensor], numel: int, out: Tensor, divisor: int
    ) -> None:
        """Chunk by chunk, every payload in turn: each chunk of the sum stays in cache.

        Decoding whole payloads one after another would stream the full-size
        accumulator through memory once per payload, plus once to clear it
        and once to divide.
        """
        _check_vector("out", out, numel, None)
        for payload in payloads:
            _check_payload(payload, self.payload_bytes(numel), out.device)
        chunk = self._chunk(out.device)
        size = min(chunk, numel)
        scratch = torch.empty(size, dtype=torch.float32, device=out.device)
        staged = out.dtype != torch.float32
        sums = torch.empty_like(scratch) if staged else scratch
        for start in range(0, numel, chunk):
            stop = min(start + chunk, numel)
            acc = sums[: stop - start] if staged else out[start:stop]
            acc.zero_()
            for payload in payloads:
                self._decode_chunk(payload, start, stop, numel, scratch[: stop - start], acc)
            acc.div_(divisor)
            if staged:
                out[start:stop].copy_(acc)

    def _chunk(self, device: torch.device) -> int:
        size = _CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK
        return max(1, size // self._multiple) * self._multiple

    # Subclasses: --------------------------------------------------------------------

    def _raw_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def _encode_chunk(
        self, work: Tensor, payload: Tensor, start: int, numel: int, scratch: Tensor
    ) -> None:
        """Code fp32 ``work`` (elements ``start:start+len(work)``) into ``payload``."""
        raise NotImplementedError

    def _decode_chunk(
        self,
        payload: Tensor,
        start: int,
        stop: int,
        numel: int,
        scratch: Tensor,
        acc: Tensor | None,
    ) -> None:
        """Elements ``start:stop``: add into ``acc`` (just theirs), or (no acc) fill ``scratch``."""
        raise NotImplementedError


class CastCodec(_ChunkedCodec):
    """Values cast to a floating dtype (round-to-nearest-even); no scales."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        super().__init__(name, 1)
        self.dtype = dtype
        self._itemsize = torch.empty(0, dtype=dtype).element_size()

    def _raw_bytes(self, numel: int) -> int:
        return numel * self._itemsize

    def _values(self, payload: Tensor, start: int, stop: int) -> Tensor:
        return payload[start * self._itemsize : stop * self._itemsize].view(self.dtype)

    def _encode_chunk(
        self, work: Tensor, payload: Tensor, start: int, numel: int, scratch: Tensor
    ) -> None:
        self._values(payload, start, start + work.numel()).copy_(work)

    def _decode_chunk(
        self,
        payload: Tensor,
        start: int,
        stop: int,
        numel: int,
        scratch: Tensor,
        acc: Tensor | None,
    ) -> None:
        values = self._values(payload, start, stop)
        if acc is None:
            scratch.copy_(values)
        elif self.dtype == torch.float32:
            acc.add_(values)
        else:
            # Upcast first: a mixed-dtype add is slower on a CPU.
            acc.add_(scratch.copy_(values))


class BlockCodec(_ChunkedCodec):
    """int8 or fp8 (e4m3fn) values with one fp32 absmax scale per ``block`` values."""

    def __init__(self, name: str, block: int = DEFAULT_BLOCK) -> None:
        if name not in ("int8", "fp8"):
            raise ValueError(f"BlockCodec formats are 'int8' and 'fp8', not {name!r}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        super().__init__(name, block)
        self.block = block
        self.qmax = _INT8_MAX if name == "int8" else _FP8_MAX

    def __repr__(self) -> str:
        return f"BlockCodec({self.name!r}, block={self.block})"

    def _blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def _raw_bytes(self, numel: int) -> int:
        return 4 * self._blocks(numel) + numel

    def _segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(first element, blocks, block length)``: full blocks, then a short last one."""
        full = (stop - start) // self.block
        segments = [(start, full, self.block)] if full else []
        if start + full * self.block < stop:
            segments.append((start + full * self.block, 1, stop - start - full * self.block))
        return segments

    def _views(
        self, payload: Tensor, numel: int, first: int, blocks: int, length: int
    ) -> tuple[Tensor, Tensor]:
        """The scales (blocks,) and codes (blocks, length) bytes of one segment."""
        b0 = first // self.block
        scales = payload[4 * b0 : 4 * (b0 + blocks)].view(torch.float32)
        codes_at = 4 * self._blocks(numel) + first
        codes = payload[codes_at : codes_at + blocks * length].view(blocks, length)
        return scales, codes

    def _encode_chunk(
        self, work: Tensor, payload: Tensor, start: int, numel: int, scratch: Tensor
    ) -> None:
        for first, blocks, length in self._segments(start, start + work.numel()):
            lo, hi = first - start, first - start + blocks * length
            x = work[lo:hi].view(blocks, length)
            t = scratch[lo:hi].view(blocks, length)
            scales, codes = self._views(payload, numel, first, blocks, length)
            amax = torch.abs(x, out=t).amax(dim=1)
            torch.div(amax, self.qmax, out=scales)
            # A NaN/inf block gets inverse 0 and scale NaN/inf: it decodes non-finite.
            # An all-zero block gets 0 and 0.  The clamp keeps the inverse finite
            # for absmax < qmax / FLT_MAX (~1e-36): such a block decodes within
            # its absmax of the truth.
            inverse = torch.where(amax > 0, self.qmax / amax, 0.0).clamp_(max=_FLT_MAX)
            # |x| <= absmax, so |x * inverse| <= qmax (1 + 2^-23), which rounds to
            # qmax in either format: no clamp needed.
            torch.mul(x, inverse.unsqueeze(1), out=t)
            if self.name == "int8":
                codes.view(torch.int8).copy_(t.round_())
            else:
                codes.view(torch.float8_e4m3fn).copy_(t)

    def _decode_chunk(
        self,
        payload: Tensor,
        start: int,
        stop: int,
        numel: int,
        scratch: Tensor,
        acc: Tensor | None,
    ) -> None:
        for first, blocks, length in self._segments(start, stop):
            lo, hi = first - start, first - start + blocks * length
            t = scratch[lo:hi].view(blocks, length)
            scales, codes = self._views(payload, numel, first, blocks, length)
            if self.name == "int8":
                t.copy_(codes.view(torch.int8))
            else:
                bits = t.view(torch.int32)
                bits.copy_(codes.view(torch.int8))  # sign-extends
                bits.bitwise_left_shift_(20).bitwise_and_(_FP8_BITS_MASK)
                t.mul_(_FP8_EXP_SHIFT)
            if acc is None:
                t.mul_(scales.unsqueeze(1))
            else:
                acc[lo:hi].view(blocks, length).addcmul_(t, scales.unsqueeze(1))


class Int4Codec(BlockCodec):
    """Signed 4-bit integers, two per byte, with one fp32 absmax scale per ``block`` values.

    Shares int8's layout of scales and segments; only the codes differ: half
    a byte each, so ``block`` must be even (every chunk and full block then
    starts on a byte).  Only a payload's last value may share its byte with
    padding.
    """

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if block < 2 or block % 2:
            raise ValueError(f"int4 block must be an even number >= 2, got {block}")
        _ChunkedCodec.__init__(self, "int4", block)
        self.block = block
        self.qmax = _INT4_MAX

    def __repr__(self) -> str:
        return f"Int4Codec(block={self.block})"

    def _raw_bytes(self, numel: int) -> int:
        return 4 * self._blocks(numel) + (numel + 1) // 2

    def _scales(self, payload: Tensor, first: int, blocks: int) -> Tensor:
        b0 = first // self.block
        return payload[4 * b0 : 4 * (b0 + blocks)].view(torch.float32)

    def _code_bytes(self, payload: Tensor, numel: int, first: int, count: int) -> Tensor:
        at = 4 * self._blocks(numel) + first // 2
        return payload[at : at + (count + 1) // 2]

    def _encode_chunk(
        self, work: Tensor, payload: Tensor, start: int, numel: int, scratch: Tensor
    ) -> None:
        for first, blocks, length in self._segments(start, start + work.numel()):
            lo, hi = first - start, first - start + blocks * length
            x = work[lo:hi].view(blocks, length)
            t = scratch[lo:hi].view(blocks, length)
            scales = self._scales(payload, first, blocks)
            amax = torch.abs(x, out=t).amax(dim=1)
            torch.div(amax, self.qmax, out=scales)
            # As int8: a non-finite block decodes non-finite through its scale.
            inverse = torch.where(amax > 0, self.qmax / amax, 0.0).clamp_(max=_FLT_MAX)
            torch.mul(x, inverse.unsqueeze(1), out=t)
            q = t.round_().nan_to_num_(0.0).to(torch.int16).view(-1)
            if q.numel() % 2:
                q = torch.cat([q, q.new_zeros(1)])
            packed = (q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4)
            self._code_bytes(payload, numel, first, hi - lo).copy_(packed.to(torch.uint8))

    def _decode_chunk(
        self,
        payload: Tensor,
        start: int,
        stop: int,
        numel: int,
        scratch: Tensor,
        acc: Tensor | None,
    ) -> None:
        for first, blocks, length in self._segments(start, stop):
            lo, hi = first - start, first - start + blocks * length
            count = hi - lo
            codes = self._code_bytes(payload, numel, first, count).to(torch.int16)
            flat = scratch[lo:hi]
            # A nibble n in 0..15 is the signed value (n ^ 8) - 8.
            flat[0::2].copy_(((codes & 0xF) ^ 8) - 8)
            flat[1::2].copy_((((codes >> 4) & 0xF) ^ 8)[: count // 2] - 8)
            t = flat.view(blocks, length)
            scales = self._scales(payload, first, blocks)
            if acc is None:
                t.mul_(scales.unsqueeze(1))
            else:
                acc[lo:hi].view(blocks, length).addcmul_(t, scales.unsqueeze(1))


def _check_vector(
    what: str, t: Tensor, numel: int | None, device: torch.device | None = None
) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{what} has {t.numel()} elements, expected {numel}")
    if device is not None and t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")
    if what == "residual" and t.dtype != torch.float32:
        raise TypeError(f"residual must be float32, got {t.dtype}")


def _check_payload(payload: Tensor, nbytes: int, device: torch.device) -> None:
    if payload.dtype != torch.uint8 or payload.dim() != 1 or not payload.is_contiguous():
        raise ValueError("a payload is a contiguous 1-D uint8 tensor")
    if payload.numel() != nbytes:
        raise ValueError(f"payload has {payload.numel()} bytes, expected {nbytes}")
    if payload.device != device:
        raise ValueError(f"payload is on {payload.device}, expected {device}")
    if payload.storage_offset() % 4:
        raise ValueError("a payload must start 4-byte aligned (its scales are fp32)")


# -- the exchange -----------------------------------------------------------------------


class ExchangeGroup(Protocol):
    """What the exchange uses of a gloo or NCCL backend (the stubs omit collectives)."""

    def allreduce(self, tensors: list[Tensor]) -> Work: ...

    def allgather(
        self, output_tensors: list[list[Tensor]], input_tensors: list[Tensor]
    ) -> Work: ...


class Pending:
    """An exchange in flight.  ``wait`` finishes it: the tensor then holds the average.

    ``wait`` raises what the collective raised (peer lost, deadline); calling it
    again returns, or raises the same error, without redoing anything.
    """

    def __init__(self, finish: Callable[[], None], nbytes: int) -> None:
        self._finish: Callable[[], None] | None = finish
        self._error: BaseException | None = None
        self.nbytes = nbytes
        """Bytes this rank put on the wire (its payload, or its fp32 tensor)."""

    def wait(self) -> None:
        finish, self._finish = self._finish, None
        if finish is not None:
            try:
                with torch.no_grad():
                    finish()
            except BaseException as e:
                self._error = e
                raise
        if self._error is not None:
            raise self._error


@torch.no_grad()
def compressed_allreduce(
    pg: ExchangeGroup,
    flat: Tensor,
    codec: Codec,
    *,
    world_size: int,
    contributors: int,
    residual: Tensor | None = None,
    contribute: bool = True,
) -> Pending:
    """Start averaging ``flat`` over ``pg``: ``sum over ranks / contributors``, in place.

    The payload is encoded and the collective started before this returns;
    leave ``flat`` alone until ``wait`` (the fp32 path sums in it).  ``wait``
    dequantizes every rank's payload, sums in fp32 in rank order and writes
    the average into ``flat`` (cast back to its dtype).

    ``world_size`` is the size of ``pg``; ``contributors`` how many of its ranks
    contribute (the divisor).  A rank with ``contribute=False`` (a group that
    just healed) sends an all-zero payload, whatever ``flat`` holds, and
    leaves ``residual`` alone: zero it if its old pseudo-gradients are gone.

    ``residual`` (fp32, like ``flat``) turns on error feedback: it is added to
    what this rank sends and then holds what the payload failed to carry.  It
    is updated at once, in place; a caller that rolls the step back should
    restore it (or zero it, losing at most one quantization error).
    """
    _check_vector("flat", flat, None)
    if not flat.is_floating_point():
        raise TypeError(f"flat must be a floating tensor, got {flat.dtype}")
    if world_size < 1 or not 1 <= contributors <= world_size:
        raise ValueError(
            f"need 1 <= contributors <= world_size, got {contributors} and {world_size}"
        )
    numel = flat.numel()
    if residual is not None:
        _check_vector("residual", residual, numel, flat.device)

    if numel == 0:
        return Pending(lambda: None, 0)
    if codec.name == "fp32":
        # Lossless, and gloo and NCCL sum fp32 in fp32: a plain allreduce is fastest.
        acc = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        if not contribute:
            acc.zero_()
        elif residual is not None:
            acc.add_(residual)
            residual.zero_()
        work = pg.allreduce([acc])

        def finish_sum() -> None:
            work.wait()
            acc.div_(contributors)
            if acc is not flat:
                flat.copy_(acc)

        return Pending(finish_sum, numel * 4)

    nbytes = codec.payload_bytes(numel)
    gathered = torch.empty(world_size * nbytes, dtype=torch.uint8, device=flat.device)
    payloads = [gathered[r * nbytes : (r + 1) * nbytes] for r in range(world_size)]
    if contribute:
        payload = codec.encode(flat, residual=residual)
    else:
        payload = torch.zeros(nbytes, dtype=torch.uint8, device=flat.device)
    work = pg.allgather([payloads], [payload])

    def finish_gather() -> None:
        work.wait()
        # Rank order on every rank: bitwise identical sums.
        codec.decode_mean(payloads, numel, flat, contributors)

    return Pending(finish_gather, nbytes)
