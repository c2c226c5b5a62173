"""The simulator: diloco-sim's API, reproducibility, failures, the network model, outputs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ftdiloco.sim import (
    DilocoSimulator,
    EvalStats,
    Failure,
    FailurePlan,
    NetworkModel,
    TrainStats,
    what_if,
)


class MLP(nn.Module):
    """Module-level, keyword-configured: what diloco-sim clients pass as model_cls."""

    def __init__(self, num_classes: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def dataset(n: int = 256, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    return TensorDataset(x, x[:, :4].argmax(dim=1))


def simulator(**overrides: Any) -> DilocoSimulator:
    args: dict[str, Any] = {
        "model_cls": MLP,
        "model_kwargs": {"num_classes": 4},
        "optimizer_kwargs": {"lr": 1e-2},
        "train_dataset": dataset(1024),
        "loss_fn": F.cross_entropy,
        "num_nodes": 2,
        "diloco_interval": 4,
        "batch_size": 8,
        "progress": False,
        "record_hashes": True,
        "network": NetworkModel(step_time=0.1, bandwidth=1e6, latency=1e-3),
    }
    args.update(overrides)
    return DilocoSimulator(**args)


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def assert_one_history(syncs: list[dict[str, Any]]) -> None:
    """Invariant I1: after every outer step, its participants hold one global state."""
    for sync in syncs:
        assert len(set(sync["hashes"].values())) == 1, sync


# -- diloco-sim's API ----------------------------------------------------------------------


def test_the_seeds_minimal_example_runs_with_only_the_import_changed(tmp_path: Path) -> None:
    train_stats: list[TrainStats] = []
    eval_stats: list[EvalStats] = []
    sim = DilocoSimulator(
        model_cls=MLP,
        model_kwargs={"num_classes": 4},
        optimizer_kwargs={"lr": 0.001},
        train_dataset=dataset(256),
        loss_fn=F.cross_entropy,
        num_nodes=4,
        diloco_interval=5,
        batch_size=16,
        eval_dataset=dataset(64, seed=1),
        eval_iters=2,
        save_dir=str(tmp_path),
        ckpt_interval=1,
        train_loss_hook=train_stats.append,
        eval_loss_hook=eval_stats.append,
        progress=False,
    )
    sim.train()
    # diloco-sim's numbering: len // (batch * nodes) local steps, global = local * nodes.
    assert sim.max_local_step == 256 // (16 * 4) == 4
    assert [s.local_step for s in train_stats] == [0, 1, 2, 3]
    assert [s.global_step for s in train_stats] == [0, 4, 8, 12]
    assert all(isinstance(s.loss, float) and s.num_diloco_steps == 0 for s in train_stats)
    assert [s.local_step for s in eval_stats] == [0]
    assert 0.0 <= eval_stats[0].accuracy <= 1.0
    assert set(asdict(train_stats[0])) == {
        "loss",
        "local_step",
        "global_step",
        "epoch",
        "num_diloco_steps",
    }
    # The last model, as a plain state_dict (diloco-sim's file), and its safetensors twin.
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_iter_4.pth"]
    state = torch.load(tmp_path / "model_iter_4.pth", weights_only=True)
    MLP(num_classes=4).load_state_dict(state)
    twin = safetensors.torch.load_file(str(tmp_path / "model_iter_4.safetensors"))
    assert all(torch.equal(state[k], twin[k]) for k in state)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["local_steps"] == 4 and summary["settings"]["num_nodes"] == 4
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_hooks_follow_diloco_sims_order_and_checkpoints_land_every_ckpt_interval(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, int]] = []
    sim = simulator(
        eval_dataset=dataset(32, seed=3),
        eval_iters=1,
        max_local_step=13,
        ckpt_interval=2,
        save_dir=tmp_path,
        train_loss_hook=lambda s: calls.append(("train", s.local_step)),
        eval_loss_hook=lambda s: calls.append(("eval", s.local_step)),
    )
    sim.train()
    # At a step that is a multiple of H the eval hook runs first.
    assert calls[:3] == [("eval", 0), ("train", 0), ("train", 1)]
    assert [c for c in calls if c[0] == "eval"] == [
        ("eval", 0),
        ("eval", 4),
        ("eval", 8),
        ("eval", 12),
    ]
    names = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert names == ["model_iter_13.pth", "model_iter_8.pth"]
    # The workers' state in the real jobs' checkpoint layout.
    assert (tmp_path / "checkpoints" / "group0" / "rank-0").is_dir()


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"num_nodes": 0}, "num_nodes"),
        ({"train_dataset": dataset(15)}, "train_dataset"),
        ({"compression": "int3"}, "compression"),
        ({"diloco_interval": 0}, "diloco_interval"),
        ({"batch_size": -1}, "batch_size"),
        ({"sync_delay": 4}, "sync_delay"),
        ({"fragments": 9}, "fragments"),
        ({"alpha": 1.5}, "alpha"),
        ({"failures": FailurePlan(schedule=[Failure(5, 1.0, 1.0)])}, "failures"),
        ({"network": NetworkModel(bandwidth=0)}, "bandwidth"),
        ({"network": NetworkModel(speed=[1.0])}, "speed"),
        ({"model_kwargs": {"no_such": 1}}, "model_kwargs"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(
    overrides: dict[str, Any], argument: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=argument):
        simulator(**overrides)


# -- reproducibility and the outer step --------------------------------------------------------


def test_a_seed_makes_runs_bitwise_reproducible() -> None:
    def hashes(seed: int) -> list[str]:
        sim = simulator(seed=seed, max_local_step=12, num_nodes=3)
        sim.train()
        return [h for s in sim.recorded_syncs for h in s["hashes"].values()]

    first, again, other = hashes(1), hashes(1), hashes(2)
    assert first == again
    assert first != other


def test_every_codec_keeps_workers_identical_and_reports_its_payload() -> None:
    sizes = {}
    for codec in ("fp32", "bf16", "int8", "int4"):
        sim = simulator(compression=codec, max_local_step=8, num_nodes=3, error_feedback=True)
        result = sim.train()
        assert_one_history(sim.recorded_syncs)
        assert result.committed == result.outer_steps == 3  # entry + 2
        sizes[codec] = result.bytes_per_outer_step
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["int4"]


def test_streaming_applies_each_fragment_tau_steps_after_it_starts() -> None:
    sim = simulator(fragments=2, sync_delay=1, diloco_interval=4, max_local_step=16)
    result = sim.train()
    syncs = sim.recorded_syncs[1:]  # after the entry step
    assert [s["fragment"] for s in syncs] == [1, 0, 1, 0, 1, 0, 1][: len(syncs)]
    # Fragments start every 2 steps and land one step later.
    assert [s["local_step"] for s in syncs] == [2, 4, 6, 8, 10, 12, 14]
    assert result.rolled_back == 0
    assert_one_history(sim.recorded_syncs)


# -- failures ------------------------------------------------------------------------------


def test_a_failed_worker_loses_its_progress_then_heals_and_commits_with_the_others() -> None:
    plan = FailurePlan(schedule=[Failure(worker=1, at=6, down_for=3)])
    sim = simulator(num_nodes=3, max_local_step=24, failures=plan)
    result = sim.train()
    assert (result.failures, result.rejoins, result.rolled_back) == (1, 1, 0)
    syncs = sim.recorded_syncs
    # Quorum at the end of local step 7 goes on without worker 1 (down 6..8);
    # at the end of step 11 it is back: it healed and takes part.
    by_step = {s["local_step"]: s for s in syncs}
    assert by_step[7]["participants"] == 2
    assert by_step[11]["participants"] == 3
    assert set(by_step[11]["hashes"]) == {"group0", "group1", "group2"}
    assert_one_history(syncs)


def test_a_failure_during_the_exchange_rolls_the_step_back_everywhere() -> None:
    net = NetworkModel(step_time=1.0, bandwidth=1e5, latency=1e-3)
    # The same run without failures says when the exchange after step 3 runs.
    dry = simulator(num_nodes=3, max_local_step=16, network=net)
    dry.train()
    window = next(s for s in dry.recorded_syncs if s["local_step"] == 3)
    middle = (window["sim_start"] + window["sim_end"]) / 2
    plan = FailurePlan(schedule=[Failure(worker=2, at=middle, down_for=5.0)], unit="seconds")
    sim = simulator(num_nodes=3, max_local_step=16, failures=plan, network=net)
    result = sim.train()
    syncs = sim.recorded_syncs
    failed = [s for s in syncs if not s["committed"]]
    assert [s["local_step"] for s in failed] == [3]
    assert failed[0]["participants"] == 3
    # Rolled back: every participant is still at the step before, with its state.
    before = next(s for s in syncs if s["local_step"] == -1)
    assert set(failed[0]["hashes"].values()) == set(before["hashes"].values())
    following = next(s for s in syncs if s["local_step"] == 7)
    assert following["committed"] and following["participants"] == 2
    assert result.rolled_back == 1 and result.failures == 1
    assert_one_history(syncs)


def test_mtbf_failures_are_reproducible() -> None:
    def run() -> tuple[int, list[str]]:
        sim = simulator(
            num_nodes=3, max_local_step=40, failures=FailurePlan(mtbf=8, down_for=2), seed=7
        )
        r = sim.train()
        assert_one_history(sim.recorded_syncs)
        return r.failures, [str(s["hashes"]) for s in sim.recorded_syncs]

    first = run()
    assert first == run()
    assert first[0] >= 5  # 3 workers x 40 steps / MTBF 8, less their down time


def test_the_last_live_worker_is_never_failed() -> None:
    both = [Failure(worker=0, at=5, down_for=4), Failure(worker=1, at=5, down_for=4)]
    sim = simulator(num_nodes=2, max_local_step=16, failures=FailurePlan(schedule=both))
    result = sim.train()
    assert (result.failures, result.skipped_failures, result.rejoins) == (1, 1, 1)
    assert all(s["committed"] for s in sim.recorded_syncs)


# -- the network model -----------------------------------------------------------------------


def test_simulated_time_is_compute_plus_quorum_plus_ring_allreduce() -> None:
    net = NetworkModel(step_time=0.5, bandwidth=8e6, latency=0.01)  # 1 MB/s
    sim = simulator(num_nodes=2, max_local_step=8, diloco_interval=4, network=net)
    result = sim.train()
    nbytes = sim.numel * 4
    ring = 2 * (2 - 1) * (0.01 + (nbytes / 2) / 1e6)
    per_sync = 0.02 + ring  # quorum latency defaults to twice the link latency
    # The entry step's init sync: worker 1 heals its weights (and step marker) from worker 0.
    heal = 0.01 + (nbytes + 8) / 1e6
    assert result.bytes_per_outer_step == nbytes
    assert result.sim_seconds == pytest.approx(8 * 0.5 + 3 * per_sync + heal)
    wait = 3 * per_sync + heal
    assert result.compute_utilization == pytest.approx(8 * 0.5 / (8 * 0.5 + wait))


def test_a_straggler_makes_the_others_wait() -> None:
    net = NetworkModel(step_time=0.1, bandwidth=1e9, latency=0.0, speed=[1.0, 0.5])
    sim = simulator(num_nodes=2, max_local_step=8, network=net)
    result = sim.train()
    fast, slow = result.per_worker
    assert slow["compute_seconds"] == pytest.approx(1.6)
    assert fast["wait_seconds"] == pytest.approx(0.8, rel=1e-3)
    assert slow["wait_seconds"] == pytest.approx(0.0, abs=1e-3)


def test_streaming_with_delay_hides_communication_on_a_slow_link() -> None:
    net = NetworkModel(step_time=0.1, bandwidth=2e4, latency=1e-3)
    plain = simulator(max_local_step=16, diloco_interval=8, network=net).train()
    hidden = simulator(
        max_local_step=16, diloco_interval=8, fragments=2, sync_delay=3, network=net
    ).train()
    assert hidden.compute_utilization > plain.compute_utilization + 0.1


def test_what_if_matches_the_published_streaming_figure_at_gigabit_speeds() -> None:
    common: dict[str, Any] = {"params": 10**9, "step_seconds": 0.5, "workers": 4, "sync_every": 100}
    four_bit: dict[str, Any] = {"fragments": 4, "sync_delay": 5, "coded": True}
    four_bit["bytes_per_value"] = 0.5 + 4 / 256  # int4 with a scale per 256 values
    dp = what_if(**common, bandwidth=10e9, data_parallel=True)
    stream32 = what_if(**common, bandwidth=1e9, fragments=4, sync_delay=5)
    stream4 = what_if(**common, bandwidth=1e9, **four_bit)
    slow4 = what_if(**common, bandwidth=100e6, **four_bit)
    assert dp.utilization < 0.2  # an fp32 allreduce of 4 GB after every 0.5 s step
    assert 0.95 <= stream4.utilization < 1.0  # streaming 4-bit at 1 Gbit/s: ~95% published
    assert stream32.utilization < 0.7
    assert slow4.utilization < 0.5  # 100 Mbit/s: the exchange no longer hides
    # Each fragment's exchange hides behind sync_delay steps at most.
    assert stream4.exposed_seconds == pytest.approx(stream4.comm_seconds - 4 * 5 * 0.5)


# -- resuming ---------------------------------------------------------------------------------


def test_train_starts_every_worker_from_a_saved_model_and_refuses_foreign_pickles(
    tmp_path: Path,
) -> None:
    first = simulator(max_local_step=8, save_dir=tmp_path / "a")
    first.train()
    saved = tmp_path / "a" / "model_iter_8.pth"
    again = simulator(max_local_step=1, save_dir=tmp_path / "b", diloco_interval=100)
    again.train(str(saved))
    twin = safetensors.torch.load_file(str(saved.with_suffix(".safetensors")))
    start = next(s for s in again.recorded_syncs if s["local_step"] == -1)
    model = MLP()
    model.load_state_dict(twin)
    from ftdiloco.training.outer_loop import tensors_hash

    # The entry step's global weights are the file's (no outer momentum yet: empty state).
    assert set(start["hashes"].values()) == {tensors_hash(list(model.parameters()))}
    foreign = tmp_path / "foreign.pth"
    torch.save(MLP().state_dict(), foreign)
    with pytest.raises(ValueError, match="never unpickles"):
        simulator(max_local_step=1).train(foreign)
