"""Activations forward and gradients back between stage workers: safetensors over HTTP.

One micro-batch is one ``POST /v1/microbatch``: the body holds the tensors
going forward (activations, and the targets the last stage needs), the answer
holds the gradient of the activations (and the loss), so gradients return
along exactly the path the activations took.  Nothing is pickled; a body is
bounded in size, a request needs the job's token, and every wait has a deadline.

The receiving worker's model belongs to its training thread.  The server
only queues a request (a bounded queue: beyond it the answer is 503 ``busy``)
and waits for that thread to answer it.  A request that thread has not
*started* within ``queue_wait`` seconds -- it is in an outer step, or slow --
is withdrawn and answered 503 ``busy``: it was never computed, so the sender
may give it to another worker without counting it twice.  That is also what
keeps two stages from waiting on each other: a worker in its outer step
never holds work that its stage peer needs to reach the same step.

A sender classifies every failure (:func:`exchange`): :class:`Resend` when the
micro-batch was certainly not applied by a live worker (refused, busy, or the
worker died: its unsaved work died with it), :class:`Lost` when its fate is
unknown (a deadline passed on a live worker), which the sender counts as
dropped and never re-sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import aiohttp
import safetensors.torch
import torch
from aiohttp import web

from ftwire import guard, protocol
from ftwire.background import BackgroundLoop

CONTENT_TYPE = "application/vnd.safetensors"
RATE_HEADER = "X-Swarm-Rate"
EVAL_HEADER = "X-Swarm-Eval"
DEFAULT_MAX_BODY = 256 << 20


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors as one safetensors buffer (contiguous CPU copies, detached)."""
    return safetensors.torch.save({k: t.detach().contiguous().cpu() for k, t in tensors.items()})


def decode(body: bytes, expected: frozenset[str]) -> dict[str, torch.Tensor]:
    """A safetensors buffer holding exactly the names ``expected``; anything else is a 400."""
    try:
        tensors = safetensors.torch.load(body)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise guard.Refused(400, "bad_request", f"not a safetensors buffer: {e}") from None
    if set(tensors) != expected:
        raise guard.Refused(
            400, "bad_request", f"expected tensors {sorted(expected)}, got {sorted(tensors)}"
        )
    return tensors


class Resend(Exception):
    """The micro-batch was not applied by a live worker: give it to another.

    ``dead``: the worker is gone (refused, reset) rather than busy.
    """

    def __init__(self, address: str, reason: str, *, dead: bool) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.dead = dead


class Lost(Exception):
    """The micro-batch's fate is unknown: count it as dropped, never re-send it."""


