"""A group's side of the hub: :class:`HubManager`, DiLoCo's manager when ``FTDILOCO_TOPOLOGY=hub``.

It satisfies :class:`ftdiloco.training.outer_loop.OuterManager` (and
``PacedManager``, for DyLU), so the training script is the same as with
a lighthouse: only the manager differs, chosen by configuration.

- ``start_quorum`` joins the hub's round for the group's committed step.  A
  process's first join, and any join behind the hub, first *heals*: it
  downloads the global weights into DiLoCo's backups and runs on from them
  (the first group of a new job uploads its own weights instead, and heals
  from whatever the hub then holds, so every group starts from one state).
- ``allreduce`` streams this group's pseudo-gradient, encoded with the job's
  codec, to the hub (nothing, after a heal: that group brings no work).
- ``should_commit`` asks the hub whether the round committed; if so it
  downloads the new global weights of the round's fragment into the backups,
  which DiLoCo then takes instead of running its own outer optimizer.  Any
  failure is a rollback; a failure after the backups were touched makes the
  next join heal, so a group never trains on from a torn state.

Every request retries a lost hub until the group's deadline for it (the hub
may be restarting); the round of a restarted hub answers ``failed`` unless
it was saved committed, so a retry never applies a step twice.  One rank
per group: ranks of one group cannot share a hub round yet.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import math
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
import torch
from tenacity import RetryError, Retrying, retry_if_exception_type, wait_fixed

from ftdiloco.config import Config, ConfigError
from ftdiloco.coordination.allreduce import Work
from ftdiloco.coordination.plan import QuorumPlan
from ftdiloco.hub import wire
from ftdiloco.state.dtypes import SAFETENSORS_CODES
from ftdiloco.training.compression import Codec
from ftwire import guard

if TYPE_CHECKING:
    from ftdiloco.training.outer_loop import GlobalWeights, SyncReport

__all__ = ["HubError", "HubManager"]

_log = structlog.get_logger(__name__)

# Seconds between attempts to reach a hub that does not answer.
_RETRY = 0.2
_POLL = 10.0


class HubError(RuntimeError):
    """The hub refused this group for good (another model, a hub that lost steps, a bad token)."""


class _Unreachable(Exception):
    """No answer: the hub is down, restarting, or the tunnel is."""


class HubManager:
    """One group's membership in the hub's rounds (single-rank groups)."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        if self.config.hub is None:  # Config checks the rest (one rank, sync mode)
            raise ConfigError("FTDILOCO_TOPOLOGY=hub needs FTDILOCO_HUB (the hub's URL)")
        url = urllib.parse.urlsplit(self.config.hub)
        self._host, self._port = url.hostname or "", url.port or 80
        self._headers = {"Accept": guard.JSON}
        if self.config.token is not None:
            self._headers.update(guard.authorization(self.config.token))
        self.group = self.config.replica_id
        self.incarnation = f"{time.time_ns():x}-{secrets.token_hex(4)}"
        self._step = 0
        self._plan: QuorumPlan | None = None
        self._weights: GlobalWeights | None = None
        self._round: int | None = None
        self._fragment = 0
        self._info: dict[str, int | float | str | bool] = {}
        self._grace: float | None = None
        self._synced = False  # holds the hub's weights of self._step
        self._submitted = False
        self.last_sync: SyncReport | None = None
        self._stop = threading.Event()
        # One kept-alive connection per thread (training, sync, heartbeat).
        self._local = threading.local()
        self._beats = threading.Thread(target=self._beat, name="ftdiloco-hub-beat", daemon=True)
        self._beats.start()

    # -- the OuterManager protocol ------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def plan(self) -> QuorumPlan | None:
        return self._plan

    def register_state(
        self,
        name: str,
        save: Callable[[], dict[str, torch.Tensor]],
        load: Callable[[dict[str, torch.Tensor]], None],
    ) -> None:
        """Accepted and unused: the hub heals the global weights only (see bind_global_weights).

        A healed group keeps its own inner optimizer state; the outer
        optimizer's lives on the hub.
        """

    def bind_global_weights(self, weights: GlobalWeights) -> None:
        """DiLoCo hands over its backups: heals and commits write the hub's weights there."""
        self._weights = weights

    def set_join_info(self, info: Mapping[str, int | float | str | bool]) -> None:
        self._info = dict(info)

    def set_join_grace(self, seconds: float | None) -> None:
        """Async mode: the hub forms a round without stragglers after this long."""
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"join grace must be a finite number of seconds >= 0, got {seconds}")
        self._grace = seconds

    def start_quorum(self) -> QuorumPlan | None:
        weights = self._bound()
        deadline = time.monotonic() + self.config.quorum_timeout
        healed = False
        while True:
            join = {
                "group": self.group,
                "incarnation": self.incarnation,
                "step": self._step,
                "expected": self.config.num_replica_groups or 0,
                # Not yet holding the hub's weights (a new process): heal before joining.
                "fresh": not self._synced,
                "grace": self._grace,
                # "healed": every member must know it alike to weigh the round
                # (plan.recovering); "step": the one the pseudo-gradient was
                # taken at, as DiLoCo told it (async: its staleness).
                "info": {
                    "step": self._step,
                    **self._info,
                    "sync_point": int(weights.sync_point),
                    "healed": healed,
                },
                "layout": _layout(weights),
            }
            answer = self._retry(
                deadline, functools.partial(self._call, "POST", f"/v1/join?wait={_POLL}", join)
            )
            status = answer["status"]
            if status == "init":
                self._upload_initial(weights, deadline)
            elif status == "heal":
                self._heal(weights, deadline)
                healed = True
            if status == "formed":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no round of the hub {self.config.hub} formed in"
                    f" {self.config.quorum_timeout:g}s (FTDILOCO_QUORUM_TIMEOUT)"
                )
        members = tuple(answer["members"])
        peer_info = answer.get("peer_info", {})
        self._round = int(answer["round"])
        self._fragment = int(answer["fragment"])
        self._submitted = False
        self._plan = QuorumPlan(
            quorum_id=self._round,
            replica_id=self.group,
            replica_rank=members.index(self.group),
            replica_world_size=len(members),
            participants=members,
            max_step=int(answer["step"]),
            history="",
            up_to_date=members,
            recovering=tuple(sorted(m for m in members if peer_info.get(m, {}).get("healed"))),
            heal=healed,
            donor=None,
            store_address="",
            store_prefix="",
            peer_info=peer_info,
        )
        return self._plan

    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float | None = None,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work:
        """Send this group's pseudo-gradient (``tensors``: the fragment's flats) to the hub.

        The result is not written back: after a commit the hub's new global
        weights replace the backups (should_commit), so the average is never
        needed here.
        """
        assert self._plan is not None and self._round is not None
        # DiLoCo's weight says it (a healed group's stale work may count, in async
        # mode); without one, a group that healed this round brings nothing.
        empty = weight == 0.0 if weight is not None else self._plan.heal
        meta = {"codec": codec.name if codec is not None else "fp32"}
        if weight is not None:
            meta["weight"] = repr(weight)
        parts: list[tuple[str, torch.Tensor]] = []
        if not empty:
            parts = _encode(tensors, codec, residuals)
        query = urllib.parse.urlencode(
            {"group": self.group, "incarnation": self.incarnation, "round": self._round}
        )
        head = wire.header(parts, meta)
        sent = len(head) + sum(t.numel() for _, t in parts)
        try:
            answer = self._call(
                "PUT",
                f"/v1/submit?{query}",
                body=[memoryview(head), *(wire.tensor_bytes(t) for _, t in parts)],
                length=sent,
            )
            self._submitted = answer.get("status") in ("accepted", "duplicate")
        except (_Unreachable, HubError) as e:
            _log.warning("submission failed; the round will roll back", error=str(e))
        work = Work.done(self._submitted)
        work.nbytes = sent
        return work

    def should_commit(self) -> bool:
        """Did the round commit?  If so, take its new global weights into the backups."""
        weights = self._bound()
        round_id, self._round = self._round, None
        if round_id is None or not self._submitted:
            return False
        deadline = time.monotonic() + self.config.collective_timeout
        while True:
            answer = self._retry(
                deadline,
                lambda: self._call(
                    "POST",
                    f"/v1/outcome?wait={_POLL}",
                    {"group": self.group, "incarnation": self.incarnation, "round": round_id},
                ),
            )
            if answer["outcome"] != "pending":
                break
            if time.monotonic() > deadline:
                return False  # the hub fails the round at its own deadline
        if answer["outcome"] != "committed":
            return False
        self._synced = False  # until the new weights are in
        try:
            step, _ = self._download(weights, self._fragment, deadline)
        except (_Unreachable, HubError, TimeoutError) as e:
            _log.warning(
                "committed, but the new weights did not arrive; healing next", error=str(e)
            )
            return False
        self._step = step
        self._synced = True
        return True

    def maybe_checkpoint(self) -> Path | None:
        """The hub saves the global state; a group has nothing of its own to keep."""
        return None

    def report_sync(self, report: SyncReport) -> None:
        self.last_sync = report

    # -- healing and the first weights -----------------------------------------------------

    def _heal(self, weights: GlobalWeights, deadline: float) -> None:
        """Take the hub's global weights and run on from them (a first join, or behind)."""
        step, sync_point = self._download(weights, None, deadline)
        weights.adopt(sync_point)
        self._step = step
        self._synced = True
        _log.info("healed from the hub", step=step)

    def _download(
        self, weights: GlobalWeights, fragment: int | None, deadline: float
    ) -> tuple[int, int]:
        """Read the hub's weights (of one fragment, or all) straight into the backups."""
        by_name = dict(zip(weights.names, weights.backup, strict=True))

        def fetch() -> tuple[int, int]:
            query = "" if fragment is None else f"?fragment={fragment}"
            with self._open("GET", f"/v1/weights{query}") as response:
                entries, meta = wire.read_header(_exactly(response))
                for e in entries:
                    target = by_name.get(e.name)
                    if target is None or tuple(target.shape) != e.shape or target.dtype != e.dtype:
                        raise HubError(f"the hub sent {e.name!r}, which this model lacks")
                    staged = target if target.is_contiguous() else torch.empty_like(target)
                    view = wire.tensor_bytes(staged)
                    if response.readinto(view) != e.nbytes or wire.checksum(view) != e.xxh3:
                        raise _Unreachable(f"tensor {e.name!r} arrived damaged")
                    if staged is not target:
                        target.copy_(staged)
                return int(meta["step"]), int(meta["sync_point"])

        step, sync_point = self._retry(deadline, fetch)
        return int(step), int(sync_point)

    def _upload_initial(self, weights: GlobalWeights, deadline: float) -> None:
        """A new job: this group's weights (and outer lr, momentum) become the global ones."""
        tensors = list(zip(weights.names, weights.backup, strict=True))
        meta = {
            "layout": json.dumps(_layout(weights)),
            "lr": repr(weights.outer_lr),
            "momentum": repr(weights.outer_momentum),
            "momentum_every": str(weights.momentum_every),
            "sync_point": str(int(weights.sync_point)),
        }
        head = wire.header(tensors, meta)
        body = [memoryview(head), *(wire.tensor_bytes(t) for _, t in tensors)]
        length = sum(len(b) for b in body)
        self._retry(deadline, lambda: self._call("PUT", "/v1/init", body=body, length=length))

    # -- plumbing -----------------------------------------------------------------------------

    def _bound(self) -> GlobalWeights:
        if self._weights is None:
            raise RuntimeError("HubManager needs DiLoCo (it binds the global weights); got none")
        return self._weights

    def _beat(self) -> None:
        """Liveness between rounds: a group that trains for minutes is still in the job."""
        while not self._stop.wait(self.config.heartbeat_interval):
            # A hub that is restarting misses some beats; the next beat or join finds it.
            with contextlib.suppress(_Unreachable, HubError):
                self._call(
                    "POST", "/v1/beat", {"group": self.group, "incarnation": self.incarnation}
                )

    def _retry(self, deadline: float, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, tried again every _RETRY s while the hub is unreachable (restarting)."""
        retrying = Retrying(
            retry=retry_if_exception_type(_Unreachable),
            wait=wait_fixed(_RETRY),
            stop=lambda _: time.monotonic() + _RETRY > deadline,
        )
        try:
            return retrying(attempt)
        except RetryError as e:
            cause = e.last_attempt.exception()
            raise TimeoutError(f"the hub {self.config.hub} did not answer: {cause}") from None

    def _open(
        self,
        method: str,
        path: str,
        body: Sequence[memoryview] | bytes | None = None,
        length: int | None = None,
    ) -> _Response:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        reused = conn is not None
        if conn is None:
            timeout = max(self.config.timeout, _POLL + 5)
            conn = self._local.conn = http.client.HTTPConnection(
                self._host, self._port, timeout=timeout
            )
        headers = dict(self._headers)
        try:
            if isinstance(body, bytes):
                headers["Content-Type"] = guard.JSON
                conn.request(method, path, body=body, headers=headers)
            else:
                conn.putrequest(method, path)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(length or 0))
                conn.endheaders()
                for part in body or ():
                    conn.send(part)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._drop(conn)
            if reused:  # a kept-alive connection the hub (or a relay) closed: once more, anew
                return self._open(method, path, body, length)
            raise _Unreachable(f"{type(e).__name__}: {e}") from None
        if response.status >= 400:
            text = response.read()
            self._drop(conn)
            try:
                message = json.loads(text).get("message", "")
            except ValueError:
                message = text[:200].decode(errors="replace")
            if response.status >= 500 or (response.status == 409 and b"not_ready" in text):
                raise _Unreachable(f"HTTP {response.status}: {message}")
            if response.status == 409 and b"stale_round" in text:
                raise _Unreachable(message)
            raise HubError(f"the hub refused {method} {path.split('?')[0]}: {message}")
        return _Response(conn, response, self._drop)

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        """Close a connection that cannot carry another request; the next one opens anew."""
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def _call(
        self,
        method: str,
        path: str,
        message: dict[str, Any] | None = None,
        *,
        body: Sequence[memoryview] | None = None,
        length: int | None = None,
    ) -> dict[str, Any]:
        payload = json.dumps(message).encode() if message is not None else None
        with self._open(method, path, payload if payload is not None else body, length) as r:
            try:
                answer: dict[str, Any] = json.loads(r.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise _Unreachable(f"no complete answer: {e}") from None
        return answer

    # -- a context manager, like Manager ---------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(_Unreachable, HubError):
            self._call("POST", "/v1/leave", {"group": self.group, "incarnation": self.incarnation})

    def __enter__(self) -> HubManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Response:
    """A response on a kept-alive connection, which is dropped unless the body was read whole."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        drop: Callable[[http.client.HTTPConnection], None],
    ) -> None:
        self._conn = conn
        self._response = response
        self._drop = drop

    def read(self, n: int | None = None) -> bytes:
        return self._response.read(n)

    def readinto(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            n = self._response.readinto(view[done:])
            if not n:
                break
            done += n
        return done

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None or not self._response.isclosed():
            self._drop(self._conn)


def _exactly(response: _Response) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        data = response.read(n)
        if len(data) != n:
            raise _Unreachable("the hub's answer ended early")
        return data

    return read


def _layout(weights: GlobalWeights) -> dict[str, Any]:
    return {
        "names": list(weights.names),
        "dtypes": [SAFETENSORS_CODES[t.dtype] for t in weights.backup],
        "shapes": [list(t.shape) for t in weights.backup],
        "fragments": [[list(flat) for flat in fragment] for fragment in weights.fragments],
    }


def _encode(
    flats: Sequence[torch.Tensor],
    codec: Codec | None,
    residuals: Sequence[torch.Tensor | None] | None,
) -> list[tuple[str, torch.Tensor]]:
    """Each flat in segments (wire.SEGMENT values), each encoded on its own: ``"<flat>.<seg>"``."""
    parts = []
    for f, flat in enumerate(flats):
        source = flat.detach().reshape(-1).cpu()
        residual = residuals[f] if residuals is not None else None
        for j, (start, stop) in enumerate(wire.segments(source.numel())):
            piece = source[start:stop]
            if codec is None:
                payload = piece.float().contiguous().view(torch.uint8)
            else:
                payload = codec.encode(
                    piece, residual=None if residual is None else residual[start:stop]
                )
            parts.append((f"{f}.{j}", payload))
    return parts
