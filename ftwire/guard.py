"""What every server of the project does at its door: one token check, one error answer.

The lighthouse, a group's manager server (the group round, the heal routes,
the rendezvous store) all use these, so a header accepted by one is accepted
by every other, and a refusal looks the same wherever it comes from: a 4xx
status with an ``encode_error`` body naming what was wrong: msgpack for the
library's clients, JSON for a person's tools (curl, a browser) that prefer it
in their ``Accept`` header or sent a JSON body (:func:`wants_json`).

The token travels as ``Authorization: Bearer <token>``.  As RFC 7235 says, the
scheme is case-insensitive and one or more spaces separate it from the
credentials; the token itself is compared exactly, in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from ftwire import protocol

_log = structlog.get_logger(__name__)

SCHEME = "bearer"
# Refusals that are part of normal operation, logged at info rather than warning.
ROUTINE = frozenset(
    {
        "timeout",
        "busy",
        "superseded",
        "evicted",
        "shutting_down",
        "stale_incarnation",
        "not_ready",
        "step_mismatch",
        "group_round_failed",
    }
)


class Refused(Exception):
    """A request that will not be served: its status, machine-readable code, message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        replica: str | None = None,
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.replica = replica
        # The connection cannot carry another request (its body was unreadable).
        self.close = close


def authorization(token: str) -> dict[str, str]:
    """The header a client sends to a server that requires ``token``."""
    return {protocol.TOKEN_HEADER: f"Bearer {token}"}


