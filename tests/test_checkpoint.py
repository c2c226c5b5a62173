"""Durable checkpoints: ftdiloco.state.checkpoint on its own, then through a real Manager.

What users rely on: a checkpoint on disk is complete or absent (a crash while
saving keeps the previous one), damage is detected before anything is
loaded, another model's checkpoint is refused with the tensor that differs,
and a job restarted from disk continues at the saved step with bitwise the
same state.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import safetensors.torch
import structlog.testing
import torch
from torch import nn

from ftdiloco.config import Config
from ftdiloco.coordination.manager import Manager
from ftdiloco.state.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rank_directory,
    save_checkpoint,
    verify_checkpoint,
)
from ftdiloco.training.diloco import DiLoCo
from ftdiloco.training.outer_loop import optimizer_tensors, tensors_hash
from ftwire import protocol
from tests.procs import ROOT, Proc, free_port, process_pool, start_lighthouse

# The examples import each other as siblings, the way `torchrun examples/x.py` runs them.
sys.path.insert(0, str(ROOT / "examples"))
import train_diloco

T = TypeVar("T")


def raw(t: torch.Tensor) -> bytes:
    return bytes(
        t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone().untyped_storage()
    )


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert raw(got[name]) == raw(t), name


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(12, generator=g)
    return {
        "diloco/backup.0": torch.randn(4, 3, generator=g),
        "diloco/backup.1": torch.randn(5, generator=g).to(torch.bfloat16),
        "diloco/inner.0.step": torch.tensor(7.0),  # 0-d, as AdamW keeps it
        "diloco/count": torch.tensor(2**40 + 3, dtype=torch.int64),
        "diloco/mask": torch.tensor([True, False, True]),
        "diloco/empty": torch.zeros(0, 4),
        "diloco/fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "diloco/transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous
        "diloco/view.a": flat[:6],  # two views of one buffer
        "diloco/view.b": flat[6:],
    }


def blank(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in state.items()}


# -- save and load --------------------------------------------------------------------------


def test_round_trip_is_bitwise_identical(tmp_path: Path) -> None:
    state = sample_state()
    path = save_checkpoint(tmp_path, 3, state, {"epoch": 1, "note": "x"}, replica_id="g0")
    assert path == tmp_path / "step-3"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "state.safetensors"]

    into = blank(state)
    step, tensors, metadata = load_checkpoint(path, into)
    assert (step, metadata) == (3, {"epoch": 1, "note": "x"})
    assert_bitwise(tensors, state)
    assert all(tensors[name] is into[name] for name in into)  # landed in place

    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["replica_id"] == "g0" and meta["format"] == 1
    assert meta["checksum"].startswith("crc32:")
    assert meta["bytes"] == (path / "state.safetensors").stat().st_size
    listed = {t["name"]: (t["dtype"], t["shape"]) for t in meta["tensors"]}
    assert listed["diloco/backup.1"] == ("bfloat16", [5])
    assert listed["diloco/inner.0.step"] == ("float32", [])
    # Plain safetensors: any tool can read it, and no pickle is involved.
    plain = safetensors.torch.load_file(str(path / "state.safetensors"))
    assert_bitwise(plain, state)


def test_a_function_destination_allocates_what_the_model_lacks(tmp_path: Path) -> None:
    state = sample_state()
    save_checkpoint(tmp_path, 1, state)
    seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def destination(
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    ) -> dict[str, torch.Tensor]:
        seen.extend(layout)
        return {name: torch.empty(shape, dtype=dtype) for name, dtype, shape in layout}

    _, tensors, _ = load_checkpoint(tmp_path / "step-1", destination)
    assert {name for name, _, _ in seen} == set(state)
    assert_bitwise(tensors, state)


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    _, tensors, _ = load_checkpoint(tmp_path / "step-2", {"w": torch.empty(3)})
    assert torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: save_checkpoint(d, -1, {}), "step must be an integer >= 0"),
        (lambda d: save_checkpoint(d, 1, {}, keep=0), "keep must be >= 1"),
        (lambda d: save_checkpoint(d, 1, {}, {"x": object()}), "not JSON-serialisable"),
        (lambda d: save_checkpoint(d, 1, {"c": torch.zeros(2, dtype=torch.complex64)}), "dtype"),
        (lambda d: save_checkpoint(d, 1, {"": torch.zeros(1)}), "non-empty strings"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path: Path, call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(tmp_path)
    assert list_checkpoints(tmp_path) == []
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.glob("*"))


# -- atomicity and pruning ------------------------------------------------------------------


def test_a_save_that_fails_before_the_rename_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})

    def crash(src: object, dst: object) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # its temporary is gone too


def test_a_crash_mid_write_leaves_only_a_temporary_that_is_ignored_then_removed(
    tmp_path: Path,
) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    # What a process killed half-way through saving step 2 leaves behind.
    partial = tmp_path / ".tmp-step-2-999-abcd"
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    # And one killed between the two renames that replace a step.
    (tmp_path / ".old-step-1-beef").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"

    with structlog.testing.capture_logs() as logs:
        save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-2"]
    removed = [e["path"] for e in logs if e["event"] == "removing an unfinished checkpoint"]
    assert sorted(Path(p).name for p in removed) == [".old-step-1-beef", ".tmp-step-2-999-abcd"]


def test_a_step_directory_without_meta_is_incomplete(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    (tmp_path / "step-2" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"no meta\.json") as info:
        verify_checkpoint(tmp_path / "step-2")
    assert info.value.code == "corrupted"
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"


@pytest.mark.parametrize(("keep", "left"), [(1, [5]), (2, [5, 4]), (3, [5, 4, 3])])
def test_keeps_the_newest_checkpoints(tmp_path: Path, keep: int, left: list[int]) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=keep)
    assert list_checkpoints(tmp_path) == [tmp_path / f"step-{s}" for s in left]


def test_checkpoints_newer_than_the_one_saved_are_removed(tmp_path: Path) -> None:
    """A run resumed from step 1 (step 3 was damaged) must resume from its own step 2 next."""
    for step in (1, 3):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(3)})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    assert list_checkpoints(tmp_path) == [tmp_path / "step-2", tmp_path / "step-1"]


def test_listing_ignores_other_names(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ("step-x", "step-01", "step-", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-4").write_text("a file, not a directory")
    save_checkpoint(tmp_path, 10, {"w": torch.zeros(1)})
    save_checkpoint(tmp_path, 9, {"w": torch.zeros(1)})
    assert list_checkpoints(tmp_path) == [tmp_path / "step-9"]  # 10 was newer than 9
    assert (tmp_path / "step-01").is_dir()


# -- damage ---------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_skipped_and_refused_when_loaded(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(64)})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(64)})
    state = tmp_path / "step-2" / "state.safetensors"
    flip_byte(state, state.stat().st_size - 5)  # inside the tensor data

    with structlog.testing.capture_logs() as logs:
        assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    skipped = [e for e in logs if e["event"] == "skipping a damaged checkpoint"]
    assert len(skipped) == 1 and "fails its checksum" in skipped[0]["error"]

    into = {"w": torch.full((64,), 5.0)}
    with pytest.raises(CheckpointError, match=r"state\.safetensors fails its checksum") as info:
        load_checkpoint(tmp_path / "step-2", into)
    assert info.value.code == "corrupted"
    assert torch.equal(into["w"], torch.full((64,), 5.0))  # nothing was written


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: (p / "state.safetensors").write_bytes(b"short"), "has 5 bytes, meta.json says"),
        (lambda p: (p / "state.safetensors").unlink(), "cannot read state.safetensors"),
        (lambda p: (p / "meta.json").write_text("{not json"), "meta.json is unreadable"),
        (lambda p: (p / "meta.json").write_text("[]"), "not a JSON object"),
        (lambda p: edit_meta(p, step=7), "says step 7 but the directory is step-2"),
        (lambda p: edit_meta(p, format=99), "format 99"),
        (lambda p: edit_meta(p, bytes="many"), "no valid 'bytes'"),
        (lambda p: edit_meta(p, checksum="md5:00"), "not crc32"),
        (lambda p: edit_meta(p, tensors=[{"name": "w"}]), "malformed tensor"),
        (lambda p: edit_meta(p, tensors=[{"name": "w", "dtype": "x", "shape": [2]}]), "malformed"),
    ],
)
def test_damage_is_named(tmp_path: Path, damage: Any, match: str) -> None:
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)})
    damage(tmp_path / "step-2")
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path / "step-2", {"w": torch.zeros(2)})
    assert info.value.code == "corrupted"
    assert latest_checkpoint(tmp_path) is None


def edit_meta(path: Path, **changes: Any) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_meta_that_disagrees_with_the_tensor_file_is_corruption(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)})
    edit_meta(tmp_path / "step-2", tensors=[{"name": "w", "dtype": "float64", "shape": [2]}])
    with pytest.raises(CheckpointError, match=r"tensor w is F32\[2\] in state\.safetensors"):
        load_checkpoint(tmp_path / "step-2", {"w": torch.zeros(2, dtype=torch.float64)})


# -- another model's checkpoint ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"diloco/backup.3": torch.zeros(64, 16)},
            "tensor diloco/backup.3: checkpoint has float32[64,32], the model has float32[64,16]",
        ),
        (
            {"diloco/backup.3": torch.zeros(64, 32, dtype=torch.bfloat16)},
            "checkpoint has float32[64,32], the model has bfloat16[64,32]",
        ),
        (
            {"diloco/backup.3": torch.zeros(64, 32), "diloco/backup.9": torch.zeros(2)},
            "tensor diloco/backup.9: the model has float32[2], the checkpoint has no such tensor",
        ),
        (
            {},
            "tensor diloco/backup.3: checkpoint has float32[64,32], the model has no such tensor",
        ),
    ],
)
def test_another_models_checkpoint_names_the_tensor(
    tmp_path: Path, model: dict[str, torch.Tensor], message: str
) -> None:
    save_checkpoint(tmp_path, 1, {"diloco/backup.3": torch.ones(64, 32)})
    before = {name: t.clone() for name, t in model.items()}
    with pytest.raises(CheckpointError, match=message.replace("[", "\\[")) as info:
        load_checkpoint(tmp_path / "step-1", model)
    assert info.value.code == "mismatch"
    assert_bitwise(model, before)  # refused before writing


def test_several_differences_are_counted(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"a": torch.ones(2), "b": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"tensor a: .* \(and 2 more differences\)"):
        load_checkpoint(tmp_path / "step-1", {"a": torch.ones(3), "c": torch.ones(2)})


@pytest.mark.parametrize(
    ("replica_id", "expected"),
    [("group0", "group0"), ("east/1", "east_1"), ("..", "__"), ("grüße", "gr__e")],
)
def test_rank_directory_stays_inside_the_root(replica_id: str, expected: str) -> None:
    assert rank_directory("/ck", replica_id, 3) == Path("/ck") / expected / "rank-3"


# -- through a Manager, in process ----------------------------------------------------------


def manager(url: str, root: Path | None, **fields: Any) -> Manager:
    config = Config.from_env(
        {}, lighthouse=url, replica_group_id="ck", timeout=5.0, checkpoint_dir=root, **fields
    )
    return Manager(config)


class Trainer:
    """DiLoCo on a tiny model: two inner steps per outer step."""

    def __init__(self, m: Manager, seed: int = 0, hidden: int = 16) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))
        self.inner = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.outer = torch.optim.SGD(self.model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
        self.diloco = DiLoCo(m, self.model, self.inner, self.outer, sync_every=2)
        self.data = torch.Generator().manual_seed(seed)
        self.entered = False

    def enter(self) -> None:
        """Hook inner.step() (the Manager's close outlives it) and take the first,
        empty, outer step that aligns a new job."""
        self.diloco.__enter__()
        self.entered = True

    def outer_steps(self, n: int) -> None:
        if not self.entered:
            self.enter()
        for _ in range(2 * n):
            x = torch.randn(4, 8, generator=self.data)
            (self.model(x) - x[:, :4]).pow(2).mean().backward()
            self.inner.step()
            self.inner.zero_grad()

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"param.{i}": p.detach().clone() for i, p in enumerate(self.diloco.params)}
        out.update({f"backup.{i}": b.clone() for i, b in enumerate(self.diloco.backup)})
        for prefix, opt in (("outer", self.outer), ("inner", self.inner)):
            out.update({k: v.clone() for k, v in optimizer_tensors(prefix, opt).items()})
        return out


def steps_on_disk(m: Manager) -> list[int]:
    directory = m.checkpoint_directory()
    assert directory is not None
    return sorted(int(p.name.removeprefix("step-")) for p in list_checkpoints(directory))


def test_manager_saves_every_n_steps_and_resumes_bitwise(
    lighthouse_url: str, tmp_path: Path
) -> None:
    with manager(lighthouse_url, tmp_path, checkpoint_every=2) as m:
        first = Trainer(m)
        m.checkpoint_metadata = lambda: {"position": 123}
        first.enter()
        first.outer_steps(3)
        assert m.step == 4
        assert steps_on_disk(m) == [2, 4]
        saved = first.state()
        directory = m.checkpoint_directory()
        history = m.history
    assert directory == tmp_path / "groupck" / "rank-0"
    meta = json.loads((directory / "step-4" / "meta.json").read_text())
    assert meta["replica_id"] == "groupck"
    assert meta["metadata"] == {
        "group_rank": 0,
        "group_size": 1,
        "history": history,
        "user": {"position": 123},
    }

    with manager(lighthouse_url, tmp_path, checkpoint_every=2) as m:
        second = Trainer(m, seed=1)  # other initial weights, no optimizer state yet
        assert raw(second.diloco.backup[0]) != raw(saved["backup.0"])
        assert m.resume()
        assert m.step == 4
        # The resumed group is the same history as before, not a look-alike at step 4.
        assert m.history == history
        assert m.resumed_metadata == {"position": 123}
        assert_bitwise(second.state(), saved)
        second.enter()  # the resumed job's first step is empty: nothing moves
        assert m.step == 5
        assert_bitwise(second.state(), saved)
        second.outer_steps(1)
        assert m.step == 6


def test_resume_without_a_checkpoint_starts_over(lighthouse_url: str, tmp_path: Path) -> None:
    with manager(lighthouse_url, tmp_path) as m:
        Trainer(m)
        assert not m.resume()
        assert m.step == 0 and m.resumed_metadata is None


def test_resume_skips_a_damaged_checkpoint(lighthouse_url: str, tmp_path: Path) -> None:
    with manager(lighthouse_url, tmp_path, checkpoint_every=1) as m:
        Trainer(m).outer_steps(2)
        directory = m.checkpoint_directory()
    assert directory is not None
    # Steps 1 (the empty first one), 2 and 3 were saved; the newest two are kept.
    flip_byte(directory / "step-3" / "state.safetensors", 100)
    with manager(lighthouse_url, tmp_path) as m:
        Trainer(m)
        with structlog.testing.capture_logs() as logs:
            assert m.resume()
        assert m.step == 2
        assert any(e["event"] == "skipping a damaged checkpoint" for e in logs)


def test_resuming_another_models_checkpoint_fails_naming_the_tensor(
    lighthouse_url: str, tmp_path: Path
) -> None:
    with manager(lighthouse_url, tmp_path, checkpoint_every=1) as m:
        Trainer(m).outer_steps(1)
    with manager(lighthouse_url, tmp_path) as m:
        Trainer(m, hidden=12)
        expected = (
            "tensor diloco/backup.0: checkpoint has float32[16,8], the model has float32[12,8]"
        )
        with pytest.raises(CheckpointError, match=expected.replace("[", "\\[")):
            m.resume()
        assert m.step == 0


def test_resuming_a_checkpoint_with_more_parameters_fails(
    lighthouse_url: str, tmp_path: Path
) -> None:
    with manager(lighthouse_url, tmp_path, checkpoint_every=1) as m:
        Trainer(m).outer_steps(1)
    with manager(lighthouse_url, tmp_path) as m:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16))  # the first layer only
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        outer = torch.optim.SGD(model.parameters(), lr=0.7)
        DiLoCo(m, model, inner, outer, sync_every=2)
        with pytest.raises(CheckpointError, match=r"tensor diloco/backup\.2: checkpoint has"):
            m.resume()


def post_checkpoint(m: Manager, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{m.address}/v1/checkpoint", b"", headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, protocol.unpack(response.read())
    except urllib.error.HTTPError as e:
        code, message = protocol.decode_error(e.read())
        return e.code, {"code": code, "message": message}


def test_checkpoint_on_request_at_the_next_step_boundary(
    lighthouse_url: str, tmp_path: Path
) -> None:
    with manager(lighthouse_url, tmp_path, token="s3cret") as m:
        trainer = Trainer(m)
        trainer.outer_steps(1)
        assert steps_on_disk(m) == []  # no periodic saves configured
        status, answer = post_checkpoint(m, "wrong")
        assert (status, answer["code"]) == (401, "unauthorized")
        status, answer = post_checkpoint(m, "s3cret")
        # (step 1 was the empty first one, step 2 the trained one)
        assert (status, answer["ok"], answer["step"]) == (202, True, 2)
        assert steps_on_disk(m) == []  # the training thread saves, not the server
        trainer.outer_steps(1)
        assert steps_on_disk(m) == [3]
        trainer.outer_steps(1)
        assert steps_on_disk(m) == [3]  # one request, one save


def test_checkpoint_route_without_a_directory_is_refused(lighthouse_url: str) -> None:
    with manager(lighthouse_url, None) as m:
        status, answer = post_checkpoint(m, None)
        assert (status, answer["code"]) == (409, "no_checkpoint_dir")
        with pytest.raises(ValueError, match="FTDILOCO_CHECKPOINT_DIR"):
            m.install_sigterm_handler()
        assert m.maybe_checkpoint() is None


def test_sigterm_saves_at_the_next_step_boundary_then_exits(
    lighthouse_url: str, tmp_path: Path
) -> None:
    received: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with manager(lighthouse_url, tmp_path) as m:
            trainer = Trainer(m)
            trainer.outer_steps(1)
            m.install_sigterm_handler()
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []  # ours took it
            with pytest.raises(SystemExit) as info:
                trainer.outer_steps(1)
            assert info.value.code == 0
            assert steps_on_disk(m) == [3]  # after the empty first step and one more
            # A second SIGTERM goes to the handler that was there before.
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)


def on_both(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run one call per group rank at once, as the ranks' own processes would."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(call) for call in calls]]


def load_w(into: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    into.copy_(state["w"])


def test_the_ranks_of_a_group_save_and_resume_the_same_step(
    lighthouse_url: str, tmp_path: Path
) -> None:
    port = free_port()
    managers = on_both(
        [
            lambda rank=rank: manager(  # type: ignore[misc]
                lighthouse_url, tmp_path, rank=rank, world_size=2, master_port=port
            )
            for rank in (0, 1)
        ]
    )
    try:
        weights = [torch.zeros(3), torch.zeros(3)]
        for m, w in zip(managers, weights, strict=True):
            m.register_state("s", functools.partial(dict, w=w), functools.partial(load_w, w))

        def outer_step(rank: int) -> None:
            m = managers[rank]
            m.start_quorum()
            m.allreduce([torch.ones(1)]).wait()
            assert m.should_commit()
            weights[rank].add_(1)
            m.maybe_checkpoint()

        def outer_steps(n: int) -> None:
            for _ in range(n):
                on_both([lambda r=r: outer_step(r) for r in (0, 1)])  # type: ignore[misc]

        outer_steps(1)
        # The request reaches rank 0 only; the group round makes rank 1 save too.
        assert post_checkpoint(managers[0], None)[0] == 202
        outer_steps(1)
        assert [steps_on_disk(m) for m in managers] == [[2], [2]]
        assert post_checkpoint(managers[0], None)[0] == 202
        outer_steps(1)
        assert [steps_on_disk(m) for m in managers] == [[2, 3], [2, 3]]

        # Rank 1's newest checkpoint is damaged: the group resumes at step 2, not mixed.
        directory = managers[1].checkpoint_directory()
        assert directory is not None
        flip_byte(directory / "step-3" / "state.safetensors", 90)
        for w in weights:
            w.fill_(-1)
        assert on_both([m.resume for m in managers]) == [True, True]
        assert [m.step for m in managers] == [2, 2]
        assert all(torch.equal(w, torch.full((3,), 2.0)) for w in weights)
    finally:
        on_both([m.close for m in managers])


def test_example_checkpoint_flags() -> None:
    args = train_diloco.parse_args([])
    assert (args.checkpoint_dir, args.checkpoint_every, args.resume) == (None, None, False)
    assert train_diloco.checkpoint_overrides(args) == {}
    args = train_diloco.parse_args(["--checkpoint-dir", "/ck", "--checkpoint-every", "3"])
    overrides = train_diloco.checkpoint_overrides(args)
    assert overrides == {"checkpoint_dir": "/ck", "checkpoint_every": 3}
    config = Config.from_env({"FTDILOCO_LIGHTHOUSE": "lh:1"}, **overrides)
    assert (config.checkpoint_dir, config.checkpoint_every) == (Path("/ck"), 3)
    assert train_diloco.parse_args(["--resume"]).resume
    with pytest.raises(SystemExit):
        train_diloco.parse_args(["--checkpoint-every", "0"])


# -- a real group, killed and restarted from disk ---------------------------------------------

WORKER = "tests/workers/diloco_worker.py"


def start_worker(procs: list[Proc], url: str, log: Path, root: Path, **env: str) -> Proc:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    proc = Proc(
        "group0",
        [sys.executable, WORKER],
        env={
            "FTDILOCO_LIGHTHOUSE": url,
            "REPLICA_GROUP_ID": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port),
            "FTDILOCO_TIMEOUT": "10",
            "FTDILOCO_HEARTBEAT_INTERVAL": "0.2",
            "FTDILOCO_CHECKPOINT_DIR": str(root),
            "WORKER_LOG": str(log),
            **env,
        },
    )
    procs.append(proc)
    return proc


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def checkpoint_hash(path: Path) -> str:
    """The worker's state hash (global weights, then outer optimizer state) of a checkpoint."""
    tensors = safetensors.torch.load_file(str(path / "state.safetensors"))
    backup = sorted(
        (n for n in tensors if n.startswith("diloco/backup.")), key=lambda n: int(n[14:])
    )
    outer = sorted(n for n in tensors if n.startswith("diloco/outer."))
    return tensors_hash([tensors[n] for n in [*backup, *outer]])


@pytest.mark.integration
def test_a_killed_group_restarts_from_disk_and_a_terminated_one_saves_first(
    tmp_path: Path,
) -> None:
    root = tmp_path / "checkpoints"
    directory = rank_directory(root, "group0", 0)
    first_log, second_log = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    with process_pool() as procs:
        _, url = start_lighthouse(procs, "--min-replicas", "1")
        first = start_worker(
            procs, url, first_log, root, FTDILOCO_CHECKPOINT_EVERY="2", WORKER_PAUSE_AT="5"
        )
        first.wait_for("PAUSED", timeout=60)  # step 5 is committed but not saved
        first.kill()

        second = start_worker(
            procs,
            url,
            second_log,
            root,
            FTDILOCO_CHECKPOINT_EVERY="2",
            WORKER_RESUME="1",
            WORKER_PAUSE_AT="6",
            WORKER_STEPS="50",
        )
        _, step, digest, params_match = second.wait_for("RESUMED", timeout=60).split()
        second.wait_for("PAUSED", timeout=60)  # at step 6
        second.popen.send_signal(signal.SIGTERM)
        second.send("go")
        assert second.wait(timeout=30) == 0, second.tail()  # left at the next boundary

    first_hashes = {r["step"]: r["hash"] for r in records(first_log) if r["committed"]}
    assert sorted(first_hashes) == [1, 2, 3, 4, 5]
    # The killed group restarts from its newest checkpoint, bitwise.
    assert int(step) == 4
    assert digest == first_hashes[4] and params_match == "True"
    second_hashes = {r["step"]: r["hash"] for r in records(second_log) if r["committed"]}
    # Its first step (entering after the resume) takes part in the job at once.
    assert sorted(second_hashes) == [5, 6]
    assert checkpoint_hash(directory / "step-6") == second_hashes[6]
    # SIGTERM during step 7 saved it (the exit came before the worker's record) and stopped.
    assert [p.name for p in list_checkpoints(directory)] == ["step-7", "step-6"]
    assert verify_checkpoint(directory / "step-7").step == 7
    assert "DONE" not in "".join(second.output)
