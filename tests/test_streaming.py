"""Streaming DiLoCo: fragments on staggered schedules, overlapped with compute.

With one fragment and no delay it must be exactly DiLoCo (checked bitwise
against the outer step written out by hand); with more it must keep every
group's committed state identical.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ftdiloco.config import Config
from ftdiloco.coordination.manager import Manager
from ftdiloco.training.diloco import DiLoCo, split_fragments
from tests.chaos_support import assert_one_history, records, start_group
from tests.procs import process_pool, start_lighthouse

SYNC_EVERY = 4


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=gen) for _ in range(n)]


def inner_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    (model(x) - x[:, :4]).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def optimizers(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    return inner, outer


@pytest.fixture
def manager(lighthouse_url: str, request: pytest.FixtureRequest) -> Manager:
    config = Config.from_env(
        {}, lighthouse=lighthouse_url, replica_group_id=request.node.name[:40], timeout=5.0
    )
    m = Manager(config)
    request.addfinalizer(m.close)
    return m


def test_one_fragment_without_delay_is_plain_diloco_bitwise(manager: Manager) -> None:
    data = batches(5 * SYNC_EVERY)
    # By hand: H inner steps, then the outer step on (backup - local).
    ref = make_model()
    ref_inner, ref_outer = optimizers(ref)
    backup = [p.detach().clone() for p in ref.parameters()]
    for step, x in enumerate(data, 1):
        inner_step(ref, ref_inner, x)
        if step % SYNC_EVERY == 0:
            with torch.no_grad():
                for p, b in zip(ref.parameters(), backup, strict=True):
                    p.grad = b - p
                    p.copy_(b)
            ref_outer.step()
            ref_outer.zero_grad()
            backup = [p.detach().clone() for p in ref.parameters()]

    model = make_model()
    inner, outer = optimizers(model)
    with DiLoCo(manager, model, inner, outer, sync_every=SYNC_EVERY, fragments=1, sync_delay=0):
        for x in data:
            inner_step(model, inner, x)
    assert manager.step == 1 + 5  # the empty step that aligns a new job, then five
    for got, want in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(got, want)


def test_fragments_sync_on_staggered_schedules_and_apply_after_the_delay(
    manager: Manager,
) -> None:
    model = make_model()
    inner, outer = optimizers(model)
    diloco = DiLoCo(manager, model, inner, outer, sync_every=8, fragments=2, sync_delay=2)
    assert diloco.slots == (4, 0)
    committed_at: list[int] = []
    moved: list[list[int]] = []  # per commit: the fragments whose global weights changed
    with diloco:
        for x in batches(16):
            before = manager.step
            backups = [[b.clone() for b in f.backup] for f in diloco.fragments]
            inner_step(model, inner, x)
            if manager.step != before:
                committed_at.append(diloco.inner_steps)
                assert diloco.last_sync is not None and diloco.last_sync.committed
                moved.append(
                    [
                        f.index
                        for f, old in zip(diloco.fragments, backups, strict=True)
                        if not all(torch.equal(a, b) for a, b in zip(f.backup, old, strict=True))
                    ]
                )
    # Entering committed an empty first step; then a sync starts at inner
    # step 4 and applies at 6, the next starts at 8 and applies at 10, ...
    assert manager.step == 1 + 3
    assert committed_at == [6, 10, 14]
    # ... each carrying one fragment, in turn (the fragment of the committed step).
    assert moved == [[1], [0], [1]]
    assert diloco.in_flight is not None  # started at 16, applies at 18


def test_alpha_one_keeps_the_local_weights_of_the_fragment(manager: Manager) -> None:
    model = make_model()
    inner, outer = optimizers(model)
    with DiLoCo(manager, model, inner, outer, sync_every=SYNC_EVERY, alpha=1.0) as diloco:
        data = batches(SYNC_EVERY)
        for x in data[:-1]:
            inner_step(model, inner, x)
        probe = make_model()
        probe.load_state_dict(model.state_dict())
        probe_inner, _ = optimizers(probe)
        # deepcopy: load_state_dict may share (not copy) the moment tensors.
        probe_inner.load_state_dict(copy.deepcopy(inner.state_dict()))
        inner_step(probe, probe_inner, data[-1])  # what the local weights will be
        inner_step(model, inner, data[-1])  # triggers the sync
    assert diloco.last_sync is not None and diloco.last_sync.committed
    for got, local, b in zip(model.parameters(), probe.parameters(), diloco.backup, strict=True):
        assert torch.equal(got, local)
        assert not torch.equal(b, local)  # the global weights moved by the outer step


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fragments": 2, "sync_delay": 2}, "sync_delay"),
        ({"fragments": 99}, "fragments"),
        ({"alpha": 1.5}, "alpha"),
    ],
)
def test_bad_streaming_settings_are_refused(
    manager: Manager, kwargs: dict[str, float], match: str
) -> None:
    model = make_model()
    inner, outer = optimizers(model)
    with pytest.raises(ValueError, match=match):
        DiLoCo(manager, model, inner, outer, sync_every=SYNC_EVERY, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sizes", "n", "expected"),
    [
        ((1, 1000, 1, 1, 1), 3, [[1], [1000], [1, 1, 1]]),
        ((100, 1, 1, 1), 3, [[100], [1], [1, 1]]),
        ((1, 1, 100, 1), 4, [[1], [1], [100], [1]]),
        ((3, 3, 3, 3, 3, 3), 3, [[3, 3], [3, 3], [3, 3]]),
        ((5,), 1, [[5]]),
    ],
)
def test_fragments_balance_bytes_in_module_order_and_none_is_empty(
    sizes: tuple[int, ...], n: int, expected: list[list[int]]
) -> None:
    params = [nn.Parameter(torch.zeros(k)) for k in sizes]
    runs = split_fragments(params, n)
    assert [[p.numel() for p in run] for run in runs] == expected
    assert [p for run in runs for p in run] == params


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["fp32", "int8"])
def test_streaming_groups_commit_identical_state(tmp_path: Path, compression: str) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(2)]
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2")
        groups = [
            start_group(
                procs,
                url,
                g,
                logs[g],
                WORKER_STEPS="8",
                WORKER_FRAGMENTS="2",
                WORKER_SYNC_DELAY="1",
                WORKER_COMPRESSION=compression,
            )
            for g in range(2)
        ]
        for proc in groups:
            proc.wait_for("DONE", timeout=90)
            assert proc.wait(timeout=30) == 0, proc.tail()
    by_step = assert_one_history(logs).by_step
    assert set(range(1, 9)) <= set(by_step)
    committed = [r for log in logs for r in records(log) if r["committed"]]
    assert all(r["participants"] == 2 for r in committed)
    # The worker's model splits into fragments of 2048 and 584 values: 8192 and
    # 2336 bytes in fp32; int8 sends a byte a value plus a scale per 256.
    sent = {int(r["bytes_sent"]) for r in committed}
    if compression == "fp32":
        assert sent == {8192, 2336}
    else:
        assert max(sent) < 2336 and min(sent) >= 584


STREAMING = {"WORKER_FRAGMENTS": "2", "WORKER_SYNC_DELAY": "1"}


@pytest.mark.integration
def test_a_group_left_behind_heals_on_the_sync_thread_and_rejoins(tmp_path: Path) -> None:
    """The heal lands while the inner loop runs on; the weights are adopted at the apply."""
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "2", "--join-timeout-ms", "500")
        ahead = [
            start_group(procs, url, g, logs[g], WORKER_STEPS="12", **pause, **STREAMING)
            for g, pause in ((1, {"WORKER_PAUSE_AT": "2"}), (2, {}))
        ]
        # While group 1 is silent, group 2 waits in its quorum for a majority.
        ahead[0].wait_for("PAUSED", timeout=60)
        # Group 0 joins the job (healing into the others' history with group
        # 2), then falls silent in turn, and groups 1 and 2 move on without it.
        behind = start_group(
            procs, url, 0, logs[0], WORKER_STEPS="12", WORKER_PAUSE_AT="1", **STREAMING
        )
        behind.wait_for("PAUSED", timeout=60)
        paused_at = max(int(r["step"]) for r in records(logs[0]))
        ahead[0].send("go")
        ahead[0].wait_for(f"STEP {paused_at + 3}", timeout=60)
        behind.send("go")
        for proc in (behind, *ahead):
            proc.wait_for("DONE", timeout=90)
            assert proc.wait(timeout=30) == 0, proc.tail()
    resumed = [r for r in records(logs[0]) if int(r["step"]) > paused_at]
    healed = [r for r in resumed if r["healed"]]
    assert healed and healed[0]["committed"], resumed
    assert int(healed[0]["step"]) >= paused_at + 3  # it took the others' step, not its own
    # From the heal on it commits every step with the other group, never resetting.
    after = [int(r["step"]) for r in resumed if r["committed"] and r["time"] >= healed[0]["time"]]
    assert after == list(range(after[0], 13))
    assert_one_history(logs)  # one state per committed step, those after the heal included


@pytest.mark.integration
def test_a_kill_during_a_background_sync_rolls_back_one_fragment_and_a_restart_heals(
    tmp_path: Path,
) -> None:
    logs = [tmp_path / f"g{g}.jsonl" for g in range(3)]
    with process_pool() as procs:
        # Two groups or none: the survivor waits for the restarted group.
        _, url = start_lighthouse(procs, "--min-replicas", "2")
        survivor = start_group(procs, url, 0, logs[0], WORKER_STEPS="10", **STREAMING)
        doomed = start_group(procs, url, 1, logs[1], WORKER_ENTER_LATE_AT="3:3600", **STREAMING)
        doomed.wait_for("ENTERING_LATE step=3", timeout=60)  # on its sync thread
        # The survivor issued the collective and is blocked in it, waiting for the doomed.
        survivor.wait_for("IN_COLLECTIVE step=3", timeout=30)
        doomed.kill()
        restarted = start_group(procs, url, 2, logs[2], WORKER_STEPS="10", **STREAMING)
        for proc in (survivor, restarted):
            proc.wait_for("DONE", timeout=90)
            assert proc.wait(timeout=30) == 0, proc.tail()
    mine = records(logs[0])
    rolled_back = [r for r in mine if not r["committed"]]
    assert rolled_back and all(r["rolled_back_to_backup"] for r in rolled_back)
    committed = [int(r["step"]) for r in mine if r["committed"]]
    assert committed == list(range(committed[0], 11))
    late = [r for r in records(logs[2]) if r["committed"]]
    assert late[0]["healed"] and int(late[0]["step"]) >= 4  # the survivor's progress, not 0
    assert [int(r["step"]) for r in late] == list(range(int(late[0]["step"]), 11))
    assert_one_history(logs)


def test_leaving_on_an_exception_does_not_wait_out_a_background_quorum(
    lighthouse_url: str,
) -> None:
    """Ctrl-C while the sync thread waits in a quorum: exit and close return promptly."""

    def config(group: str) -> Config:
        return Config.from_env({}, lighthouse=lighthouse_url, replica_group_id=group, timeout=60.0)

    models = [make_model(), make_model()]
    opts = [optimizers(m) for m in models]
    with Manager(config("ctrl-c")) as manager, Manager(config("silent")) as silent:
        dilocos = [
            DiLoCo(m, model, inner, outer, sync_every=4, fragments=2, sync_delay=1)
            for m, model, (inner, outer) in zip((manager, silent), models, opts, strict=True)
        ]
        # Both take part in the first quorum; then "silent" never joins again,
        # so the next one has no majority and would wait out its 60 s deadline.
        other = threading.Thread(target=dilocos[1].__enter__)
        other.start()
        started = float("inf")
        with pytest.raises(KeyboardInterrupt), dilocos[0]:
            other.join(timeout=30)
            for x in batches(2):
                inner_step(models[0], opts[0][0], x)
            flight = dilocos[0].in_flight
            assert flight is not None and not flight.done.done()
            started = time.monotonic()
            raise KeyboardInterrupt
        dilocos[1].__exit__(None, None, None)
    assert time.monotonic() - started < 15
