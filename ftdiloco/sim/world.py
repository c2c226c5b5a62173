"""The in-process stand-ins for the lighthouse, the process group and the manager.

A simulated worker runs the library's own :class:`~ftdiloco.training.diloco.DiLoCo` (or
:class:`~ftdiloco.training.local_sgd.LocalSGD`) on its own thread, with a :class:`SimManager`
where a real group has a :class:`~ftdiloco.coordination.manager.Manager`.  What differs from
a real job is only the transport:

- the quorum is a barrier over the workers the simulator holds alive, turned
  into a plan by the real :func:`~ftdiloco.coordination.plan.plan_quorum` (so init sync,
  who heals and from whom follow the real rules);
- a heal copies the donor's registered state in memory;
- collectives (:class:`InProcessGroup`) sum in rank order in fp32, so every
  worker ends with bitwise identical averages (with 2 workers also bitwise
  what gloo computes: ``a + b`` is commutative);
- compressed exchanges go through :func:`~ftdiloco.training.compression.compressed_allreduce`
  itself, with this group's allgather.

Workers take turns: a worker holds :attr:`SimWorld.lock` while it computes and
gives it up only while it waits at a barrier, so one worker runs at a time
(no oversubscribed cores) and the results never depend on thread timing.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from ftdiloco.coordination.allreduce import Work
from ftdiloco.coordination.plan import QuorumPlan, plan_quorum
from ftdiloco.training.compression import Codec, compressed_allreduce
from ftwire.messages import Member, Quorum

if TYPE_CHECKING:
    from ftdiloco.training.outer_loop import SyncReport

log = structlog.get_logger("ftdiloco.sim")

StateSave = Callable[[], dict[str, torch.Tensor]]
StateLoad = Callable[[dict[str, torch.Tensor]], None]


class SimDeadlock(RuntimeError):
    """A barrier waited longer than the world's timeout: a simulator bug, not a fault."""


class _Done:
    """A finished collective's handle (what ``Work`` of a real backend offers)."""

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait

    def wait(self) -> bool:
        self._wait()
        return True


@dataclass
class _Collective:
    kind: str
    inputs: dict[int, Any] = field(default_factory=dict)
    done: bool = False


class InProcessGroup:
    """The collectives of one quorum, for one rank: matched across ranks by call order."""

    def __init__(self, world: SimWorld, key: int, rank: int, size: int) -> None:
        self._world = world
        self._key = key
        self.rank = rank
        self.size = size
        self._calls = 0

    def allreduce(self, tensors: list[torch.Tensor]) -> _Done:
        """Sum (in place, on every rank) in rank order, in fp32 when the input is fp32."""
        return self._arrive("allreduce", tensors)

    def allgather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor]
    ) -> _Done:
        return self._arrive("allgather", (output_tensors, input_tensors))

    def _arrive(self, kind: str, value: Any) -> _Done:
        seq = self._calls
        self._calls += 1
        collective = self._world._join_collective(self._key, seq, kind, self.rank, value, self.size)
        return _Done(lambda: self._world._await(lambda: collective.done, f"{kind} #{seq}"))


def _finish(collective: _Collective, size: int) -> None:
    """Run by the last rank to arrive, holding the world's lock."""
    ranks = range(size)
    with torch.no_grad():
        if collective.kind == "allreduce":
            lists = [collective.inputs[r] for r in ranks]
            for i in range(len(lists[0])):
                total = lists[0][i].detach().clone()
                for r in ranks[1:]:
                    total += lists[r][i].to(total.device)
                for r in ranks:
                    lists[r][i].copy_(total)
        else:  # allgather([[out_0 .. out_n-1]], [mine]): out_i <- rank i's input
            for r in ranks:
                outputs, _ = collective.inputs[r]
                for i, out in enumerate(outputs[0]):
                    out.copy_(collective.inputs[i][1][0])
    collective.done = True


