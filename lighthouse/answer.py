"""The answer to a join: encoded once per quorum, deflated once when that pays."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from aiohttp import web

from ftwire import protocol

# Join answers from this size on are also sent deflated to clients that accept it
# (below about one TCP segment, compressing saves no packet).
_DEFLATE_FROM_BYTES = 1400


def msgpack_response(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=protocol.CONTENT_TYPE)


@dataclass(frozen=True)
class JoinAnswer:
    """A quorum's join answer, encoded once per formation and shared by all its members.

    Large answers are also kept deflated (compressed once, not per request):
    a quorum of 1000 members is ~180 kB of msgpack, mostly repeated keys and
    similar addresses, that every member must receive; deflated it is a
    tenth of that, and writing 1000 copies through the kernel is what makes
    releasing a large quorum slow.
    """

    plain: bytes
    deflated: bytes | None

    @classmethod
    def of(cls, body: bytes) -> JoinAnswer:
        deflated = zlib.compress(body, 1) if len(body) >= _DEFLATE_FROM_BYTES else None
        return cls(body, deflated)

    def response(self, request: web.Request) -> web.Response:
        if self.deflated is not None and _accepts_deflate(request.headers.get("Accept-Encoding")):
            return web.Response(
                body=self.deflated,
                content_type=protocol.CONTENT_TYPE,
                headers={"Content-Encoding": "deflate"},
            )
        return msgpack_response(self.plain)


def _accepts_deflate(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header (RFC 9110 12.5.3) allows ``deflate``."""
    for coding in (accept_encoding or "").split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() in ("deflate", "*"):
            quality = params.strip().lower().removeprefix("q=")
            return params.strip() == "" or _positive(quality)
    return False


def _positive(quality: str) -> bool:
    try:
        return float(quality) > 0
    except ValueError:
        return False
