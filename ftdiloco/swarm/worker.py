"""One worker of one pipeline stage: its slice of the model, its inbox, its router.

A stage worker is an ordinary DiLoCo replica group of its stage's room (the
training script wraps its stage module in ``Manager`` + ``DiLoCo`` exactly as
for a whole model); this module only moves micro-batches:

- the first stage draws a batch, runs its slice, hands the activations to the
  next stage (:class:`Forwarder`), and back-propagates the gradient that
  comes back (:meth:`StageWorker.train`);
- a later stage takes a received micro-batch (:meth:`StageWorker.serve`),
  runs its slice, either computes the loss (last stage) or forwards in turn,
  and answers with the gradient of its input -- *before* its optimizer step,
  since that step may be an outer step that waits for the stage's peers.

Every micro-batch is one inner step of every worker it passed through.  The
sender's :class:`Counters` say what happened to each: delivered, refused by a
busy worker, re-sent because its worker died (never applied twice: the dead
worker's unsaved work died with it), or dropped when a deadline passed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import torch
from torch import nn

from ftdiloco.swarm.routing import PeerList, choose, pipeline_pause, routing_weights
from ftdiloco.swarm.transport import Lost, Resend, StageServer, exchange
from ftwire import guard
from ftwire.background import BackgroundLoop

# Tensor names on the wire: forward (activations, targets), backward (gradient, loss).
FORWARD = frozenset({"x", "y"})
BACKWARD = frozenset({"grad", "loss"})
# How long a sender waits before trying again when every worker is busy or none is listed.
_RETRY_S = 0.02


@dataclass
class Counters:
    """What happened to the micro-batches this worker sent on."""

    sent: int = 0  # delivered and answered
    busy: int = 0  # refused by a busy or joining worker, given to another (or retried)
    resent: int = 0  # its worker died or could not be reached: given to another
    dropped: int = 0  # no answer in time: fate unknown, neither re-sent nor applied here


class Room:
    """A stage's room seen from another process: its live workers, on a loop thread of its own."""

    def __init__(self, room_url: str, token: str | None, refresh_every: float = 0.2) -> None:
        self.loop = BackgroundLoop("ftdiloco-swarm-room")

        async def connect() -> tuple[aiohttp.ClientSession, PeerList]:
            session = aiohttp.ClientSession()
            return session, PeerList(room_url, session, token, refresh_every)

        self.session, self.peers = self.loop.run(connect(), timeout=10)

    def live(self) -> int:
        """How many workers of the room are alive now, as its lighthouse says."""
        self.loop.run(self.peers.refresh(now=True), timeout=10)
        return self.peers.alive

    def close(self) -> None:
        try:
            self.loop.run(self.session.close(), timeout=10)
        finally:
            self.loop.close()


