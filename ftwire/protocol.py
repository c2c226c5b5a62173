"""Wire messages between replicas and the lighthouse: msgpack maps, versioned.

Every message is a map with ``"v": PROTOCOL_VERSION``.  Decoding is strict
about types (a bool is not an int, a missing field is named in the error) and
lenient about extra keys, so a newer client can add fields without breaking an
older lighthouse.  Anything malformed raises :class:`ProtocolError`, which the
server turns into a 400 with the message -- never a crash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from ftwire.history import HISTORY_CHARS
from ftwire.messages import SETTINGS, Fence, Member, Quorum, SettingsChange

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_LEN = 256
MAX_ADDRESS_LEN = 1024
# A member's free-form ``data``, packed: it is copied into every quorum answer.
MAX_DATA_BYTES = 64 << 10

# Header carrying the shared token on every HTTP request and WebSocket upgrade.
TOKEN_HEADER = "Authorization"
CONTENT_TYPE = "application/msgpack"

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that cannot be understood; the text says what is wrong with it."""


@dataclass(frozen=True)
class Limits:
    """What one decoded message may hold; checked while decoding, before any field is read.

    Together they bound the work and memory a message costs and guarantee
    that whatever is accepted can be packed again (msgpack's packer refuses
    nesting deeper than 511), inside an answer that adds a few levels.
    """

    max_bytes: int = MAX_MESSAGE_BYTES
    # Containers inside containers; the message itself is depth 1.
    max_depth: int = 16
    max_str: int = 64 << 10
    max_bin: int = MAX_MESSAGE_BYTES
    # Entries of one array or map.
    max_items: int = 4096
    # Every value of the message, containers included.
    max_nodes: int = 1 << 16


# What any request to any server may hold.
REQUEST = Limits()
# Answers a client reads from a server it trusts (a quorum of many members, a
# heal manifest of many tensors): larger, and still bounded.
ANSWER = Limits(max_bytes=64 << 20, max_depth=24, max_items=1 << 20, max_nodes=1 << 22)


def pack(message: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb({"v": PROTOCOL_VERSION, **message}, use_bin_type=True)
    return packed


def _check_shape(message: Any, limits: Limits, size: int) -> None:
    """Depth and node count, without recursion (a deep message cannot exhaust the stack).

    Only containers are walked: map keys are strings or bytes (strict_map_key)
    and scalars cannot nest.  Every value takes at least one byte, so a body
    of at most ``max_nodes`` bytes cannot exceed the node limit and is not
    counted: the check costs little on the daemon's hot path (every join and
    heartbeat).
    """
    count = size > limits.max_nodes
    nodes = 1
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
            nodes += 2 * len(value)
        else:
            children = value
            nodes += len(value)
        if count and nodes > limits.max_nodes:
            raise ProtocolError(f"message has more than {limits.max_nodes} values")
        if depth >= limits.max_depth and value:
            raise ProtocolError(f"message is nested deeper than {limits.max_depth} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def describe(value: Any) -> str:
    """A short, safe rendering of a value from a message for an error text."""
    if value is None or type(value) in (bool, int, float):
        return repr(value)
    if type(value) is str and len(value) <= 64:
        return repr(value)
    return f"a value of type {type(value).__name__}"


def unpack(body: bytes, limits: Limits = REQUEST) -> dict[str, Any]:
    """Decode one message within ``limits`` and check its version; raises ProtocolError."""
    if len(body) > limits.max_bytes:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {limits.max_bytes}")
    try:
        message = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,  # no extension types (timestamps included) on this wire
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"body is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a map, got {type(message).__name__}")
    _check_shape(message, limits, len(body))
    version = message.get("v")
    # Type-strict: True and 1.0 equal 1 in Python, but are not version 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {describe(version)}; this lighthouse speaks"
            f" {PROTOCOL_VERSION}"
        )
    return message


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


