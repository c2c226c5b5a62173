"""``ftdiloco hub``: DiLoCo through one server, for groups that cannot reach each other.

The hub holds the global weights and the outer optimizer (:mod:`.state`);
groups join a round per outer step, submit their pseudo-gradients, and take
the new global weights (:class:`ftdiloco.hub.client.HubManager`).  Everything
goes over one HTTP port, so a single forwarded port (an SSH tunnel, a relay)
is all a group needs.  The round rules are pure (:mod:`.rounds`); this module
carries them out.

Endpoints (all but the dashboard page need the token when one is set):

- ``POST /v1/join``: long-poll until the round forms; answers ``init`` (the
  hub has no weights yet: upload yours), ``heal`` (download the global
  weights first) or ``formed`` (the round, its members, their join info).
  A group whose model differs is refused, naming the first mismatch.
- ``PUT /v1/init``: the first group's weights become the global weights.
- ``GET /v1/weights[?fragment=K]``: the global weights (safetensors, streamed).
- ``PUT /v1/submit?group=&incarnation=&round=``: a pseudo-gradient, streamed
  segment by segment into the round's one accumulator.
- ``POST /v1/outcome``: long-poll until the round committed or failed.
- ``POST /v1/beat``, ``POST /v1/leave``: liveness and goodbye.
- ``GET /status``, ``/metrics``, ``/`` (the dashboard); ``POST /control/kick``,
  ``/control/settings`` (outer lr, momentum), ``/control/save``, ``/control/shutdown``.

A commit is saved (atomically) before any member learns of it when
``save_every`` is 1 (the default), so a hub SIGKILLed and restarted loses
no committed step: a member that asks for the outcome of its round after
the restart hears ``committed`` (the last commit is part of the state), and
a round that had not committed is failed and retried.  With ``save_every``
N > 1, up to N - 1 committed steps can be lost to a SIGKILL (never to a
SIGTERM, which saves); groups then find themselves ahead of the hub and are
refused, by design, rather than silently rewound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.resources
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from ftdiloco.hub import wire
from ftdiloco.hub.rounds import Commit, Joined, Outcome, Round, Rounds, Submission
from ftdiloco.hub.state import GlobalState, Layout, OuterSettings
from ftdiloco.training.compression import CODECS, get_codec
from ftwire import guard

__all__ = ["HubOptions", "HubServer"]

_log = structlog.get_logger(__name__)

# Longest a join or an outcome request is held open before it is answered "wait".
MAX_POLL = 30.0
# Submissions whose segment is being staged and decoded at once: the hub's
# extra memory is this many segments, however many groups submit.
INGEST_SLOTS = 2
_WRITE_BYTES = 1 << 20


@dataclass(frozen=True)
class HubOptions:
    state_path: Path
    token: str | None = None
    min_groups: int = 1
    join_timeout: float = 60.0
    round_timeout: float = 60.0
    heartbeat_timeout: float = 10.0
    save_every: int = 1
    # The outer optimizer's lr and momentum; None: the first group's.
    outer_lr: float | None = None
    outer_momentum: float | None = None


@dataclass
class _Accumulator:
    """The sum of one round's submissions: one fp32 buffer per flat, however many groups."""

    round_id: int
    fragment: int
    sums: list[torch.Tensor]
    contributors: int = 0
    weighted: bool = False


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("ftdiloco_hub_step", "committed outer steps", registry=r)
        self.groups = Gauge("ftdiloco_hub_groups", "live groups", registry=r)
        self.commits = Counter("ftdiloco_hub_commits", "rounds committed", registry=r)
        self.failures = Counter("ftdiloco_hub_round_failures", "rounds failed", registry=r)
        self.ingest = Counter(
            "ftdiloco_hub_ingest_bytes", "pseudo-gradient bytes received", registry=r
        )
        self.egress = Counter("ftdiloco_hub_egress_bytes", "weight bytes sent", registry=r)
        self.saves = Counter("ftdiloco_hub_saves", "state saves", registry=r)
        self.outer_lr = Gauge("ftdiloco_hub_outer_lr", "outer learning rate", registry=r)
        self.outer_momentum = Gauge("ftdiloco_hub_outer_momentum", "outer momentum", registry=r)