class SimWorld:
    """The simulated job's shared state: who is alive, quorums, collectives, doomed steps."""

    def __init__(self, *, init_sync: bool = True, timeout: float = 600.0) -> None:
        self.lock = threading.Condition(threading.Lock())
        self.init_sync = init_sync
        self.timeout = timeout
        self.alive: set[str] = set()
        self._managers: dict[str, SimManager] = {}
        self._joined: dict[str, SimManager] = {}
        self._generation = 0
        self._formed: dict[int, tuple[Quorum, int]] = {}
        self._key = 0  # one per quorum formed: names its collectives and its fate
        self._quorum_id = -1
        self._previous: tuple[str, ...] = ()
        self._collectives: dict[tuple[int, int], _Collective] = {}
        self.failed: set[int] = set()
        self._doomed_workers: set[str] = set()
        self.quorums: list[tuple[int, tuple[str, ...]]] = []  # (key, participants), in order

    # -- membership (called by the simulator between inner steps, lock held) ------------

    def add(self, manager: SimManager) -> None:
        self._managers[manager.replica_id] = manager
        self.alive.add(manager.replica_id)

    def remove(self, replica_id: str) -> None:
        """A worker died: later quorums do not wait for it."""
        self.alive.discard(replica_id)
        self._joined.pop(replica_id, None)
        self._maybe_form()

    def fail_quorum(self, key: int) -> None:
        """The outer step of quorum ``key`` fails on every participant that has not voted."""
        self.failed.add(key)

    def fail_next_quorum(self, replica_id: str) -> None:
        """The next quorum ``replica_id`` joins fails (it dies during that exchange)."""
        self._doomed_workers.add(replica_id)

    # -- quorum -------------------------------------------------------------------------

    def join(self, manager: SimManager) -> tuple[Quorum, int]:
        """Wait until every live worker has joined; the quorum and its key."""
        generation = self._generation
        self._joined[manager.replica_id] = manager
        self._maybe_form()
        self._await(lambda: self._generation > generation, "quorum")
        return self._formed[generation]

    def _maybe_form(self) -> None:
        if not self._joined or not self.alive <= set(self._joined):
            return
        ids = tuple(sorted(self._joined))
        members = tuple(
            Member(
                replica_id=rid,
                step=self._joined[rid].step,
                commit_failures=self._joined[rid].commit_failures,
            )
            for rid in ids
        )
        if ids != self._previous or any(m.commit_failures for m in members):
            self._quorum_id += 1
        self._previous = ids
        key = self._key
        self._key += 1
        if self._doomed_workers & set(ids):
            self._doomed_workers -= set(ids)
            self.failed.add(key)
        self._formed[self._generation] = (
            Quorum(quorum_id=self._quorum_id, members=members, created=0.0),
            key,
        )
        self.quorums.append((key, ids))
        self._joined = {}
        self._generation += 1
        self.lock.notify_all()

    # -- collectives ----------------------------------------------------------------------

    def _join_collective(
        self, key: int, seq: int, kind: str, rank: int, value: Any, size: int
    ) -> _Collective:
        collective = self._collectives.setdefault((key, seq), _Collective(kind))
        if collective.kind != kind:
            raise SimDeadlock(f"rank {rank} called {kind} where others called {collective.kind}")
        collective.inputs[rank] = value
        if len(collective.inputs) == size:
            _finish(collective, size)
            del self._collectives[(key, seq)]
            self.lock.notify_all()
        return collective

    def _await(self, ready: Callable[[], bool], what: str) -> None:
        if not self.lock.wait_for(ready, timeout=self.timeout):
            raise SimDeadlock(f"simulated {what} still waiting after {self.timeout} s")


