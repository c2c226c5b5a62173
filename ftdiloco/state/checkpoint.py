"""Durable checkpoints: the replicated state on disk, for when no peer is left to heal from.

Heals recover a group from its live peers; a checkpoint covers what they cannot:
every group stopped at once (a pre-empted job, a cluster move), or a run that
must continue tomorrow.  What is saved is exactly what heals carry -- the
tensors of :meth:`Manager.register_state <ftdiloco.coordination.manager.Manager.register_state>`,
named ``"state/key"`` -- plus the step and some run metadata.

On disk, one directory per checkpoint::

    <directory>/step-<N>/state.safetensors   the tensors (safetensors: no pickle)
    <directory>/step-<N>/meta.json           step, layout, checksum, metadata

A checkpoint is written into a hidden temporary directory, every file and the
directory are fsynced, and only then is it renamed to ``step-<N>``.  A rename
within one filesystem is atomic, so a ``step-<N>`` directory is either
complete or absent: a crash at any moment leaves at worst a temporary
directory, which :func:`latest_checkpoint` ignores and the next save removes,
while the previous checkpoint stays where it was.  ``meta.json`` carries a
CRC32 of the tensor file, so damage that happens later (a bad disk, a
truncated copy) is caught before any byte is loaded.

:func:`load_checkpoint` checks the checkpoint's tensor names, dtypes and
shapes against the model's before it writes anything, so resuming another
model's checkpoint fails with the name of the first tensor that differs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import structlog
import torch

from ftdiloco.state.dtypes import SAFETENSORS_CODES

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Destination",
    "check_layout",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rank_directory",
    "save_checkpoint",
    "verify_checkpoint",
]

log = structlog.get_logger(__name__)

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
FORMAT = 1
CHECKSUM = "crc32"

Layout = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]
# The tensors to fill, or a function from the checkpoint's layout to them
# (the same contract as ftdiloco.state.heal.Destination).
Destination = Mapping[str, torch.Tensor] | Callable[[Layout], Mapping[str, torch.Tensor]]

_STEP_DIR = re.compile(r"step-(0|[1-9][0-9]*)")
# Hidden names: never mistaken for a checkpoint, removed by the next save.
_TEMP_PREFIX = ".tmp-"
_REPLACED_PREFIX = ".old-"
_READ_BYTES = 16 << 20

# Every dtype safetensors stores, with its code there; meta.json names them as torch does.
_CODES = SAFETENSORS_CODES
_DTYPES: dict[str, torch.dtype] = {str(dtype).removeprefix("torch."): dtype for dtype in _CODES}


class CheckpointError(Exception):
    """A checkpoint cannot be used; ``code`` says why.

    ``corrupted``: the files are missing, unreadable or fail their checksum
    (another, older checkpoint may still be good).  ``mismatch``: the
    checkpoint is intact but holds other tensors than the model (another
    model, another optimizer); no older checkpoint of the same run will fit
    either.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``meta.json`` says about a checkpoint whose files passed their checksum."""

    path: Path
    step: int
    replica_id: str | None
    created: float
    nbytes: int
    layout: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    metadata: dict[str, Any]


# -- saving ----------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    replica_id: str | None = None,
    keep: int = 2,
) -> Path:
    """Write ``tensors`` as ``<directory>/step-<step>`` atomically; returns that path.

    ``metadata`` must be JSON-serialisable; it comes back from
    :func:`load_checkpoint`.  Afterwards the newest ``keep`` checkpoints are
    kept (the one just written among them) and older ones removed, so a
    checkpoint that turns out damaged always has a predecessor to fall back
    on.  Checkpoints with a *higher* step than this one are removed as well:
    they belong to a history this run did not continue (e.g. a damaged one
    that resuming skipped), and left in place they would be resumed next
    time instead of this one.  Saving a step that exists replaces it.

    The tensors are read while this runs: the caller must not change them
    meanwhile (the Manager saves between outer steps).  GPU tensors are copied
    to host memory first.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    user = dict(metadata or {})
    try:
        json.dumps(user, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {e}") from None
    started = time.perf_counter()
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(root)
    host = _host_tensors(tensors)

    temp = root / f"{_TEMP_PREFIX}step-{step}-{os.getpid()}-{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        state_path = temp / STATE_FILE
        safetensors.torch.save_file(host, str(state_path), metadata={"step": str(step)})
        _fsync_file(state_path)
        checksum, nbytes = _checksum(state_path)
        created = time.time()
        meta = {
            "format": FORMAT,
            "step": step,
            "replica_id": replica_id,
            "created": created,
            "created_utc": datetime.fromtimestamp(created, timezone.utc).isoformat(),
            "file": STATE_FILE,
            "bytes": nbytes,
            "checksum": checksum,
            "tensors": [
                {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                for name, t in host.items()
            ],
            "metadata": user,
        }
        meta_path = temp / META_FILE
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(temp)
        final = root / f"step-{step}"
        _publish(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _prune(root, step, keep)
    log.info(
        "checkpoint saved",
        path=str(final),
        step=step,
        bytes=nbytes,
        tensors=len(host),
        seconds=round(time.perf_counter() - started, 3),
    )
    return final


def _host_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory, which is what safetensors accepts.

    Tensors already in that form are not copied.
    """
    host: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _CODES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors lacks")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key in storages:
                t = t.clone()  # e.g. two views of one buffer: safetensors refuses shared memory
            storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        host[name] = t
    return host


def _publish(temp: Path, final: Path) -> None:
    """Rename ``temp`` to ``final``; an existing ``final`` is moved aside first.

    A directory cannot be renamed over a non-empty one, so replacing takes two
    renames; a crash between them leaves no ``final`` but keeps every older
    checkpoint, which is what resuming then takes.
    """
    if not final.exists():
        os.rename(temp, final)
        return
    replaced = final.with_name(f"{_REPLACED_PREFIX}{final.name}-{secrets.token_hex(4)}")
    os.rename(final, replaced)
    os.rename(temp, final)
    shutil.rmtree(replaced, ignore_errors=True)


def _remove_temporaries(root: Path) -> None:
    """Leftovers of saves that crashed; one writer per directory, so none is in use."""
    for entry in root.iterdir():
        if entry.name.startswith((_TEMP_PREFIX, _REPLACED_PREFIX)) and entry.is_dir():
            log.warning("removing an unfinished checkpoint", path=str(entry))
            shutil.rmtree(entry, ignore_errors=True)


def _prune(root: Path, step: int, keep: int) -> None:
    older = 0
    for path in list_checkpoints(root):
        found = _step_of(path)
        if found == step:
            continue
        if found > step:
            log.warning("removing a checkpoint newer than the one saved", path=str(path), step=step)
        elif not (path / META_FILE).is_file():
            log.warning("removing an incomplete checkpoint", path=str(path))
        else:
            older += 1
            if older < keep:
                continue
        shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (the rename itself); not every OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checksum(path: Path) -> tuple[str, int]:
    crc, total = 0, 0
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            total += n
    return f"{CHECKSUM}:{crc:08x}", total


# -- finding and checking ----------------------------------------------------------------------


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``step-<N>`` directories under ``directory``, newest step first; none verified."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step_of, reverse=True)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint under ``directory`` that passes :func:`verify_checkpoint`.

    Damaged or incomplete ones are skipped with a warning naming what is wrong.
    """
    for path in list_checkpoints(directory):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping a damaged checkpoint", path=str(path), error=str(e))
            continue
        return path
    return None


def verify_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read ``meta.json`` and check the tensor file against its size and checksum.

    Raises :class:`CheckpointError` (``corrupted``) naming the problem.
    """
    info, checksum = _read_meta(Path(path))
    state = info.path / STATE_FILE
    try:
        actual, nbytes = _checksum(state)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint {info.path}: cannot read {STATE_FILE}: {e}", "corrupted"
        ) from None
    if nbytes != info.nbytes:
        raise CheckpointError(
            f"checkpoint {info.path}: {STATE_FILE} has {nbytes} bytes, meta.json says "
            f"{info.nbytes} (truncated or replaced)",
            "corrupted",
        )
    if actual != checksum:
        raise CheckpointError(
            f"checkpoint {info.path}: {STATE_FILE} fails its checksum ({actual}, meta.json "
            f"says {checksum}): the file is damaged",
            "corrupted",
        )
    return info


def _read_meta(path: Path) -> tuple[CheckpointInfo, str]:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {problem}", "corrupted")

    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad(f"no {META_FILE} (an incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"{META_FILE} is unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise bad(f"{META_FILE} is not a JSON object")

    def field(name: str, kind: type | tuple[type, ...]) -> Any:
        value = meta.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"{META_FILE} has no valid {name!r}")
        return value

    if field("format", int) != FORMAT:
        raise bad(f"{META_FILE} is format {meta['format']}, this version reads {FORMAT}")
    step = field("step", int)
    named = _step_of(path) if _STEP_DIR.fullmatch(path.name) else step
    if step != named or step < 0:
        raise bad(f"{META_FILE} says step {step} but the directory is {path.name}")
    checksum = field("checksum", str)
    if not checksum.startswith(f"{CHECKSUM}:"):
        raise bad(f"{META_FILE} has checksum {checksum!r}, not {CHECKSUM}")
    replica_id = meta.get("replica_id")
    if replica_id is not None and not isinstance(replica_id, str):
        raise bad(f"{META_FILE} has no valid 'replica_id'")
    layout = []
    for entry in field("tensors", list):
        try:
            name, dtype, shape = entry["name"], _DTYPES[entry["dtype"]], entry["shape"]
            ok = isinstance(name, str) and isinstance(shape, list)
            ok = ok and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise bad(f"{META_FILE} lists a malformed tensor: {str(entry)[:200]}")
        layout.append((name, dtype, tuple(shape)))
    info = CheckpointInfo(
        path=path,
        step=step,
        replica_id=replica_id,
        created=float(field("created", (int, float))),
        nbytes=field("bytes", int),
        layout=tuple(layout),
        metadata=field("metadata", dict),
    )
    return info, checksum


# -- loading ---------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str], into: Destination
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Verify the checkpoint at ``path`` and copy its tensors into ``into``.

    ``into`` is a mapping from names to tensors, or a function that receives
    the checkpoint's layout (name, dtype, shape per tensor) and returns one --
    which lets a caller allocate state that does not exist yet, such as
    optimizer state made at the first step.  The names, dtypes and shapes of
    ``into`` must equal the checkpoint's; otherwise :class:`CheckpointError`
    (``mismatch``) names the first tensor that differs, before anything is
    written.  Returns ``(step, tensors, metadata)``: the tensors are those of
    ``into``, now holding the checkpoint's values.
    """
    info = verify_checkpoint(path)
    destination = into(info.layout) if callable(into) else into
    check_layout(info.layout, destination)
    state = info.path / STATE_FILE
    try:
        with safetensors.safe_open(str(state), framework="pt", device="cpu") as f:
            # The checksum passed, so a disagreement here is a writer's fault, not
            # the disk's; still, find it before writing into the model.
            if set(f.keys()) != {name for name, _, _ in info.layout}:
                raise CheckpointError(
                    f"checkpoint {info.path}: {STATE_FILE} holds other tensors than "
                    f"{META_FILE} lists",
                    "corrupted",
                )
            for name, dtype, shape in info.layout:
                stored = f.get_slice(name)
                if (stored.get_dtype(), tuple(stored.get_shape())) != (_CODES[dtype], shape):
                    raise CheckpointError(
                        f"checkpoint {info.path}: tensor {name} is {stored.get_dtype()}"
                        f"{list(stored.get_shape())} in {STATE_FILE} but "
                        f"{_describe(dtype, shape)} in {META_FILE}",
                        "corrupted",
                    )
            with torch.no_grad():
                for name, _, _ in info.layout:
                    destination[name].copy_(f.get_tensor(name))
    except safetensors.SafetensorError as e:
        raise CheckpointError(
            f"checkpoint {info.path}: cannot read {STATE_FILE}: {e}", "corrupted"
        ) from None
    return info.step, {name: destination[name] for name, _, _ in info.layout}, info.metadata


def check_layout(layout: Layout, destination: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` (``mismatch``) unless ``destination`` has ``layout``.

    The message names the first tensor that differs -- in dtype or shape, or
    present on one side only -- and counts the rest.
    """
    problems = []
    names = set()
    for name, dtype, shape in layout:
        names.add(name)
        ours = destination.get(name)
        if ours is None:
            problems.append(
                f"tensor {name}: checkpoint has {_describe(dtype, shape)}, the model has no "
                "such tensor"
            )
        elif ours.dtype != dtype or tuple(ours.shape) != shape:
            problems.append(
                f"tensor {name}: checkpoint has {_describe(dtype, shape)}, the model has "
                f"{_describe(ours.dtype, tuple(ours.shape))}"
            )
    for name, ours in destination.items():
        if name not in names:
            problems.append(
                f"tensor {name}: the model has {_describe(ours.dtype, tuple(ours.shape))}, "
                "the checkpoint has no such tensor"
            )
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"the checkpoint does not fit the model: {problems[0]}{more}", "mismatch"
        )


def rank_directory(root: str | os.PathLike[str], replica_id: str, group_rank: int) -> Path:
    """Where one process keeps its checkpoints: ``<root>/<replica id>/rank-<group rank>``.

    Every rank saves its own copy of the state, and groups launched alike
    (one script, one shared filesystem) must not overwrite each other's, so
    both the group and the rank are in the path.  The replica id is made
    safe for a file name: it cannot climb out of ``root``.
    """
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in replica_id)
    if not safe.strip("."):
        safe = safe.replace(".", "_") or "_"
    return Path(root) / safe / f"rank-{group_rank}"


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{_dtype_name(dtype)}[{','.join(map(str, shape))}]"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))