class Forwarder:
    """Sends micro-batches to the next stage's room by SWARM's rule.

    ``on_pause`` is called with the reason when the next stage has no live
    worker, and with None when the pipeline moves again.  ``weighted=False``
    ignores the measured rates and draws uniformly (the DiLoCo-SWARM
    report's rule), so that a benchmark can compare the two.
    """

    def __init__(
        self,
        room_url: str,
        stage: int,
        *,
        token: str | None,
        timeout: float,
        on_pause: Callable[[str | None], None],
        seed: int = 0,
        weighted: bool = True,
    ) -> None:
        self.stage = stage
        self.weighted = weighted
        self.counters = Counters()
        self.rates: dict[str, float] = {}
        self.paused: str | None = None
        self.room = Room(room_url, token)
        self.peers = self.room.peers
        self._token = token
        self._timeout = timeout
        self._on_pause = on_pause
        self._rng = random.Random(seed)

    def send(
        self, tensors: dict[str, torch.Tensor], *, evaluate: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The next stage's answer to one micro-batch; None if it was dropped."""
        return self.room.loop.run(self._send(tensors, evaluate))

    async def _send(
        self, tensors: dict[str, torch.Tensor], evaluate: bool
    ) -> dict[str, torch.Tensor] | None:
        attempt = 0
        while True:
            peers = await self.peers.refresh(now=attempt > 0 and not self.peers.peers)
            rates = self.rates if self.weighted else {}
            weights = routing_weights(peers, rates, frozenset(self.peers.failed))
            self._set_paused(pipeline_pause({self.stage + 1: len(weights)}))
            if not weights:
                await self.peers.wait_listed(time.monotonic() + 1.0)
                attempt += 1
                continue
            address = choose(weights, self._rng.random())
            try:
                answer, rate = await exchange(
                    self.room.session,
                    address,
                    tensors,
                    BACKWARD,
                    token=self._token,
                    timeout=self._timeout,
                    evaluate=evaluate,
                )
            except Resend as e:
                if e.dead:
                    self.peers.note_failed(address)
                    self.rates.pop(address, None)
                    self.counters.resent += 1
                else:
                    self.counters.busy += 1
                attempt += 1
                await asyncio.sleep(_RETRY_S)
                continue
            except Lost:
                self.counters.dropped += 1
                return None
            if rate > 0:
                self.rates[address] = rate
            self.counters.sent += 1
            return answer

    def _set_paused(self, reason: str | None) -> None:
        if reason != self.paused:
            self.paused = reason
            self._on_pause(reason)

    def close(self) -> None:
        self.room.close()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StageWorker:
    """Runs micro-batches through one stage: its module, optimizer, inbox and router.

    ``server`` is None for the first stage (it draws the data), ``forwarder``
    None for the last (it computes ``loss_fn``).  ``slowdown`` > 1 sleeps
    after each micro-batch's compute so that it takes that many times as long
    (a slower machine on purpose, for benchmarks).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        server: StageServer | None,
        forwarder: Forwarder | None,
        loss_fn: LossFn,
        grad_clip: float | None = None,
        slowdown: float = 1.0,
    ) -> None:
        if server is None and forwarder is None:
            raise ValueError("a stage needs a server (not the first stage) or a forwarder")
        self.module = module
        self.optimizer = optimizer
        self.server = server
        self.forwarder = forwarder
        self.loss_fn = loss_fn
        self.grad_clip = grad_clip
        self.slowdown = slowdown
        self.inner_steps = 0

    def train(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """First stage: one micro-batch through the whole pipeline and one inner step.

        Returns its loss, or None if it was dropped (no step taken then).
        """
        if self.forwarder is None:
            raise RuntimeError("train() is for the first stage of a pipeline of two or more")
        out = self.module(x)
        answer = self.forwarder.send({"x": out, "y": y})
        if answer is None:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        out.backward(answer["grad"])
        self._step()
        return float(answer["loss"])

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """First stage: the loss of one held-out batch through the pipeline (no step)."""
        if self.forwarder is None:
            raise RuntimeError("evaluate() is for the first stage of a pipeline")
        answer = self.forwarder.send({"x": self.module(x), "y": y}, evaluate=True)
        return None if answer is None else float(answer["loss"])

    def serve(self, timeout: float) -> bool:
        """A later stage: compute one received micro-batch; False if none came in time."""
        if self.server is None:
            raise RuntimeError("serve() is for the stages after the first")
        work = self.server.take(timeout)
        if work is None:
            return False
        started = time.perf_counter()
        try:
            if work.evaluate:
                work.reply(self._evaluate(work.tensors["x"], work.tensors["y"]))
                return True
            x = work.tensors["x"].requires_grad_()
            out = self.module(x)
            if self.forwarder is None:
                loss = self.loss_fn(out, work.tensors["y"])
                loss.backward()  # type: ignore[no-untyped-call]
            else:
                sent = time.perf_counter()
                answer = self.forwarder.send({"x": out, "y": work.tensors["y"]})
                started += time.perf_counter() - sent  # the next stage's time is not ours
                if answer is None:
                    self.optimizer.zero_grad(set_to_none=True)
                    work.fail(_dropped())
                    return True
                out.backward(answer["grad"])
                loss = answer["loss"]
            self._measured(started)
            assert x.grad is not None
            work.reply({"grad": x.grad, "loss": loss.detach()})
        except BaseException as e:
            work.fail(e)
            raise
        self._step()
        return True

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.module(x)
            if self.forwarder is None:
                loss = self.loss_fn(out, y)
            else:
                answer = self.forwarder.send({"x": out, "y": y}, evaluate=True)
                if answer is None:
                    raise _dropped()
                loss = answer["loss"]
        return {"grad": torch.zeros(0), "loss": loss}

    def _measured(self, started: float) -> None:
        assert self.server is not None
        elapsed = time.perf_counter() - started
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * elapsed)
        self.server.measured(time.perf_counter() - started)

    def _step(self) -> None:
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if self.server is None:
            self.optimizer.step()  # DiLoCo's hook runs the outer step every sync_every
        else:
            with self.server.stepping():
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_steps += 1


def _dropped() -> Exception:
    return guard.Refused(504, "dropped", "the next stage did not answer in time")