class HubServer:
    def __init__(self, options: HubOptions) -> None:
        self.options = options
        self.state: GlobalState | None = (
            GlobalState.load(options.state_path) if options.state_path.exists() else None
        )
        self.rounds = Rounds(
            step=self.state.step if self.state is not None else 0,
            epoch=secrets.randbits(31),
            last_commit=self.state.last_commit if self.state is not None else None,
            min_groups=options.min_groups,
            join_timeout=options.join_timeout,
            round_timeout=options.round_timeout,
            liveness=options.heartbeat_timeout,
        )
        self._metrics = _Metrics()
        self._changed: asyncio.Condition | None = None
        self._acc: _Accumulator | None = None
        # Each fragment's sum buffers, allocated once and zeroed per round: the
        # memory stays put instead of being freed and taken again every step.
        self._sums: dict[int, list[torch.Tensor]] = {}
        # Buffers a submission's segment is read into, one per ingest slot.
        self._slots: asyncio.Queue[bytearray] | None = None
        self._weights_in_use: _Readers | None = None
        # Applying a step and saving never overlap (both read the momentum).
        self._writing: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ftdiloco-hub")
        self._stopped: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._saved_step = self.rounds.step
        self._initialising = False  # a group's upload of the first weights is under way
        self._dashboard = (
            importlib.resources.files("ftdiloco.hub").joinpath("dashboard.html").read_bytes()
        )
        self.started = time.time()

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        guard.install(app)
        r = app.router
        r.add_post("/v1/join", self._join)
        r.add_put("/v1/init", self._init)
        r.add_get("/v1/weights", self._weights)
        r.add_put("/v1/submit", self._submit)
        r.add_post("/v1/outcome", self._outcome)
        r.add_post("/v1/beat", self._beat)
        r.add_post("/v1/leave", self._leave)
        r.add_post("/control/kick", self._kick)
        r.add_post("/control/settings", self._settings)
        r.add_post("/control/save", self._save_request)
        r.add_post("/control/shutdown", self._shutdown)
        r.add_get("/status", self._status)
        r.add_get("/metrics", self._metrics_page)
        r.add_get("/", self._dashboard_page)
        r.add_get("/dashboard", self._dashboard_page)
        return app

    async def start(self, host: str, port: int) -> str:
        self._changed = asyncio.Condition()
        self._slots = asyncio.Queue()
        for _ in range(INGEST_SLOTS):
            self._slots.put_nowait(bytearray(get_codec("fp32").payload_bytes(wire.SEGMENT)))
        self._weights_in_use = _Readers()
        self._writing = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._spawn(self._ticker())
        bound = int(self._runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_stop(self) -> None:
        """SIGTERM, SIGINT, the shutdown button: save, then stop (idempotent)."""
        self._spawn(self._stop())

    async def _stop(self) -> None:
        assert self._stopped is not None
        if self._stopped.is_set():
            return
        await self.save()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None and self._runner is not None
        await self._stopped.wait()
        await self._runner.cleanup()
        self._worker.shutdown(wait=True)  # a save in progress finishes

    async def _ticker(self) -> None:
        """Run the round rules' timers: at each deadline they may form or fail a round."""
        assert self._changed is not None
        while True:
            now = time.monotonic()
            self.rounds.tick(now)
            await self._wake()
            deadline = self.rounds.next_deadline(now)
            pause = 1.0 if deadline is None else min(1.0, max(0.01, deadline - now))
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), pause)

    async def _wake(self) -> None:
        assert self._changed is not None
        self._metrics.groups.set(len(self.rounds.live(time.monotonic())))
        async with self._changed:
            self._changed.notify_all()

    async def _poll(self, request: web.Request, ready: Any) -> Any:
        """Call ``ready()`` after every change until it returns non-None or the wait is up."""
        assert self._changed is not None
        try:
            wait = min(float(request.query.get("wait", MAX_POLL)), MAX_POLL)
        except ValueError:
            raise guard.Refused(400, "bad_request", "'wait' must be a number") from None
        deadline = time.monotonic() + (wait if math.isfinite(wait) and wait > 0 else 0)
        async with self._changed:
            while True:
                answer = ready()
                if answer is not None:
                    # Its ready() may have changed the round (a join that formed
                    # it): the others re-check.  Only leavers notify, so waiters
                    # never wake each other in a loop.
                    self._changed.notify_all()
                    return answer
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    # -- groups ---------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        guard.authorize(request, self.options.token)

    async def _join(self, request: web.Request) -> web.Response:
        self._authorize(request)
        msg = await guard.read_message(request)
        group, incarnation = _identity(msg)
        step = _int(msg, "step")
        expected = _int(msg, "expected") if "expected" in msg else 0
        grace = msg.get("grace")
        if grace is not None and not (
            isinstance(grace, (int, float)) and math.isfinite(grace) and grace >= 0
        ):
            raise guard.Refused(400, "bad_request", "'grace' must be a number of seconds >= 0")
        info = msg.get("info") or {}
        if not isinstance(info, dict):
            raise guard.Refused(400, "bad_request", "'info' must be a map")
        if "layout" in msg:
            self._check_layout(msg["layout"], group)
        if self.state is None:
            if "layout" not in msg:
                raise guard.Refused(400, "bad_request", "the hub has no weights: send 'layout'")
            if self._initialising:
                raise guard.Refused(409, "not_ready", "another group is sending the first weights")
            return guard.reply(request, {"status": "init"})
        if msg.get("fresh") is True:
            # A new process must take the global weights before it joins a round.
            self.rounds.seen(group, incarnation, time.monotonic())
            return guard.reply(request, {"status": "heal", "step": self.rounds.step})

        def ready() -> dict[str, Any] | None:
            answer = self.rounds.join(
                group, incarnation, step, time.monotonic(), info, expected, grace
            )
            if answer.status is Joined.AHEAD:
                raise guard.Refused(
                    409,
                    "ahead",
                    f"{group} is at step {step}, the hub at {self.rounds.step}: the hub lost"
                    " committed steps (restarted from an older state file)",
                )
            if answer.status is Joined.HEAL:
                return {"status": "heal", "step": self.rounds.step}
            if answer.status is Joined.FORMED:
                assert answer.round is not None
                return self._formed(answer.round)
            return None

        answer = await self._poll(request, ready)
        return guard.reply(request, answer if answer is not None else {"status": "wait"})

    def _formed(self, r: Round) -> dict[str, Any]:
        assert self.state is not None and r.members is not None
        return {
            "status": "formed",
            "round": r.id,
            "step": r.step,
            "members": list(r.members),
            "peer_info": self.rounds.peer_info(r),
            "fragment": r.step % len(self.state.layout.fragments),
            "settings": self.state.settings.__dict__,
        }

    def _check_layout(self, value: Any, group: str) -> Layout:
        try:
            layout = Layout.from_json(value)
        except ValueError as e:
            raise guard.Refused(400, "bad_request", str(e)) from None
        if self.state is not None:
            mismatch = self.state.layout.first_mismatch(layout)
            if mismatch is not None:
                raise guard.Refused(
                    409, "model_mismatch", f"{group}'s model differs from the hub's: {mismatch}"
                )
        return layout

    async def _init(self, request: web.Request) -> web.Response:
        """The first group's weights (and outer lr, momentum) become the job's global state."""
        self._authorize(request)
        entries, meta = await _read_header(request)
        try:
            layout = self._check_layout(_json(meta["layout"]), "the group")
            settings = OuterSettings(
                float(meta["lr"]) if self.options.outer_lr is None else self.options.outer_lr,
                float(meta["momentum"])
                if self.options.outer_momentum is None
                else self.options.outer_momentum,
                int(meta.get("momentum_every", "1")),
            )
            if settings.momentum_every < 1:
                raise ValueError("momentum_every must be >= 1")
        except (KeyError, ValueError) as e:
            raise guard.Refused(400, "bad_request", f"init metadata: {e}") from None
        if [entry.name for entry in entries] != list(layout.names):
            raise guard.Refused(400, "bad_request", "init tensors must be the layout's, in order")
        if self.state is not None or self._initialising:
            return guard.reply(request, {"status": "exists"})  # another group was first
        # One upload at a time: groups that start together would otherwise
        # each stage a whole model here.
        self._initialising = True
        try:
            weights = [torch.empty(entry.shape, dtype=entry.dtype) for entry in entries]
            for entry, w in zip(entries, weights, strict=True):
                await _read_into(request, entry, wire.tensor_bytes(w))
            try:
                state = GlobalState(
                    layout, weights, settings, sync_point=int(meta.get("sync_point", 0))
                )
            except ValueError as e:
                raise guard.Refused(400, "bad_request", str(e)) from None
        finally:
            self._initialising = False
        self.state = state
        await self.save()
        _log.info("global weights initialised", parameters=len(layout.names))
        await self._wake()
        return guard.reply(request, {"status": "initialised"})

    async def _weights(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        state = self.state
        if state is None:
            raise guard.Refused(409, "not_ready", "the hub has no weights yet")
        fragment = request.query.get("fragment")
        try:
            index = None if fragment is None else int(fragment)
            tensors = state.named_weights(index)
        except (ValueError, IndexError):
            raise guard.Refused(400, "bad_request", f"no fragment {fragment!r}") from None
        assert self._weights_in_use is not None
        async with self._weights_in_use.reading():
            return await self._send_weights(request, state, tensors)

    async def _send_weights(
        self, request: web.Request, state: GlobalState, tensors: list[tuple[str, torch.Tensor]]
    ) -> web.StreamResponse:
        meta = {"step": str(state.step), "sync_point": str(state.sync_point)}
        head = wire.header(tensors, meta)
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream"},
        )
        response.content_length = len(head) + sum(t.numel() * t.element_size() for _, t in tensors)
        await response.prepare(request)
        await response.write(head)
        for _, t in tensors:
            data = wire.tensor_bytes(t)
            for start in range(0, len(data), _WRITE_BYTES):
                await response.write(data[start : start + _WRITE_BYTES])
        self._metrics.egress.inc(response.content_length)
        await response.write_eof()
        return response

    async def _submit(self, request: web.Request) -> web.Response:
        self._authorize(request)
        group, incarnation = _identity(dict(request.query))
        try:
            round_id = int(request.query["round"])
        except (KeyError, ValueError):
            raise guard.Refused(400, "bad_request", "'round' must be an integer") from None
        state = self.state
        if state is None:
            raise guard.Refused(409, "not_ready", "the hub has no weights yet")
        entries, meta = await _read_header(request)
        self.rounds.seen(group, incarnation, time.monotonic())
        r = self.rounds.round
        fragment = (r.step if r is not None else self.rounds.step) % len(state.layout.fragments)
        codec, weight = _expected(entries, meta, state.layout, fragment)
        decision = self.rounds.submit(group, round_id)
        if decision is Submission.DUPLICATE:
            return guard.reply(request, {"status": "duplicate"})
        if decision is Submission.STALE:
            raise guard.Refused(409, "stale_round", f"round {round_id} is not open to {group}")
        acc = self._accumulator(round_id, fragment)
        ok = False
        try:
            await self._accumulate(request, entries, codec, weight, acc)
            ok = True
        finally:
            complete = self.rounds.submitted(group, round_id, ok)
            if complete:
                self._spawn(self._commit(round_id))
            await self._wake()
        return guard.reply(request, {"status": "accepted"})

    def _accumulator(self, round_id: int, fragment: int) -> _Accumulator:
        assert self.state is not None
        if self._acc is None or self._acc.round_id != round_id:
            # A new round: the previous one committed or failed with nobody
            # still streaming into it (Rounds opens no round before that).
            sums = self._sums.get(fragment) or self.state.accumulators(fragment)
            for t in sums:
                t.zero_()
            self._sums[fragment] = sums
            self._acc = _Accumulator(round_id, fragment, sums)
        return self._acc

    async def _accumulate(
        self,
        request: web.Request,
        entries: list[wire.Entry],
        codec: str,
        weight: float | None,
        acc: _Accumulator,
    ) -> None:
        """Read the segments one at a time, check each, add it into the round's sums."""
        assert self._slots is not None
        if not entries:
            return  # a group that healed this step brings nothing
        acc.contributors += 1
        acc.weighted = acc.weighted or weight is not None
        decoder = get_codec(codec)
        for entry in entries:
            flat, _, seg = entry.name.partition(".")
            start, stop = wire.segments(acc.sums[int(flat)].numel())[int(seg)]
            slot = await self._slots.get()
            try:
                payload = torch.frombuffer(slot, dtype=torch.uint8, count=entry.nbytes)
                await _read_into(request, entry, memoryview(slot)[: entry.nbytes])
                self._metrics.ingest.inc(entry.nbytes)
                target = acc.sums[int(flat)][start:stop]
                if weight is None:
                    decoder.decode_add(payload, stop - start, target)
                else:
                    values = torch.zeros(stop - start, dtype=torch.float32)
                    decoder.decode_add(payload, stop - start, values)
                    target.add_(values, alpha=weight)
            finally:
                self._slots.put_nowait(slot)

    async def _commit(self, round_id: int) -> None:
        """Apply the complete round, save, and only then let its members learn it committed."""
        assert self._writing is not None and self.state is not None
        acc = self._acc
        r = self.rounds.round
        assert acc is not None and acc.round_id == round_id and r is not None
        state = self.state
        assert self._weights_in_use is not None
        async with self._writing:
            divisor = 1.0 if acc.weighted else float(max(acc.contributors, 1))
            if acc.contributors:
                async with self._weights_in_use.excluded():
                    await self._off_loop(
                        state.step_, acc.fragment, acc.sums, divisor, acc.contributors
                    )
            assert r.members is not None
            sync_points = [
                self.rounds.groups[g].info.get("sync_point")
                for g in r.members
                if g in self.rounds.groups
            ]
            state.step = self.rounds.step + 1
            if sync_points and sync_points[0] is not None:
                state.sync_point = int(sync_points[0])
            state.last_commit = Commit(round_id, state.step, r.members)
            if state.step - self._saved_step >= self.options.save_every:
                await self._save_locked()
            self.rounds.committed(round_id)
        self._acc = None
        self._metrics.commits.inc()
        self._metrics.step.set(state.step)
        _log.info(
            "committed", step=state.step, members=list(r.members), contributors=acc.contributors
        )
        await self._wake()

    async def _off_loop(self, work: Callable[..., None], *args: Any) -> None:
        """Run the model-sized work (outer step, save) on the hub's one worker thread.

        One thread, not asyncio's pool: each thread gets its own malloc arena,
        and the step's temporaries freed in several arenas stayed resident.
        """
        await asyncio.get_running_loop().run_in_executor(self._worker, work, *args)

    async def save(self) -> None:
        assert self._writing is not None
        async with self._writing:
            await self._save_locked()

    async def _save_locked(self) -> None:
        if self.state is None:
            return
        try:
            await self._off_loop(self.state.save, self.options.state_path)
        except OSError as e:
            # A commit that cannot be made durable must not be answered: stop,
            # and let a restarted hub redo the round from the last saved state.
            _log.error(
                "cannot save the hub state; stopping",
                path=str(self.options.state_path),
                error=str(e),
            )
            raise SystemExit(1) from None
        self._saved_step = self.state.step
        self._metrics.saves.inc()

    async def _outcome(self, request: web.Request) -> web.Response:
        self._authorize(request)
        msg = await guard.read_message(request)
        group, incarnation = _identity(msg)
        round_id = _int(msg, "round")
        self.rounds.seen(group, incarnation, time.monotonic())

        def ready() -> dict[str, Any] | None:
            outcome = self.rounds.outcome(group, round_id)
            if outcome is Outcome.PENDING:
                return None
            return {"outcome": outcome.value, "step": self.rounds.step}

        answer = await self._poll(request, ready)
        return guard.reply(request, answer or {"outcome": "pending", "step": self.rounds.step})

    async def _beat(self, request: web.Request) -> web.Response:
        self._authorize(request)
        group, incarnation = _identity(await guard.read_message(request))
        self.rounds.seen(group, incarnation, time.monotonic())
        await self._wake()
        return guard.reply(request, {"step": self.rounds.step})

    async def _leave(self, request: web.Request) -> web.Response:
        self._authorize(request)
        group, incarnation = _identity(await guard.read_message(request))
        self.rounds.leave(group, incarnation)
        await self._wake()
        return guard.reply(request, {"status": "left"})

    # -- the operator -----------------------------------------------------------------------

    async def _kick(self, request: web.Request) -> web.Response:
        self._authorize(request)
        msg = await guard.read_message(request)
        group = msg.get("group")
        if not isinstance(group, str) or not self.rounds.kick(group):
            raise guard.Refused(404, "unknown_group", f"no group {group!r} is known to the hub")
        _log.warning("group kicked", group=group)
        await self._wake()
        return guard.reply(request, {"status": "kicked", "group": group})

    async def _settings(self, request: web.Request) -> web.Response:
        """Live outer lr / momentum: they take effect from the next commit on."""
        self._authorize(request)
        msg = await guard.read_message(request)
        if self.state is None:
            raise guard.Refused(409, "not_ready", "the hub has no weights yet")
        old = self.state.settings
        try:
            lr = float(msg.get("lr", old.lr))
            momentum = float(msg.get("momentum", old.momentum))
        except (TypeError, ValueError):
            raise guard.Refused(400, "bad_request", "lr and momentum must be numbers") from None
        if not (math.isfinite(lr) and lr > 0 and 0 <= momentum < 1):
            raise guard.Refused(400, "bad_request", "need lr > 0 and 0 <= momentum < 1")
        self.state.settings = OuterSettings(lr, momentum, old.momentum_every)
        _log.info("outer settings changed", lr=lr, momentum=momentum)
        return guard.reply(request, {"lr": lr, "momentum": momentum})

    async def _save_request(self, request: web.Request) -> web.Response:
        self._authorize(request)
        await self.save()
        return guard.reply(request, {"status": "saved", "step": self.rounds.step})

    async def _shutdown(self, request: web.Request) -> web.Response:
        self._authorize(request)
        self.request_stop()
        return guard.reply(request, {"status": "stopping"})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """The /status document: the step, the round, each group's pace and staleness."""
        now = time.monotonic()
        r = self.rounds.round
        state = self.state
        groups = []
        for name, member in self.rounds.groups.items():
            info = member.info
            groups.append(
                {
                    "group": name,
                    "seen_s_ago": round(now - member.seen, 2),
                    "step": info.get("step"),
                    "staleness": self.rounds.step - int(info.get("step", self.rounds.step)),
                    "rate": info.get("rate"),
                    "submitted": member.submitted_steps,
                }
            )
        return {
            "kind": "hub",
            "step": self.rounds.step,
            "initialised": state is not None,
            "round": None
            if r is None
            else {
                "id": r.id,
                "step": r.step,
                "joined": list(r.joined),
                "members": list(r.members or ()),
                "submitted": sorted(r.submitted),
                "failed": r.failed,
            },
            "groups": groups,
            "rounds_failed": self.rounds.failures,
            "outer": None if state is None else state.settings.__dict__,
            "model_bytes": 0 if state is None else state.model_bytes,
            "saved_step": self._saved_step,
            "token_required": self.options.token is not None,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def _dashboard_page(self, request: web.Request) -> web.Response:
        return guard.page(self._dashboard)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        if self.state is not None:
            self._metrics.outer_lr.set(self.state.settings.lr)
            self._metrics.outer_momentum.set(self.state.settings.momentum)
        return web.Response(
            body=generate_latest(self._metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


class _Readers:
    """Downloads read the global weights together; an outer step updates them alone, in place."""

    def __init__(self) -> None:
        self._count = 0
        self._excluded = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._excluded)
            self._count += 1
        try:
            yield
        finally:
            async with self._changed:
                self._count -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def excluded(self) -> AsyncIterator[None]:
        """No download may start, and those running end, before the step goes on."""
        async with self._changed:
            self._excluded = True
            await self._changed.wait_for(lambda: self._count == 0)
        try:
            yield
        finally:
            async with self._changed:
                self._excluded = False
                self._changed.notify_all()


# -- reading requests ---------------------------------------------------------------------


def _identity(msg: dict[str, Any]) -> tuple[str, str]:
    group, incarnation = msg.get("group"), msg.get("incarnation")
    if not (isinstance(group, str) and 0 < len(group) <= 128):
        raise guard.Refused(400, "bad_request", "'group' must be a name of 1 to 128 characters")
    if not (isinstance(incarnation, str) and 0 < len(incarnation) <= 128):
        raise guard.Refused(400, "bad_request", "'incarnation' must be a string")
    return group, incarnation


def _int(msg: dict[str, Any], key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise guard.Refused(400, "bad_request", f"{key!r} must be an integer >= 0")
    return value


def _json(text: str) -> Any:
    import json

    return json.loads(text)


async def _read_header(request: web.Request) -> tuple[list[wire.Entry], dict[str, str]]:
    try:
        length = wire.header_length(await request.content.readexactly(8))
        return wire.parse_header(await request.content.readexactly(length))
    except wire.WireError as e:
        raise guard.Refused(400, "bad_request", str(e)) from None
    except asyncio.IncompleteReadError:
        raise guard.Refused(400, "bad_request", "the body ended inside its header") from None


async def _read_into(request: web.Request, entry: wire.Entry, view: memoryview) -> None:
    """The next tensor of the body, read straight into ``view`` and checked: no staging copy."""
    done = 0
    try:
        while done < entry.nbytes:
            data = await request.content.read(min(entry.nbytes - done, 1 << 20))
            if not data:
                raise guard.Refused(400, "bad_request", f"the body ended inside {entry.name!r}")
            view[done : done + len(data)] = data
            done += len(data)
    except (web.RequestPayloadError, ConnectionError) as e:
        raise guard.Refused(400, "bad_request", f"the body broke off: {e}") from None
    if wire.checksum(view) != entry.xxh3:
        raise guard.Refused(400, "bad_checksum", f"tensor {entry.name!r} is damaged")


def _expected(
    entries: list[wire.Entry], meta: dict[str, str], layout: Layout, fragment: int
) -> tuple[str, float | None]:
    """Check a submission's header against the fragment's flats; its codec and weight."""
    codec = meta.get("codec", "fp32")
    if codec not in CODECS:
        raise guard.Refused(400, "bad_request", f"unknown codec {codec!r}")
    try:
        weight = float(meta["weight"]) if "weight" in meta else None
    except ValueError:
        raise guard.Refused(400, "bad_request", "'weight' must be a number") from None
    if weight is not None and not math.isfinite(weight):
        raise guard.Refused(400, "bad_request", "'weight' must be finite")
    if not entries:
        return codec, weight
    decoder = get_codec(codec)
    expected = [
        (f"{f}.{j}", decoder.payload_bytes(stop - start))
        for f, numel in enumerate(layout.flat_numels(fragment))
        for j, (start, stop) in enumerate(wire.segments(numel))
    ]
    if [(e.name, e.nbytes) for e in entries] != expected:
        raise guard.Refused(
            400, "bad_request", f"the submission does not match fragment {fragment}'s layout"
        )
    return codec, weight
