"""Wire messages between replicas and the lighthouse: msgpack maps, versioned.

Every message is a map with ``"v": PROTOCOL_VERSION``.  Decoding is strict
about types (a bool is not an int, a missing field is named in the error) and
lenient about extra keys, so a newer client can add fields without breaking an
older lighthouse.  Anything malformed raises :class:`ProtocolError`, which the
server turns into a 400 with the message -- never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from lighthouse.history import HISTORY_CHARS
from lighthouse.quorum import Fence, Member, Quorum

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_LEN = 256
MAX_ADDRESS_LEN = 1024

# Header carrying the shared token on every HTTP request and WebSocket upgrade.
TOKEN_HEADER = "Authorization"
CONTENT_TYPE = "application/msgpack"

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that cannot be understood; the text says what is wrong with it."""


def pack(message: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb({"v": PROTOCOL_VERSION, **message}, use_bin_type=True)
    return packed


def unpack(body: bytes) -> dict[str, Any]:
    """Decode one message and check its version; raises ProtocolError."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        # unpackb derives its max_*_len limits from len(body).
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"body is not valid msgpack: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a map, got {type(message).__name__}")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r}; this lighthouse speaks {PROTOCOL_VERSION}"
        )
    return message


def _field(message: Mapping[str, Any], name: str, kind: type[T], default: T | None = None) -> T:
    if name not in message:
        if default is None:
            raise ProtocolError(f"missing field {name!r}")
        return default
    value = message[name]
    # bool is a subclass of int; a replica's step must not be True.
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _text(message: Mapping[str, Any], name: str, limit: int, default: str | None = None) -> str:
    value = _field(message, name, str, default)
    if len(value) > limit:
        raise ProtocolError(f"field {name!r} is longer than {limit} characters")
    return value


def _count(message: Mapping[str, Any], name: str, minimum: int, default: int | None = None) -> int:
    value = _field(message, name, int, default)
    if value < minimum:
        raise ProtocolError(f"field {name!r} must be >= {minimum}, got {value}")
    return value


def replica_id(message: Mapping[str, Any]) -> str:
    rid = _text(message, "replica_id", MAX_ID_LEN)
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
    return {
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


def decode_member(message: Mapping[str, Any]) -> Member:
    return Member(
        replica_id=replica_id(message),
        address=_text(message, "address", MAX_ADDRESS_LEN, ""),
        store_address=_text(message, "store_address", MAX_ADDRESS_LEN, ""),
        step=_count(message, "step", 0, 0),
        world_size=_count(message, "world_size", 1, 1),
        shrink_only=_field(message, "shrink_only", bool, False),
        commit_failures=_count(message, "commit_failures", 0, 0),
        data=_field(message, "data", dict, {}),
        incarnation=_text(message, "incarnation", MAX_ID_LEN, ""),
        history=_text(message, "history", HISTORY_CHARS, ""),
        expected_groups=_count(message, "expected_groups", 0, 0),
    )


def encode_join(member: Member, timeout: float) -> bytes:
    return pack({**encode_member(member), "timeout_ms": int(timeout * 1000)})


def decode_join(body: bytes) -> JoinRequest:
    message = unpack(body)
    timeout_ms = _count(message, "timeout_ms", 1, 60_000)
    return JoinRequest(decode_member(message), timeout_ms / 1000)


def encode_quorum(quorum: Quorum, created_unix: float) -> dict[str, Any]:
    return {
        "quorum_id": quorum.quorum_id,
        "created": created_unix,
        "members": [encode_member(m) for m in quorum.members],
    }


@dataclass(frozen=True)
class QuorumInfo:
    """A quorum as a client receives it; ``created`` is unix time."""

    quorum_id: int
    members: tuple[Member, ...]
    created: float

    @property
    def replica_ids(self) -> tuple[str, ...]:
        return tuple(m.replica_id for m in self.members)


def decode_quorum(message: Mapping[str, Any]) -> QuorumInfo:
    members = _field(message, "members", list)
    if not all(isinstance(m, dict) for m in members):
        raise ProtocolError("field 'members' must be a list of maps")
    created = _field(message, "created", float)
    if not math.isfinite(created):
        raise ProtocolError("field 'created' must be finite")
    return QuorumInfo(
        quorum_id=_field(message, "quorum_id", int),
        members=tuple(decode_member(m) for m in members),
        created=created,
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
        committed = (_count(message, "step", 0), _text(message, "history", HISTORY_CHARS, ""))
    return Liveness(_text(message, "incarnation", MAX_ID_LEN, ""), committed)


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
    return replica_id(message), _field(message, "quorum_id", int), _count(message, "step", 0)


def encode_fence_answer(fence: Fence) -> bytes:
    return pack({"commit": fence.commit, "reason": fence.reason})


def decode_fence_answer(message: Mapping[str, Any]) -> Fence:
    return Fence(_field(message, "commit", bool), _text(message, "reason", 65536, ""))


def encode_kill(rid: str, reason: str = "") -> bytes:
    return pack({"replica_id": rid, "reason": reason})


def decode_kill(body: bytes) -> tuple[str, str]:
    message = unpack(body)
    return replica_id(message), _text(message, "reason", 1024, "")


# -- errors and pushed events ---------------------------------------------------


def encode_error(code: str, text: str) -> bytes:
    return pack({"error": code, "message": text})


def decode_error(body: bytes) -> tuple[str, str]:
    """Best effort: an error body that is not ours still yields a message."""
    try:
        message = unpack(body)
        return _text(message, "error", 64), _text(message, "message", 65536, "")
    except ProtocolError:
        return "unknown", body[:512].decode("utf-8", "replace")


EVENT_QUORUM = "quorum"
EVENT_MEMBER_LOST = "member_lost"
EVENT_HEARTBEAT = "heartbeat"


def event_type(message: Mapping[str, Any]) -> str:
    return _text(message, "type", 64)


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
        replica_id(message), _text(message, "cause", 64), _field(message, "quorum_id", int)
    )