def token_ok(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (always, with no token)."""
    if token is None:
        return True
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    given = given.lstrip(" ")
    if scheme.lower() != SCHEME or not given:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
    )


def request_token_ok(request: web.Request, token: str | None) -> bool:
    return token_ok(request.headers.get(protocol.TOKEN_HEADER), token)


def authorize(request: web.Request, token: str | None) -> None:
    """Raise the 401 refusal unless the request carries ``token``."""
    if token is None:
        return
    if protocol.TOKEN_HEADER not in request.headers:
        raise Refused(401, "unauthorized", "this server requires 'Authorization: Bearer <token>'")
    if not request_token_ok(request, token):
        raise Refused(401, "unauthorized", "wrong token")


JSON = "application/json"
# Set on a request whose JSON body was accepted as such (read_message).
# (aiohttp before 3.12 has no RequestKey; a plain string key works there.)
_JSON_BODY: Any = (
    web.RequestKey("ftdiloco.json_body", bool)
    if hasattr(web, "RequestKey")
    else "ftdiloco.json_body"
)


def _accepted(header: str) -> dict[str, float]:
    """The media ranges of an ``Accept`` header with their quality (RFC 9110 12.5.1)."""
    ranges: dict[str, float] = {}
    for part in header.split(",")[:64]:
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                if not 0.0 <= quality <= 1.0:  # also NaN
                    quality = 0.0
        if media:
            ranges.setdefault(media.lower(), quality)
    return ranges


def _quality(ranges: dict[str, float], media: str) -> float:
    """How much a client accepts ``media``: the most specific range that matches it."""
    kind = media.split("/")[0]
    for candidate in (media, f"{kind}/*", "*/*"):
        if candidate in ranges:
            return ranges[candidate]
    return 0.0


def wants_json(request: web.Request) -> bool:
    """Whether to answer ``request`` in JSON rather than msgpack (the default).

    JSON when the ``Accept`` header rates application/json above
    application/msgpack (``curl -H 'Accept: application/json'``, a browser's
    ``fetch`` that asks for it).  A client that says nothing, or ``*/*``, gets
    msgpack, as the library's clients always have.
    """
    ranges = _accepted(request.headers.get("Accept", ""))
    return _quality(ranges, JSON) > _quality(ranges, protocol.CONTENT_TYPE)


def reply(request: web.Request, message: dict[str, Any], status: int = 200) -> web.Response:
    """A successful or refused answer in the format the client prefers (see :func:`wants_json`)."""
    if wants_json(request):
        return web.Response(
            status=status,
            text=json.dumps({"v": protocol.PROTOCOL_VERSION, **message}),
            content_type=JSON,
        )
    return web.Response(
        status=status, body=protocol.pack(message), content_type=protocol.CONTENT_TYPE
    )


# The one policy for the pages a server serves (dashboards): their own inline
# script and style only, fetches back to the same server, nothing else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)


def page(html: bytes) -> web.Response:
    """A dashboard page, under :data:`PAGE_POLICY` and never cached (it shows live state)."""
    return web.Response(
        body=html,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"},
    )


def error_response(
    status: int, code: str, message: str, request: web.Request | None = None
) -> web.Response:
    """The one shape of every refusal: a map with ``error`` and ``message``, in msgpack
    or, for a client that prefers it, JSON."""
    fields = {"error": code, "message": message[:4096]}
    if request is not None:
        return reply(request, fields, status)
    return web.Response(
        status=status, body=protocol.pack(fields), content_type=protocol.CONTENT_TYPE
    )


async def read_message(
    request: web.Request, limit: int = protocol.MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """A request's body as a message: JSON when its Content-Type says so, msgpack otherwise.

    An empty body is an empty message; either format is held to the same
    decode-time limits (:func:`protocol.unpack`, :func:`protocol.unpack_json`).
    """
    body = await read_body(request, limit)
    if not body:
        return {"v": protocol.PROTOCOL_VERSION}
    if request.content_type == JSON:
        request[_JSON_BODY] = True
        return protocol.unpack_json(body)
    return protocol.unpack(body)


async def read_body(request: web.Request, limit: int = protocol.MAX_MESSAGE_BYTES) -> bytes:
    """The request body, at most ``limit`` bytes; a body that cannot be read is a 4xx."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Refused(413, "too_large", f"body of {declared} bytes exceeds {limit}")
    body = bytearray()
    try:
        async for data in request.content.iter_any():
            body += data
            if len(body) > limit:
                raise Refused(413, "too_large", f"body exceeds {limit} bytes")
    except web.HTTPRequestEntityTooLarge:
        raise Refused(413, "too_large", f"body exceeds {limit} bytes") from None
    except (web.RequestPayloadError, ValueError) as e:
        raise _unreadable(request, e) from None
    return bytes(body)


def _unreadable(request: web.Request, error: Exception) -> Refused:
    """A bogus Content-Encoding, a broken chunked body, ...: the client's fault.

    The rest of such a body cannot be read either; marking it ended keeps
    aiohttp from trying to drain it after the answer (a traceback in the logs),
    and the answer closes the connection.
    """
    request.content.feed_eof()
    message = " ".join(str(error).split())
    return Refused(400, "bad_request", f"cannot read the body: {message}", close=True)


def _refusal_of(request: web.Request, error: Exception) -> Refused | None:
    if isinstance(error, Refused):
        return error
    if isinstance(error, protocol.ProtocolError):
        message = str(error)
        # A JSON body where JSON is accepted (the control endpoints) needs no hint.
        if request.content_type != protocol.CONTENT_TYPE and not request.get(_JSON_BODY):
            message += (
                f" (Content-Type is {request.content_type}, expected {protocol.CONTENT_TYPE})"
            )
        return Refused(400, "bad_request", message)
    if isinstance(error, web.RequestPayloadError):
        return _unreadable(request, error)
    return None


def answer(request: web.Request, error: Exception) -> web.Response:
    """The answer to a handler's exception, logged once: a 4xx for the client's
    faults, a 500 with the error's text for our own."""
    refused = _refusal_of(request, error)
    if refused is None:
        _log.error(
            "internal error",
            path=request.path,
            peer=request.remote,
            exc_info=(type(error), error, error.__traceback__),
        )
        return error_response(
            500, "internal", f"internal error: {type(error).__name__}: {error}", request
        )
    log = _log.info if refused.code in ROUTINE else _log.warning
    log(
        "request refused",
        status=refused.status,
        reason=refused.code,
        message=refused.message,
        replica=refused.replica,
        path=request.path,
        peer=request.remote,
    )
    response = error_response(refused.status, refused.code, refused.message, request)
    if refused.close:
        response.force_close()
    return response


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every failure of a handler into an answer and a log line, never a crash."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's own refusals (404, 405, a bad upgrade) in the one shape.
        code = "_".join(e.reason.lower().split()) or "refused"
        response = answer(request, Refused(e.status, code, e.text or e.reason))
        if "Allow" in e.headers:
            response.headers["Allow"] = e.headers["Allow"]
        return response
    except Exception as e:
        return answer(request, e)


def install(app: web.Application) -> None:
    """Put :func:`middleware` on ``app`` once, whoever asks first."""
    if middleware not in app.middlewares:
        app.middlewares.append(middleware)


RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name, an IP, or ``[v6]``) is this machine only.

    Servers that bind anything else need a token; a host name other than
    localhost is assumed reachable from outside.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
