"""How tensors cross the hub's one HTTP port: the safetensors layout, streamed, checksummed.

Both directions are ordinary safetensors files (8-byte header length, a
JSON header, the data), written and read a tensor at a time so that neither
side ever holds a second copy of a model:

- the global weights (``GET /v1/weights``): each parameter in its own dtype;
- a pseudo-gradient (``PUT /v1/submit``): the fragment's flat buffers cut in
  *segments* of :data:`SEGMENT` values, each encoded with the job's codec
  (:mod:`ftdiloco.training.compression`) as a ``U8`` tensor named
  ``"<flat>.<segment>"``.  The hub decodes one segment at a time into its
  one accumulator, so its memory does not grow with the groups submitting.

The header's ``__metadata__`` carries each tensor's XXH3-64 (``xxh3``, hex,
comma-separated, in data order) and whatever the sender adds; a reader
checks every tensor before it uses it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import xxhash

from ftdiloco.state.dtypes import SAFETENSORS_CODES

__all__ = [
    "SEGMENT",
    "Entry",
    "WireError",
    "checksum",
    "header",
    "header_length",
    "parse_header",
    "read_header",
    "segments",
]

# Values per encoded segment of a pseudo-gradient: the hub stages a few
# segments at a time (4 MiB each in fp32), whatever the model or the groups.
SEGMENT = 1 << 20
# A header longer than this is not one the hub or a group wrote.
MAX_HEADER = 16 << 20
_DTYPES = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}


class WireError(ValueError):
    """Bytes that are not what the other side should have sent (a 400, never a crash)."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    xxh3: int


def checksum(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def segments(numel: int) -> list[tuple[int, int]]:
    """The (start, stop) value ranges a flat of ``numel`` values travels in."""
    return [(a, min(a + SEGMENT, numel)) for a in range(0, numel, SEGMENT)] or [(0, 0)]


def header(
    tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> bytes:
    """The safetensors prefix of ``tensors`` (CPU, contiguous), in order, with checksums."""
    described: dict[str, object] = {}
    sums = []
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        described[name] = {
            "dtype": SAFETENSORS_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        sums.append(f"{checksum(tensor_bytes(t)):016x}")
        offset += n
    described["__metadata__"] = {**(metadata or {}), "xxh3": ",".join(sums)}
    text = json.dumps(described, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data
    return struct.pack("<Q", len(text)) + text


def header_length(prefix: bytes) -> int:
    """The header's length from the file's first 8 bytes, refused beyond :data:`MAX_HEADER`."""
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER:
        raise WireError(f"safetensors header of {length} bytes exceeds {MAX_HEADER}")
    return int(length)


def parse_header(text: bytes) -> tuple[list[Entry], dict[str, str]]:
    """The header's entries in data order, and its metadata (checksums parsed into the entries)."""
    try:
        described = json.loads(text)
        metadata = described.pop("__metadata__", {})
        sums = [int(s, 16) for s in metadata["xxh3"].split(",")] if described else []
        entries: list[Entry] = []
        for (name, d), xxh3 in zip(
            sorted(described.items(), key=lambda kv: kv[1]["data_offsets"][0]), sums, strict=True
        ):
            start, stop = (int(x) for x in d["data_offsets"])
            shape = tuple(int(x) for x in d["shape"])
            entry = Entry(str(name), _DTYPES[d["dtype"]], shape, stop - start, xxh3)
            expected = entry.dtype.itemsize * _numel(shape)
            if start != sum(e.nbytes for e in entries) or entry.nbytes != expected:
                raise WireError(f"tensor {name!r}: its offsets do not match its shape and order")
            entries.append(entry)
    except WireError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WireError(f"not a safetensors header this hub reads: {type(e).__name__}: {e}") from e
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError("safetensors metadata must map strings to strings")
    return entries, metadata


def read_header(read: Callable[[int], bytes]) -> tuple[list[Entry], dict[str, str]]:
    """Parse the prefix that ``read(n)`` (exactly n bytes, blocking) yields."""
    return parse_header(read(header_length(read(8))))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        if s < 0:
            raise WireError(f"negative dimension in shape {shape}")
        n *= s
    return n
