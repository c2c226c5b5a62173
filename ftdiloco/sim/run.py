"""One simulated run: the driver that steps the workers, injects failures and keeps time.

Every live worker takes local step ``t`` before any takes ``t + 1`` (DiLoCo
workers meet at every outer step anyway).  Around each step the driver:

1. fails the workers whose next failure falls in this step (before their
   compute: progress since the last commit is lost; a worker with an outer
   step in flight dooms it on every participant) or in this step's exchange
   (it takes part, the step rolls back everywhere, then it dies);
2. if the step ends by starting an outer step, restarts the workers that are
   back: a fresh model whose DiLoCo joins that quorum and heals;
3. advances the simulated clocks from the inner steps' compute times and
   the outer steps' quorum, heal and exchange costs;
4. calls the hooks, evaluates, writes checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import torch

from ftdiloco.sim.evaluation import GlobalModel, progress_bar, settings
from ftdiloco.sim.failures import Failure, FailureClock
from ftdiloco.sim.network import wire_bytes
from ftdiloco.sim.output import Recorder, save_job_checkpoint, save_model
from ftdiloco.sim.worker import ShardBatches, SimWorker, global_state_hash
from ftdiloco.sim.world import SimWorld
from ftdiloco.training.compression import get_codec
from ftdiloco.training.diloco import DiLoCo
from ftdiloco.training.outer_loop import SyncReport

if TYPE_CHECKING:
    from ftdiloco.sim.simulator import DilocoSimulator, SimResult

log = structlog.get_logger("ftdiloco.sim")


def _index(replica_id: str) -> int:
    return int(replica_id.removeprefix("group"))


class Run:
    def __init__(
        self, sim: DilocoSimulator, recorder: Recorder, initial: dict[str, torch.Tensor] | None
    ) -> None:
        self.sim = sim
        self.rec = recorder
        self.initial = initial
        n = sim.num_nodes
        self.world = SimWorld()
        self.links = sim.links
        self.steps_unit = sim.failures.unit == "steps"
        self.clock = FailureClock(sim.failures, n, sim.seed)
        self.data = [
            ShardBatches(sim.train_dataset, n, r, sim.batch_size, sim.seed) for r in range(n)
        ]
        self.coded = sim.spec.algorithm == "diloco" and sim.spec.compression != "fp32"
        self.time = [0.0] * n
        self.compute = [0.0] * n
        self.wait = [0.0] * n
        self.sent = [0] * n
        self.wire = [0] * n
        self.measured = [0.0] * n
        self.incarnation = [0] * n
        self.workers: dict[int, SimWorker] = {}
        self.down: dict[int, float] = {}
        self.dying: dict[int, Failure] = {}
        self.starts: dict[int, float] = {}  # quorum key -> when its exchange can begin
        self.syncs: dict[int, dict[str, Any]] = {}  # quorum key -> its sync event
        self.failures = 0
        self.rejoins = 0
        self.last_loss: float | None = None

        def build() -> torch.nn.Module:
            torch.manual_seed(sim.seed)  # on the driver's thread, like every model
            return sim.spec.model_cls(**sim.spec.model_kwargs).to(sim.device_for(0))

        loader = (lambda: iter(sim.eval_loader())) if sim.eval_dataset is not None else None
        self.global_model = GlobalModel(build, sim.spec.loss_fn, loader, sim.eval_iters)

    # -- workers ----------------------------------------------------------------------------

    def _spawn(self, w: int, *, start: bool = True) -> SimWorker:
        with self.world.lock:
            worker = SimWorker(
                self.world,
                self.sim.spec,
                w,
                self.sim.device_for(w),
                self.data[w],
                incarnation=self.incarnation[w],
                initial_state=self.initial,
                min_replicas=self.sim.min_replicas,
            )
            self.world.add(worker.manager)
        self.workers[w] = worker
        if start:
            worker.start()
        return worker

    def _kill(self, w: int, failure: Failure, t: int) -> None:
        worker = self.workers.pop(w)
        if worker.in_flight():  # its outer step in flight dies with it, on every participant
            self.world.fail_quorum(worker.manager.quorum_key)
        with self.world.lock:
            self.world.remove(worker.manager.replica_id)
        worker.stop()
        at = failure.at if not self.steps_unit else float(t)
        back = failure.at + failure.down_for
        self.down[w] = back
        self.clock.consume(failure, back_at=back)
        self.failures += 1
        if not self.steps_unit:
            self.time[w] = max(self.time[w], failure.at)
        self.rec.event(
            "failure", worker=w, local_step=t, at=at, back_at=back, sim_time=self.time[w]
        )

    def _first(self) -> SimWorker:
        return self.workers[min(self.workers)]

    def _predicted(self, w: int) -> float:
        return self.links.compute_seconds(w, self.measured[w])

    def _exchange_bytes(self, worker: SimWorker) -> int:
        loop = worker.loop
        if not isinstance(loop, DiLoCo):
            return sum(p.numel() * p.element_size() for p in loop.params)
        fragment = loop.fragments[worker.manager.step % len(loop.fragments)]
        if loop.codec is None:
            return sum(f.numel() * f.element_size() for f in fragment.flats)
        codec = get_codec(self.sim.spec.compression)
        return sum(codec.payload_bytes(f.numel()) for f in fragment.flats)

    def _comm_seconds(self, workers: list[int], nbytes: int) -> float:
        if self.coded:
            return self.links.allgather_seconds(workers, nbytes)
        return self.links.allreduce_seconds(workers, nbytes)

    def _inject(self, t: int, due: bool) -> None:
        """Fail the workers whose next failure falls in step ``t`` or its exchange."""
        sync_end = None
        if due and not self.steps_unit and self.sim.spec.sync_delay == 0:
            ids = sorted(self.workers)
            start = max(self.time[w] + self._predicted(w) for w in ids) + self.links.quorum_latency
            sync_end = start + self._comm_seconds(ids, self._exchange_bytes(self._first()))
        for w in sorted(self.workers):
            failure = self.clock.next(w)
            if failure is None:
                continue
            if self.steps_unit:
                now, in_exchange = failure.at <= t, False
            else:
                now = failure.at < self.time[w] + self._predicted(w)
                in_exchange = not now and sync_end is not None and failure.at < sync_end
            if not (now or in_exchange):
                continue
            if len(self.workers) - len(self.dying) <= 1:
                self.clock.skipped += 1  # nobody left to heal from: a real job would restart
                self.clock.consume(failure, back_at=failure.at + failure.down_for)
                self.rec.event("failure_skipped", worker=w, local_step=t, at=failure.at)
            elif now:
                self._kill(w, failure, t)
            else:
                self.world.fail_next_quorum(self.workers[w].manager.replica_id)
                self.dying[w] = failure

    def _rejoin(self, t: int) -> list[SimWorker]:
        """Restart the workers that are back; they join the outer step that ends step ``t``."""
        arrival = max(self.time[w] + self._predicted(w) for w in self.workers)
        back = [
            w
            for w, at in sorted(self.down.items())
            if (at <= t + 1 if self.steps_unit else at <= arrival)
        ]
        joined = []
        for w in back:
            at = self.down.pop(w)
            self.incarnation[w] += 1
            self.rejoins += 1
            # Seconds: it waits from when it is back.  Steps: from the first arrival.
            first = min(self.time[v] + self._predicted(v) for v in self.workers)
            self.time[w] = first if self.steps_unit else at
            joined.append(self._spawn(w))
            self.rec.event("rejoin", worker=w, local_step=t, sim_time=self.time[w])
        return joined

    # -- time -------------------------------------------------------------------------------

    def _quorum_formed(self, key: int, ids: list[int], heals: dict[int, int]) -> None:
        start = max(self.time[w] for w in ids) + self.links.quorum_latency
        heal = 0.0
        for w, donor in heals.items():
            nbytes = self.workers[w].manager.heal_bytes
            heal = max(heal, self.links.heal_seconds(donor, w, nbytes))
        self.starts[key] = start + heal

    def _applied(self, t: int, w: int, report: SyncReport) -> None:
        worker = self.workers[w]
        key = worker.manager.voted_key
        ids = [_index(r) for r in dict(self.world.quorums)[key]]
        end = self.starts[key] + self._comm_seconds(ids, report.bytes_sent)
        waited = max(0.0, end - self.time[w])
        self.time[w] += waited
        self.wait[w] += waited
        self.sent[w] += report.bytes_sent
        self.wire[w] += wire_bytes(report.bytes_sent, len(ids), self.coded)
        event = self.syncs.get(key)
        if event is None:
            event = self.syncs[key] = {
                "local_step": t,
                "step": report.step,
                "committed": report.committed,
                "participants": report.participants,
                "fragment": report.fragment,
                "bytes": report.bytes_sent,
                "sim_start": self.starts[key],
                "sim_end": end,
                "hashes": {},
            }
        if self.sim.record_hashes:
            event["hashes"][f"group{w}"] = global_state_hash(worker.loop)

    def _flush_syncs(self) -> None:
        for key in sorted(self.syncs):
            if "written" not in self.syncs[key]:
                event = self.syncs[key]
                event["written"] = True
                fields = {k: v for k, v in event.items() if k != "written"}
                if not self.sim.record_hashes:
                    del fields["hashes"]
                self.rec.event("sync", quorum=key, **fields)

    def _settle_quorum(self, before: int, t: int) -> None:
        """Account for the quorums formed since ``before`` (their joins and heals)."""
        for key, ids in self.world.quorums[before:]:
            indices = [_index(r) for r in ids]
            heals = {}
            for w in indices:
                healed = self.workers[w].manager.healed_from
                if healed is not None:
                    heals[w] = _index(healed)
            self._quorum_formed(key, indices, heals)

    # -- evaluation and output ---------------------------------------------------------------

    def _checkpoint(self, t: int) -> None:
        save_dir = self.sim.save_dir
        assert save_dir is not None
        save_model(save_dir, t, self.global_model.state_dict(self._first()))
        for _, worker in sorted(self.workers.items()):
            with self.world.lock:
                tensors = worker.manager.state_tensors()
                save_job_checkpoint(
                    save_dir / "checkpoints",
                    worker.manager.replica_id,
                    worker.manager.step,
                    tensors,
                    t,
                )

    # -- the loop ---------------------------------------------------------------------------

    def execute(self) -> SimResult:
        from ftdiloco.sim.simulator import EvalStats, TrainStats

        sim = self.sim
        H = sim.diloco_interval
        try:
            # Every worker is alive before any joins: the first quorum holds them all.
            for w in range(sim.num_nodes):
                self._spawn(w, start=False)
            for worker in self.workers.values():
                worker.start()
            self._entered(-1, list(self.workers.values()), before=0)
            bar = progress_bar(sim.max_local_step, sim.progress)
            for t in range(sim.max_local_step):
                due = self._first().sync_due()
                self._inject(t, due)
                before = len(self.world.quorums)
                joined = self._rejoin(t) if due and self.down else []
                live = sorted(w for w in self.workers if self.workers[w] not in joined)
                lr = sim.lr_scale(t)
                for w in live:
                    self.workers[w].step(t, lr)
                results = {w: self.workers[w].result() for w in live}
                for w, result in results.items():
                    self.measured[w] = result.compute
                    c = self.links.compute_seconds(w, result.compute)
                    self.time[w] += c
                    self.compute[w] += c
                self._entered(t, joined, before=before)
                for w, result in results.items():
                    if result.report is not None:
                        self._applied(t, w, result.report)
                self._flush_syncs()
                for w, failure in sorted(self.dying.items()):
                    self._kill(w, failure, t)
                self.dying.clear()
                first = min(results)
                self.last_loss = results[first].loss
                epoch = self.data[first].epoch
                self.rec.event(
                    "train",
                    local_step=t,
                    loss=self.last_loss,
                    epoch=epoch,
                    sim_time=max(self.time),
                    workers=len(self.workers),
                )
                if sim.eval_dataset is not None and t % H == 0:
                    loss, acc = self.global_model.evaluate(self._first(), fresh=False)
                    self.rec.event("eval", local_step=t, loss=loss, accuracy=acc)
                    if sim.eval_loss_hook is not None:
                        sim.eval_loss_hook(
                            EvalStats(loss, acc, t, t * sim.num_nodes, epoch, t // H)
                        )
                if sim.ckpt_interval and sim.save_dir and t % (H * sim.ckpt_interval) == 0 and t:
                    self._checkpoint(t)
                if sim.train_loss_hook is not None:
                    sim.train_loss_hook(
                        TrainStats(self.last_loss, t, t * sim.num_nodes, epoch, t // H)
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{self.last_loss:.4f}", epoch=epoch, sim_s=f"{max(self.time):.1f}"
                    )
            if bar is not None:
                bar.close()
            return self._finish()
        finally:
            for worker in self.workers.values():
                worker.stop()

    def _entered(self, t: int, joined: list[SimWorker], before: int) -> None:
        """Workers that just entered DiLoCo: their first outer step (a heal) is done."""
        for worker in joined:
            worker.wait_entered()
        self._settle_quorum(before, t)
        for worker in joined:
            if worker.entry_report is not None:
                self._applied(t, worker.index, worker.entry_report)
        if t < 0:
            self._flush_syncs()

    def _finish(self) -> SimResult:
        from ftdiloco.sim.simulator import SimResult

        sim = self.sim
        final_eval = None
        if sim.eval_dataset is not None:
            final_eval = self.global_model.evaluate(self._first(), fresh=True)[0]
        if sim.save_dir is not None:
            save_model(
                sim.save_dir, sim.max_local_step, self.global_model.state_dict(self._first())
            )
        committed = sum(1 for e in self.syncs.values() if e["committed"])
        n_sync = len(self.syncs)
        workers = range(sim.num_nodes)
        result = SimResult(
            local_steps=sim.max_local_step,
            final_eval_loss=final_eval,
            final_train_loss=self.last_loss,
            sim_seconds=max(self.time),
            compute_seconds=sum(self.compute),
            wait_seconds=sum(self.wait),
            compute_utilization=sum(self.compute) / max(sum(self.compute) + sum(self.wait), 1e-12),
            outer_steps=n_sync,
            committed=committed,
            rolled_back=n_sync - committed,
            failures=self.failures,
            skipped_failures=self.clock.skipped,
            rejoins=self.rejoins,
            bytes_sent=max(self.sent),
            wire_bytes=max(self.wire),
            bytes_per_outer_step=sum(e["bytes"] for e in self.syncs.values()) / max(n_sync, 1),
            per_worker=[
                {
                    "compute_seconds": self.compute[w],
                    "wait_seconds": self.wait[w],
                    "bytes_sent": self.sent[w],
                    "sim_seconds": self.time[w],
                }
                for w in workers
            ],
        )
        self.rec.write_summary({"settings": settings(sim), **result.to_dict()})
        self.rec.plot(f"{sim.spec.algorithm} x{sim.num_nodes}, H={sim.diloco_interval}")
        return result