async def exchange(
    session: aiohttp.ClientSession,
    address: str,
    tensors: Mapping[str, torch.Tensor],
    expected: frozenset[str],
    *,
    token: str | None,
    timeout: float,
    evaluate: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """Send one micro-batch to ``address``; its answer's tensors and the worker's rate."""
    headers = {"Content-Type": CONTENT_TYPE, **(guard.authorization(token) if token else {})}
    if evaluate:
        headers[EVAL_HEADER] = "1"
    body = await asyncio.to_thread(encode, tensors)
    try:
        async with session.post(
            f"{address}/v1/microbatch",
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            answer = await response.read()
            if response.status == 503:
                raise Resend(address, protocol.decode_error(answer)[1], dead=False)
            if response.status == 504:  # a later stage dropped it: its fate is unknown
                raise Lost(f"{address}: {protocol.decode_error(answer)[1]}")
            if response.status != 200:
                code, message = protocol.decode_error(answer)
                raise RuntimeError(f"{address} refused a micro-batch: {code}: {message}")
            rate = float(response.headers.get(RATE_HEADER, "0") or 0)
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
        raise Resend(address, f"unreachable ({type(e).__name__})", dead=True) from e
    except aiohttp.ClientOSError as e:  # a reset: the process died mid-request
        raise Resend(address, f"connection reset ({e})", dead=True) from e
    except TimeoutError as e:
        raise Lost(f"{address}: no answer within {timeout:g}s") from e
    return await asyncio.to_thread(decode, answer, expected), rate


@dataclass
class Work:
    """One received micro-batch, handed to the training thread by :meth:`StageServer.take`."""

    tensors: dict[str, torch.Tensor]
    evaluate: bool
    _loop: asyncio.AbstractEventLoop
    _answer: asyncio.Future[dict[str, torch.Tensor] | BaseException]
    _state: str = "queued"  # queued -> claimed | withdrawn, under the server's lock
    received: float = field(default_factory=time.monotonic)

    def reply(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._settle(dict(tensors))

    def fail(self, error: BaseException) -> None:
        self._settle(error)

    def _settle(self, outcome: dict[str, torch.Tensor] | BaseException) -> None:
        def settle() -> None:
            if not self._answer.done():
                self._answer.set_result(outcome)

        self._loop.call_soon_threadsafe(settle)


class StageServer:
    """This worker's ``POST /v1/microbatch``, on a loop thread of its own.

    ``expected``: the tensor names a request must hold.  Answers 503
    ``not_ready`` until :meth:`ready` (a worker that is still healing gets no
    work), 503 ``busy`` when ``queue_size`` requests already wait.
    """

    def __init__(
        self,
        expected: frozenset[str],
        *,
        token: str | None,
        host: str = "127.0.0.1",
        queue_size: int = 4,
        queue_wait: float = 0.25,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.expected = expected
        self._token = token
        self._queue_wait = queue_wait
        self._max_body = max_body
        self._inbox: queue.Queue[Work] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._ready = False
        self._stepping = False
        self.rate = 0.0  # micro-batches per second of this worker's compute (EMA)
        # Answers computed for a sender that was gone by then (its side of the
        # micro-batch died with it): counted, not hidden.
        self.orphaned = 0
        self._loop = BackgroundLoop("ftdiloco-swarm")
        self.address = self._loop.run(self._start(host), timeout=30)

    async def _start(self, host: str) -> str:
        app = web.Application(client_max_size=self._max_body, middlewares=[guard.middleware])
        app.router.add_post("/v1/microbatch", self._microbatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://{host}:{port}"

    def ready(self) -> None:
        """From now on this worker takes micro-batches (it has joined and healed)."""
        self._ready = True

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """While the training thread takes an optimizer step (maybe an outer step that
        waits for the stage's peers), new micro-batches are refused at once (503 busy)."""
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False

    def measured(self, seconds: float) -> None:
        """One micro-batch took ``seconds`` of this worker's compute: update its rate."""
        if seconds > 0:
            rate = 1.0 / seconds
            self.rate = rate if self.rate == 0.0 else 0.8 * self.rate + 0.2 * rate

    def take(self, timeout: float) -> Work | None:
        """The next micro-batch to compute, claimed; None if none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                work = self._inbox.get(timeout=remaining)
            except queue.Empty:
                return None
            with self._lock:
                if work._state == "queued":
                    work._state = "claimed"
                    return work
        return None

    async def _microbatch(self, request: web.Request) -> web.Response:
        guard.authorize(request, self._token)
        if not self._ready:
            raise guard.Refused(503, "not_ready", "this worker is joining its stage")
        if self._stepping:
            raise guard.Refused(503, "busy", "this worker is in its optimizer step")
        body = await guard.read_body(request, self._max_body)
        tensors = await asyncio.to_thread(decode, body, self.expected)
        loop = asyncio.get_running_loop()
        work = Work(tensors, request.headers.get(EVAL_HEADER) == "1", loop, loop.create_future())
        try:
            self._inbox.put_nowait(work)
        except queue.Full:
            raise guard.Refused(503, "busy", "this worker's queue is full") from None
        try:
            outcome = await self._await(work)
        except asyncio.CancelledError:
            if work._state == "claimed":
                self.orphaned += 1
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return web.Response(
            body=await asyncio.to_thread(encode, outcome),
            content_type=CONTENT_TYPE,
            headers={RATE_HEADER: f"{self.rate:.6g}"},
        )

    async def _await(self, work: Work) -> dict[str, torch.Tensor] | BaseException:
        """The answer; a micro-batch not started within queue_wait is withdrawn (503 busy)."""
        try:
            return await asyncio.wait_for(asyncio.shield(work._answer), self._queue_wait)
        except TimeoutError:
            with self._lock:
                if work._state == "queued":
                    work._state = "withdrawn"
                    raise guard.Refused(
                        503, "busy", f"not started within {self._queue_wait:g}s"
                    ) from None
        return await work._answer

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        try:
            self._loop.run(stop(), timeout=10)
        finally:
            self._loop.close()
