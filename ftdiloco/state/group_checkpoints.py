"""A group's durable checkpoints: periodic, requested and on SIGTERM; resume at one step.

The file format and its checks live in :mod:`ftdiloco.state.checkpoint`; this
module decides *when* a group saves and *which* step it resumes, so that all
ranks of a group agree (through group rounds) and save or load the same
step.  The :class:`~ftdiloco.coordination.manager.Manager` owns one and exposes its
public methods.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from aiohttp import web

from ftdiloco.config import Config
from ftdiloco.state.checkpoint import (
    CheckpointError,
    check_layout,
    list_checkpoints,
    load_checkpoint,
    rank_directory,
    save_checkpoint,
    verify_checkpoint,
)
from ftdiloco.state.registry import StateRegistry
from ftwire import guard, protocol
from ftwire.history import GENESIS


class CheckpointRounds(Protocol):
    """The group rounds checkpoints need (ftdiloco.coordination.group.GroupChannel)."""

    def checkpoint(self, save: bool, stop: bool) -> tuple[bool, bool]: ...

    def resume(self, steps: list[int]) -> int | None: ...


class GroupCheckpoints:
    """When to save, what to resume; the ranks agree through group ``rounds``."""

    def __init__(
        self,
        config: Config,
        group_rank: int,
        group_size: int,
        states: StateRegistry,
        rounds: CheckpointRounds,
        log: Any,
    ) -> None:
        self.config = config
        self.group_rank = group_rank
        self.group_size = group_size
        self._states = states
        self._rounds = rounds
        self._log = log
        # A function returning JSON-able run metadata (a data loader's position,
        # say) stored with every checkpoint; after a resume, that metadata.
        self.metadata: Callable[[], dict[str, Any]] | None = None
        self.resumed_metadata: dict[str, Any] | None = None
        # Written by the server thread (requests) or a signal handler (stop) and
        # read by the training thread at a step boundary.  Requests are counted,
        # not flagged, so one that arrives while a save runs is not lost.
        self.requests = 0
        self._requests_done = 0
        self.stop_requested = False
        self._last_step: int | None = None

    def directory(self, root: str | os.PathLike[str] | None = None) -> Path | None:
        root = root if root is not None else self.config.checkpoint_dir
        if root is None:
            return None
        return rank_directory(root, self.config.replica_id, self.group_rank)

    def _required_directory(self, root: str | os.PathLike[str] | None) -> Path:
        directory = self.directory(root)
        if directory is None:
            raise ValueError("no checkpoint directory: pass one or set FTDILOCO_CHECKPOINT_DIR")
        return directory

    def save(
        self,
        committed: tuple[int, str],
        dirty: bool,
        root: str | os.PathLike[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Save the registered state at ``committed`` = (step, history)."""
        directory = self._required_directory(root)
        if dirty:
            raise RuntimeError(
                "this group's state is torn by a failed heal; there is nothing to save "
                "until a heal succeeds"
            )
        step, history = committed
        user = dict(self.metadata() if self.metadata is not None else {})
        user.update(metadata or {})
        path = save_checkpoint(
            directory,
            step,
            self._states.tensors(),
            {
                "group_rank": self.group_rank,
                "group_size": self.group_size,
                "history": history,
                "user": user,
            },
            replica_id=self.config.replica_id,
        )
        self._last_step = step
        return path

    def resume(self, root: str | os.PathLike[str] | None = None) -> tuple[int, str] | None:
        """Load the newest checkpoint every rank holds intact; its (step, history), or None.

        The ranks agree (a group round) on the step, so a group never resumes
        at mixed steps; damaged checkpoints are skipped with a warning.  The
        states' load callbacks receive the tensors.  Raises CheckpointError if
        the checkpoint does not fit the registered state (another model or
        optimizer).  If it holds tensors no state takes, that is found only
        after loading, so the state may be partly overwritten when it raises.
        """
        directory = self._required_directory(root)
        intact: dict[int, Path] = {}
        for path in list_checkpoints(directory):
            try:
                intact[verify_checkpoint(path).step] = path
            except CheckpointError as e:
                self._log.warning("skipping a damaged checkpoint", path=str(path), error=str(e))
        step = self._rounds.resume(sorted(intact))
        if step is None:
            self._log.info("no checkpoint to resume from", directory=str(directory))
            return None
        started = time.perf_counter()
        local = self._states.tensors()

        def destination(
            layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        ) -> dict[str, torch.Tensor]:
            out = dict(local)
            for name, dtype, shape in layout:
                if name not in out:  # e.g. optimizer state, made at the first step
                    out[name] = torch.empty(shape, dtype=dtype)
            return out

        step, tensors, metadata = load_checkpoint(intact[step], destination)
        self._states.load(tensors)
        # Tensors that no state took (another model's extra parameters) show
        # up only now, as names the state no longer has.
        check_layout(
            [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], self._states.tensors()
        )
        history = metadata.get("history")
        self._last_step = step
        user = metadata.get("user")
        self.resumed_metadata = user if isinstance(user, dict) else {}
        self._log.info(
            "resumed from checkpoint",
            path=str(intact[step]),
            step=step,
            seconds=round(time.perf_counter() - started, 3),
        )
        return step, history if isinstance(history, str) else GENESIS

    def maybe_save(self, committed: tuple[int, str], dirty: bool) -> Path | None:
        """Save if due (periodic, requested or SIGTERM); after a SIGTERM, exit.

        A request reaches one rank only, so the ranks first agree in a group
        round, and all of them save the same step.  After a SIGTERM it saves
        and then raises ``SystemExit`` (0, or 1 if the save failed), which
        leaves through the caller's ``with`` blocks so the lighthouse sees the
        group go at once.  A failed periodic save is logged, not raised: the
        peers still hold the run, and stopping would not bring the disk back.
        """
        if self.directory() is None:
            return None
        requests = self.requests
        asked = requests > self._requests_done
        try:
            asked, stop = self._rounds.checkpoint(asked, self.stop_requested)
        except Exception as e:
            self._log.warning("checkpoint round failed", error=repr(e))
            asked, stop = False, self.stop_requested
        step = committed[0]
        every = self.config.checkpoint_every
        due = every is not None and step > 0 and step % every == 0 and step != self._last_step
        path = None
        if due or asked or stop:
            try:
                path = self.save(committed, dirty)
                self._requests_done = requests
            except (OSError, RuntimeError, ValueError) as e:
                self._log.error("checkpoint failed", step=step, error=repr(e))
        if stop:
            self._log.warning("stopping on SIGTERM", step=step, checkpoint=str(path))
            raise SystemExit(0 if path is not None else 1)
        return path

    def install_sigterm_handler(self, closed: Callable[[], bool]) -> None:
        """SIGTERM sets a flag; the next step boundary saves and exits.

        Schedulers send SIGTERM some time before they kill a pre-empted job;
        this keeps the progress since the last periodic checkpoint.  The
        handler only sets a flag -- the training thread saves at the next step
        boundary -- since the state must not be read while training changes
        it.  A second SIGTERM, or one after the manager closed (``closed``),
        goes to the handler that was there before (by default the process ends
        at once).  Call from the main thread, with a checkpoint directory.
        """
        if self.directory() is None:
            raise ValueError("SIGTERM saves a checkpoint: set FTDILOCO_CHECKPOINT_DIR first")
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: object) -> None:
            if self.stop_requested or closed():
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self.stop_requested = True

        signal.signal(signal.SIGTERM, on_sigterm)

    # -- the operator's request (rank 0's server) -------------------------------------------

    def add_routes(self, app: web.Application, step: Callable[[], int]) -> None:
        """``POST /v1/checkpoint``: save at the next step boundary (202, with the current step).

        Only flags the request: the training thread saves, since the state
        must not be read while training changes it.
        """

        async def route(request: web.Request) -> web.Response:
            guard.authorize(request, self.config.token)
            if self.directory() is None:
                raise guard.Refused(409, "no_checkpoint_dir", "FTDILOCO_CHECKPOINT_DIR is not set")
            self.requests += 1
            self._log.info("checkpoint requested", peer=request.remote, step=step())
            body = protocol.pack({"ok": True, "step": step()})
            return web.Response(status=202, body=body, content_type=protocol.CONTENT_TYPE)

        app.router.add_post("/v1/checkpoint", route)

    # -- the group rounds (decided on rank 0) ---------------------------------------------

    async def decide_checkpoint(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return {
            "save": any(v.get("save") is True for v in values.values()),
            "stop": any(v.get("stop") is True for v in values.values()),
        }

    async def decide_resume(self, values: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """The newest step every rank holds intact; None if there is none.

        Each rank's list of steps was checked when it contributed (ftdiloco.coordination.group).
        """
        common: set[int] | None = None
        for rank in sorted(values):
            steps = set(values[rank]["steps"])
            common = steps if common is None else common & steps
        newest = {rank: max(v["steps"], default=None) for rank, v in values.items()}
        step = max(common) if common else None
        if len(set(newest.values())) > 1:
            self._log.warning("group ranks hold different checkpoints", newest=newest, using=step)
        return {"step": step}