def unpack_json(body: bytes, limits: Limits = REQUEST) -> dict[str, Any]:
    """A message sent as JSON (curl, a browser) within the same ``limits`` as msgpack.

    ``"v"`` may be left out (a person typing a body should not need it); when
    present it is checked like msgpack's.  NaN and Infinity are refused.
    """
    if len(body) > limits.max_bytes:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {limits.max_bytes}")
    try:
        message = json.loads(body, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError(f"message is nested deeper than {limits.max_depth} levels") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise ProtocolError(f"body is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be an object, got {type(message).__name__}")
    _check_shape(message, limits, len(body))
    message.setdefault("v", PROTOCOL_VERSION)
    version = message["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {describe(version)}; this lighthouse speaks"
            f" {PROTOCOL_VERSION}"
        )
    return message


# The field readers every decoder uses (here, the group rounds, the store): strict
# about types, naming the field in every error, raising ProtocolError (a 400).


def read_field(message: Mapping[str, Any], name: str, kind: type[T], default: T | None = None) -> T:
    """``message[name]`` of exactly ``kind`` (an int is accepted as a float), or ``default``."""
    if name not in message:
        if default is None:
            raise ProtocolError(f"missing field {name!r}")
        return default
    value = message[name]
    # bool is a subclass of int; a replica's step must not be True.
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def read_text(message: Mapping[str, Any], name: str, limit: int, default: str | None = None) -> str:
    """A string field of at most ``limit`` characters."""
    value = read_field(message, name, str, default)
    if len(value) > limit:
        raise ProtocolError(f"field {name!r} is longer than {limit} characters")
    return value


def read_count(
    message: Mapping[str, Any], name: str, minimum: int, default: int | None = None
) -> int:
    """An int field of at least ``minimum``."""
    value = read_field(message, name, int, default)
    if value < minimum:
        raise ProtocolError(f"field {name!r} must be >= {minimum}, got {value}")
    return value


def replica_id(message: Mapping[str, Any]) -> str:
    rid = read_text(message, "replica_id", MAX_ID_LEN)
    if not rid:
        raise ProtocolError("field 'replica_id' must not be empty")
    return rid


# -- join ---------------------------------------------------------------------


@dataclass(frozen=True)
class JoinRequest:
    member: Member
    # How long the caller is prepared to wait; the server answers with a
    # timeout error no later than this.
    timeout: float


def encode_member(member: Member) -> dict[str, Any]:
    encoded = {
        "replica_id": member.replica_id,
        "address": member.address,
        "store_address": member.store_address,
        "step": member.step,
        "world_size": member.world_size,
        "shrink_only": member.shrink_only,
        "commit_failures": member.commit_failures,
        "data": dict(member.data),
        "incarnation": member.incarnation,
        "history": member.history,
        "expected_groups": member.expected_groups,
    }
    if member.join_grace is not None:
        encoded["join_grace"] = member.join_grace
    return encoded


def decode_member(message: Mapping[str, Any]) -> Member:
    return Member(
        replica_id=replica_id(message),
        address=read_text(message, "address", MAX_ADDRESS_LEN, ""),
        store_address=read_text(message, "store_address", MAX_ADDRESS_LEN, ""),
        step=read_count(message, "step", 0, 0),
        world_size=read_count(message, "world_size", 1, 1),
        shrink_only=read_field(message, "shrink_only", bool, False),
        commit_failures=read_count(message, "commit_failures", 0, 0),
        data=_data(message),
        incarnation=read_text(message, "incarnation", MAX_ID_LEN, ""),
        history=read_text(message, "history", HISTORY_CHARS, ""),
        expected_groups=read_count(message, "expected_groups", 0, 0),
        join_grace=_join_grace(message),
    )


def _join_grace(message: Mapping[str, Any]) -> float | None:
    if message.get("join_grace") is None:
        return None
    grace = float(read_field(message, "join_grace", float))
    if not (math.isfinite(grace) and grace >= 0):
        raise ProtocolError(f"field 'join_grace' must be a finite number >= 0, got {grace}")
    return grace


def _data(message: Mapping[str, Any]) -> dict[str, Any]:
    """A member's free-form ``data``: a map that packs into at most MAX_DATA_BYTES."""
    data = read_field(message, "data", dict, {})
    try:
        size = len(msgpack.packb(data, use_bin_type=True))
    except Exception as e:  # only a message built in-process can get here
        raise ProtocolError(f"field 'data' cannot be encoded: {type(e).__name__}") from None
    if size > MAX_DATA_BYTES:
        raise ProtocolError(f"field 'data' packs into {size} bytes, more than {MAX_DATA_BYTES}")
    return data


def encode_join(member: Member, timeout: float) -> bytes:
    return pack({**encode_member(member), "timeout_ms": int(timeout * 1000)})


def decode_join(body: bytes) -> JoinRequest:
    message = unpack(body)
    timeout_ms = read_count(message, "timeout_ms", 1, 60_000)
    return JoinRequest(decode_member(message), timeout_ms / 1000)


def encode_quorum(
    quorum: Quorum, created_unix: float, settings: Sequence[SettingsChange] = ()
) -> dict[str, Any]:
    encoded: dict[str, Any] = {
        "quorum_id": quorum.quorum_id,
        "created": created_unix,
        "members": [encode_member(m) for m in quorum.members],
    }
    if settings:
        encoded["settings"] = {"changes": [change.encode() for change in settings]}
    return encoded


# -- live settings ----------------------------------------------------------------


# A lighthouse serves named quorums ("rooms") under ROOMS_PATH + name; a room
# name is URL-safe so that it travels in a path unescaped.
ROOMS_PATH = "/rooms/"
ROOM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# Changes one quorum carries at most (the one in effect and those decided after it).
MAX_SETTINGS_CHANGES = 16


def settings_values(message: Mapping[str, Any]) -> dict[str, float]:
    """The settings a message gives (``outer_lr`` >= 0, ``outer_momentum`` in [0, 1)), checked."""
    values: dict[str, float] = {}
    for name in SETTINGS:
        if name in message and message[name] is not None:
            value = float(read_field(message, name, float))
            if not math.isfinite(value) or value < 0:
                raise ProtocolError(f"field {name!r} must be a finite number >= 0, got {value}")
            if name == "outer_momentum" and value >= 1:
                raise ProtocolError(f"field 'outer_momentum' must be below 1, got {value}")
            values[name] = value
    return values


def decode_settings_change(message: Mapping[str, Any]) -> SettingsChange:
    values = settings_values(message)
    return SettingsChange(read_count(message, "from_step", 0), **values)


def decode_settings(message: Mapping[str, Any]) -> tuple[SettingsChange, ...]:
    """A quorum's ``settings`` map: its changes, ordered by ``from_step``."""
    changes = read_field(message, "changes", list, [])
    if len(changes) > MAX_SETTINGS_CHANGES or not all(isinstance(c, dict) for c in changes):
        raise ProtocolError(
            f"field 'changes' must be a list of at most {MAX_SETTINGS_CHANGES} maps"
        )
    decoded = tuple(decode_settings_change(c) for c in changes)
    steps = [c.from_step for c in decoded]
    if steps != sorted(set(steps)):
        raise ProtocolError("settings changes must have increasing 'from_step'")
    return decoded


def settings_at(changes: Sequence[SettingsChange], step: int) -> SettingsChange | None:
    """The change in effect for an outer step taken at ``step``; None: none applies yet."""
    current = None
    for change in changes:
        if change.from_step <= step:
            current = change
    return current


def decode_quorum(message: Mapping[str, Any]) -> Quorum:
    members = read_field(message, "members", list)
    if not all(isinstance(m, dict) for m in members):
        raise ProtocolError("field 'members' must be a list of maps")
    created = read_field(message, "created", float)
    if not math.isfinite(created):
        raise ProtocolError("field 'created' must be finite")
    return Quorum(
        quorum_id=read_field(message, "quorum_id", int),
        members=tuple(decode_member(m) for m in members),
        created=created,
        settings=decode_settings(read_field(message, "settings", dict, {})),
    )


# -- heartbeat, control -----------------------------------------------------------


@dataclass(frozen=True)
class Liveness:
    """What a heartbeat may say besides "alive": who is beating, and its committed state."""

    incarnation: str = ""
    # (step, history); None from clients that do not report it.
    committed: tuple[int, str] | None = None

    def encode(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"incarnation": self.incarnation}
        if self.committed is not None:
            fields["step"], fields["history"] = self.committed
        return fields


def decode_liveness(message: Mapping[str, Any]) -> Liveness:
    committed = None
    if "step" in message:
        committed = (
            read_count(message, "step", 0),
            read_text(message, "history", HISTORY_CHARS, ""),
        )
    return Liveness(read_text(message, "incarnation", MAX_ID_LEN, ""), committed)


def encode_heartbeat(rid: str, liveness: Liveness | None = None) -> bytes:
    return pack({"replica_id": rid, **(liveness or Liveness()).encode()})


def decode_heartbeat(body: bytes) -> tuple[str, Liveness]:
    message = unpack(body)
    return replica_id(message), decode_liveness(message)


# -- the commit fence ---------------------------------------------------------------


def encode_fence(rid: str, quorum_id: int, step: int) -> bytes:
    return pack({"replica_id": rid, "quorum_id": quorum_id, "step": step})


def decode_fence(body: bytes) -> tuple[str, int, int]:
    message = unpack(body)
    return (
        replica_id(message),
        read_field(message, "quorum_id", int),
        read_count(message, "step", 0),
    )


def encode_fence_answer(fence: Fence) -> bytes:
    return pack({"commit": fence.commit, "reason": fence.reason})


def decode_fence_answer(message: Mapping[str, Any]) -> Fence:
    return Fence(read_field(message, "commit", bool), read_text(message, "reason", 65536, ""))


def encode_kill(rid: str, reason: str = "") -> bytes:
    return pack({"replica_id": rid, "reason": reason})


def decode_kill(body: bytes) -> tuple[str, str]:
    return kill_fields(unpack(body))


def kill_fields(message: Mapping[str, Any]) -> tuple[str, str]:
    """The replica to kill and why, from a decoded msgpack or JSON message."""
    return replica_id(message), read_text(message, "reason", 1024, "")


# -- errors and pushed events ---------------------------------------------------


def encode_error(code: str, text: str) -> bytes:
    return pack({"error": code, "message": text})


def decode_error(body: bytes) -> tuple[str, str]:
    """Best effort: an error body that is not ours still yields a message."""
    try:
        message = unpack(body)
        return read_text(message, "error", 64), read_text(message, "message", 65536, "")
    except ProtocolError:
        return "unknown", body[:512].decode("utf-8", "replace")


EVENT_MEMBER_LOST = "member_lost"
EVENT_HEARTBEAT = "heartbeat"


def event_type(message: Mapping[str, Any]) -> str:
    return read_text(message, "type", 64)


def encode_member_lost(rid: str, cause: str, quorum_id: int) -> bytes:
    return pack(
        {"type": EVENT_MEMBER_LOST, "replica_id": rid, "cause": cause, "quorum_id": quorum_id}
    )


@dataclass(frozen=True)
class MemberLost:
    replica_id: str
    cause: str
    quorum_id: int


def decode_member_lost(message: Mapping[str, Any]) -> MemberLost:
    return MemberLost(
        replica_id(message), read_text(message, "cause", 64), read_field(message, "quorum_id", int)
    )