class SimManager:
    """One simulated replica group's manager: the interface DiLoCo and LocalSGD use.

    Mirrors :class:`~ftdiloco.coordination.manager.Manager`: ``start_quorum`` plans with the
    real rules and heals from the donor they name; ``allreduce`` zeros a
    healing group's tensors and divides by the groups that contribute;
    ``should_commit`` steps on success.  Failures come from the simulator
    (:meth:`SimWorld.fail_quorum`), not from sockets.
    """

    def __init__(self, world: SimWorld, replica_id: str, *, min_replicas: int = 1) -> None:
        self.world = world
        self.replica_id = replica_id
        self.min_replicas = min_replicas
        self._step = 0
        self.commit_failures = 0
        self._plan: QuorumPlan | None = None
        self._key = -1
        self.voted_key = -1  # the quorum of the last vote (a new one may start right after)
        self._pg: InProcessGroup | None = None
        self._states: dict[str, tuple[StateSave, StateLoad]] = {}
        self.healed_from: str | None = None
        self.heal_bytes = 0
        self.commits = 0
        self.rollbacks = 0

    @property
    def step(self) -> int:
        return self._step

    @property
    def plan(self) -> QuorumPlan | None:
        return self._plan

    @property
    def quorum_key(self) -> int:
        """The simulator's name for the quorum of the step in flight (-1: none yet)."""
        return self._key

    def register_state(self, name: str, save: StateSave, load: StateLoad) -> None:
        if "/" in name or name in self._states:
            raise ValueError(f"state name {name!r} is taken or contains '/'")
        self._states[name] = (save, load)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The registered state as the real manager names it (``"state/key"``)."""
        return {
            f"{name}/{key}": tensor
            for name, (save, _) in self._states.items()
            for key, tensor in save().items()
        }

    def start_quorum(self) -> QuorumPlan | None:
        self.healed_from = None
        info, key = self.world.join(self)
        plan = plan_quorum(info, self.replica_id, 0, init_sync=self.world.init_sync)
        self._plan, self._key = plan, key
        self._pg = InProcessGroup(self.world, key, plan.replica_rank, plan.replica_world_size)
        if plan.heal:
            assert plan.donor is not None
            self._heal(self.world._managers[plan.donor.replica_id])
        return plan

    def _heal(self, donor: SimManager) -> None:
        """Copy the donor's committed state (unchanged until its vote), as a real heal does."""
        state = donor.state_tensors()
        self.heal_bytes = sum(t.numel() * t.element_size() for t in state.values())
        copies = {k: v.detach().clone() for k, v in state.items()}
        for name, (_, load) in self._states.items():
            prefix = f"{name}/"
            load({k[len(prefix) :]: v for k, v in copies.items() if k.startswith(prefix)})
        self._step = donor.step
        self.healed_from = donor.replica_id

    def allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        codec: Codec | None = None,
        residuals: Sequence[torch.Tensor | None] | None = None,
    ) -> Work:
        plan, pg = self._plan, self._pg
        if plan is None or pg is None:
            return Work.done(False)
        if plan.heal:
            for t in tensors:
                t.zero_()
        if plan.replica_world_size == 1:
            return Work.done(True)
        contributors = max(1, plan.replica_world_size - len(plan.recovering))
        if codec is not None:
            pending = [
                compressed_allreduce(
                    pg,  # type: ignore[arg-type]  # duck-typed: allreduce/allgather + wait
                    t,
                    codec,
                    world_size=plan.replica_world_size,
                    contributors=contributors,
                    residual=r,
                    contribute=not plan.heal,
                )
                for t, r in zip(tensors, residuals or [None] * len(tensors), strict=True)
            ]

            def finish_coded() -> bool:
                for exchange in pending:
                    exchange.wait()
                return True

            work = Work(finish_coded)
            work.nbytes = sum(exchange.nbytes for exchange in pending)
            return work
        handles = [pg.allreduce([t]) for t in tensors]

        def finish() -> bool:
            for handle, t in zip(handles, tensors, strict=True):
                handle.wait()
                torch.div(t, contributors, out=t)
            return True

        return Work(finish)

    def should_commit(self) -> bool:
        plan = self._plan
        self.voted_key = self._key
        commit = (
            plan is not None
            and self._key not in self.world.failed
            and plan.replica_world_size >= self.min_replicas
        )
        if commit:
            self._step += 1
            self.commit_failures = 0
            self.commits += 1
        else:
            self.commit_failures += 1
            self.rollbacks += 1
        return commit

    def report_sync(self, report: SyncReport) -> None:
        """Real managers export it as metrics; the simulator records its own."""

    def maybe_checkpoint(self) -> Path | None:
        """The simulator writes checkpoints itself (see :mod:`ftdiloco.sim.output`)."""
        return None


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs a submitted sync at once, on the calling worker's thread.

    Streaming DiLoCo hands its exchange to a sync thread; in the simulator the
    exchange's *duration* is modelled (:mod:`ftdiloco.sim.network`), so it can
    run when it starts: the tensors it averages were taken at the start, and
    the inner loop applies the result ``sync_delay`` steps later either way.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever waits on the future, like a thread would
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None
