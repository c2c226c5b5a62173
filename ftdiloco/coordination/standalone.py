"""One group, no lighthouse: a manager for debugging a training script before a real job.

With ``FTDILOCO_LIGHTHOUSE=none`` (said explicitly; an unset variable is
still an error) a script can pass :class:`StandaloneManager` where it would
pass :class:`ftdiloco.coordination.manager.Manager`: ``DiLoCo`` and ``LocalSGD`` then run
their outer step as usual, with this group as the only participant.  Every
outer step commits, the exchange returns the group's own pseudo-gradient
(the average over one participant), and nothing is sent anywhere -- the
"callback is a no-op" mode, so the script's loop, optimizers, data and
logging can be checked on one machine without any other process.

DyLU and asynchronous DiLoCo run too: the group's join info comes back as
its own ``plan.peer_info``, so alone it is the fastest group (H is
``sync_every``) and its weight in the outer step is 1 (0 in the first, empty
one); the grace has no straggler to cut short.

What it does not do: no fault tolerance (no peers to heal from, no
rollback), no checkpoints (``maybe_checkpoint`` never saves), and no
compression round trip (the pseudo-gradient is used as is).  Each rank of
a multi-rank group holds its own StandaloneManager; they agree because
every step commits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ftdiloco.config import Config, ConfigError
from ftdiloco.state.registry import StateRegistry

if TYPE_CHECKING:
    import torch

    from ftdiloco.coordination.allreduce import Work
    from ftdiloco.coordination.plan import QuorumPlan
    from ftdiloco.training.compression import Codec
    from ftdiloco.training.outer_loop import SyncReport

__all__ = ["StandaloneManager"]

STANDALONE_NOTE = (
    "standalone: FTDILOCO_LIGHTHOUSE=none, training as one group without a lighthouse "
    "(no peers, no fault tolerance)"
)


class StandaloneManager:
    """Satisfies :class:`ftdiloco.training.outer_loop.OuterManager` for a group that is alone."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env()
        if not self.config.standalone:
            raise ConfigError(
                "FTDILOCO_LIGHTHOUSE is set to a lighthouse: use ftdiloco.Manager, or set "
                "FTDILOCO_LIGHTHOUSE=none to train standalone"
            )
        self._step = 0
        self._plan: QuorumPlan | None = None
        self._states = StateRegistry()
        self.last_sync: SyncReport | None = None
        self.last_loss: float | None = None
        self._info: dict[str, int | float | str | bool] = {}

    # -- what DiLoCo uses ---------------------------------------------------------------

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
        self._states.register(name, save, load)

    def start_quorum(self) -> QuorumPlan | None:
        from ftdiloco.coordination.plan import QuorumPlan

        me = self.config.replica_id
        self._plan = QuorumPlan(
            quorum_id=0,
            replica_id=me,
            replica_rank=0,
            replica_world_size=1,
            participants=(me,),
            max_step=self._step,
            history="",
            up_to_date=(me,),
            recovering=(),
            heal=False,
            donor=None,
            store_address="",
            store_prefix="",
            peer_info={me: dict(self._info)},
        )
        return self._plan

    def set_join_info(self, info: Mapping[str, int | float | str | bool]) -> None:
        """What the next join would tell the peers: alone, it comes back as ``plan.peer_info``."""
        self._info = dict(info)

    def set_join_grace(self, seconds: float | None) -> None:
        """Checked as the Manager checks it; alone there is no straggler to wait for."""
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"join grace must be a finite number of seconds >= 0, got {seconds}")

    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float | None = None,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work:
        """The average over one participant: the tensors, unchanged; nothing is sent.

        With a ``weight`` the result is the weighted sum over the participants,
        as the Manager's: here ``tensors * weight`` (1, or 0 when the group
        brings no work yet).
        """
        from ftdiloco.coordination.allreduce import Work

        if weight is not None and weight != 1.0:
            for t in tensors:
                t.mul_(weight)
        work = Work.done(True)
        work.nbytes = 0
        return work

    def should_commit(self) -> bool:
        self._step += 1
        return True

    def maybe_checkpoint(self) -> Path | None:
        return None

    def report_sync(self, report: SyncReport) -> None:
        self.last_sync = report

    def report_loss(self, loss: float) -> None:
        self.last_loss = loss

    # -- a context manager, like Manager ------------------------------------------------

    def __enter__(self) -> StandaloneManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
