"""The example GPT, its byte data, and the training script's pieces (all but the loop)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ftdiloco.config import Config
from ftdiloco.examples import train_diloco
from ftdiloco.examples.model import (
    GPT,
    MODEL_SIZES,
    ByteDataset,
    GPTConfig,
    default_corpus,
    load_corpus,
)
from ftdiloco.training.outer_loop import SyncReport

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from threads, and on a busy machine they spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


@pytest.mark.parametrize(
    ("size", "low", "high"), [("tiny", 50_000, 300_000), ("small", 3_000_000, 5_000_000)]
)
def test_parameter_counts(size: str, low: int, high: int) -> None:
    model = GPT(MODEL_SIZES[size])
    assert low <= model.num_parameters() <= high
    assert model.lm_head.weight is model.wte.weight  # tied


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b, c = tiny_model(1).state_dict(), tiny_model(1).state_dict(), tiny_model(2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_initial_loss_is_that_of_a_uniform_guess() -> None:
    model = tiny_model()
    x, y = torch.randint(0, 256, (2, 8, TINY.block_size))
    logits, loss = model(x, y)
    assert logits.shape == (8, TINY.block_size, 256)
    assert loss is not None
    assert loss.item() == pytest.approx(math.log(256), abs=0.15)
    assert model(x)[1] is None


def test_a_few_adamw_steps_reduce_the_loss() -> None:
    model = tiny_model()
    x, y = torch.randint(
        0, 256, (2, 4, TINY.block_size), generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_the_model_is_causal() -> None:
    model = tiny_model().eval()
    x = torch.randint(0, 256, (3, TINY.block_size))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    before, _ = model(x)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10], after[:, 10])


def test_sequences_longer_than_the_block_are_refused() -> None:
    with pytest.raises(ValueError, match="block_size=16"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="n_head=3"):
        GPTConfig(n_embd=32, n_head=3)


def test_byte_dataset_windows() -> None:
    data = bytes(range(23))
    dataset = ByteDataset(data, block_size=5)
    assert len(dataset) == 4  # windows start at 0, 5, 10, 15; 20 would need bytes up to 25
    x, y = dataset[1]
    assert x.dtype == y.dtype == torch.long
    assert x.tolist() == [5, 6, 7, 8, 9]
    assert y.tolist() == [6, 7, 8, 9, 10]
    # Every byte after the first is a target exactly once.
    targets = [t for i in range(len(dataset)) for t in dataset[i][1].tolist()]
    assert targets == list(range(1, 21))
    with pytest.raises(IndexError):
        dataset[4]


@pytest.mark.parametrize(("size", "windows"), [(0, 0), (1, 0), (5, 0), (6, 1), (11, 2)])
def test_byte_dataset_length_at_the_edges(size: int, windows: int) -> None:
    assert len(ByteDataset(b"a" * size, block_size=5)) == windows


def test_default_corpus_is_python_source_and_deterministic() -> None:
    corpus = default_corpus(1 << 20)
    assert len(corpus) == 1 << 20
    assert corpus == default_corpus(1 << 20)
    assert b"def " in corpus and b"import " in corpus
    assert default_corpus(1000) == corpus[:1000]


def test_load_corpus_reads_files_and_directories_in_order(tmp_path: Path) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_bytes(b"B")
    (tmp_path / "docs" / "a.txt").write_bytes(b"A")
    (tmp_path / "docs" / "sub" / "c.txt").write_bytes(b"C")
    (tmp_path / "docs" / ".hidden").write_bytes(b"H")
    (tmp_path / "one.txt").write_bytes(b"1")
    assert load_corpus([str(tmp_path / "one.txt"), str(tmp_path / "docs")]) == b"1ABC"


def test_load_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        load_corpus([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text found"):
        load_corpus([str(tmp_path / "empty")])


# -- ftdiloco/examples/train_diloco.py ---------------------------------------------------------


def config(**overrides: object) -> Config:
    return Config.from_env({}, lighthouse="127.0.0.1:29510", **overrides)


@pytest.mark.parametrize(
    "command",
    [["-m", "ftdiloco.examples.train_diloco"], [str(ROOT / "examples" / "train_diloco.py")]],
    ids=["module", "old-path"],
)
def test_script_help_runs_without_a_lighthouse(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--outer-steps" in result.stdout


def test_script_arguments() -> None:
    args = train_diloco.parse_args(["--model-size", "tiny", "--data", "a", "--data", "b"])
    assert (args.outer_steps, args.sync_every, args.model_size) == (20, 50, "tiny")
    assert args.data == ["a", "b"]
    with pytest.raises(SystemExit):
        train_diloco.parse_args(["--sync-every", "0"])


def test_every_group_builds_the_same_model() -> None:
    a = train_diloco.build_model("tiny", seed=5).state_dict()
    torch.rand(10)  # whatever happened to the global generator in between
    b = train_diloco.build_model("tiny", seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_groups_and_ranks_read_disjoint_batches() -> None:
    # Random bytes: no two windows are equal, so equal rows mean the same window.
    corpus = bytes(
        torch.randint(0, 256, (10_000,), generator=torch.Generator().manual_seed(0)).tolist()
    )
    seen: list[set[bytes]] = []
    for group in range(2):
        for rank in range(2):
            cfg = config(replica_group_id=str(group), num_replica_groups=2, rank=rank, world_size=2)
            loader = train_diloco.build_loader(corpus, 16, 4, seed=0, config=cfg)
            seen.append({bytes(row.tolist()) for x, _ in loader for row in x.to(torch.uint8)})
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not seen[i] & seen[j]


@pytest.mark.parametrize(
    "overrides",
    [
        {"replica_group_id": "3", "num_replica_groups": 3},
        {"replica_group_id": "1"},  # NUM_REPLICA_GROUPS unset means one group
        {"replica_group_id": "east", "num_replica_groups": 3},
    ],
)
def test_group_ids_that_cannot_be_sharded_stop_the_script(overrides: dict[str, object]) -> None:
    with pytest.raises(SystemExit, match="REPLICA_GROUP_ID"):
        train_diloco.shard_of(config(**overrides))


def test_too_little_data_for_a_batch_stops_the_script() -> None:
    with pytest.raises(SystemExit, match="--batch-size=16"):
        train_diloco.build_loader(b"x" * 1000, 64, 16, seed=0, config=config())


def test_sync_line() -> None:
    report = SyncReport(
        step=7,
        committed=False,
        participants=3,
        quorum_id=2,
        seconds=0.0421,
        bytes_sent=12_300_000,
        healed=True,
        waited=0.0101,
        hidden_fraction=0.76,
    )
    assert train_diloco.sync_line(report, 2.3141) == (
        "outer step 7 | loss 2.314 | participants 3 | sync 0.042s | sent 12.3 MB | "
        "waited 0.010s, 76% hidden | rolled back | healed"
    )
    with_eval = train_diloco.sync_line(report, 2.3141, 2.5)
    assert with_eval.startswith("outer step 7 | loss 2.314 | eval 2.500 | participants 3")


def test_progress_is_silent_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = train_diloco.Progress(enabled=True)
    progress.show("inner step 1/50")
    progress.clear()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FTDILOCO_LIGHTHOUSE": "lh:1", "RANK": "x"}, "RANK='x' is not an integer"),
        ({"FTDILOCO_LIGHTHOUSE": "lh:0"}, "FTDILOCO_LIGHTHOUSE: lighthouse address 'lh:0'"),
        ({}, "FTDILOCO_LIGHTHOUSE (or TORCHFT_LIGHTHOUSE) is not set"),
    ],
)
def test_a_configuration_error_is_one_line_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FTDILOCO", "TORCHFT"))}
    result = subprocess.run(
        [sys.executable, "-m", "ftdiloco.examples.train_diloco", "--model-size", "tiny"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"ftdiloco.examples.train_diloco: {message}")
    assert result.stderr.count("\n") == 1, result.stderr


# -- held-out evaluation, the sample, standalone -----------------------------------------


def test_the_heldout_split_is_the_same_for_every_group_and_never_trained_on() -> None:
    corpus = bytes(range(256)) * 40
    train, heldout = train_diloco.split_heldout(corpus)
    assert train + heldout == corpus and len(heldout) == len(corpus) // 10
    batches = train_diloco.heldout_batches(heldout, 16, 4, batches=3)
    assert [len(x) for x, _ in batches] == [4, 4, 4]
    again = train_diloco.heldout_batches(heldout, 16, 4, batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    model = tiny_model()
    assert train_diloco.evaluate(model, batches) == train_diloco.evaluate(model, again)
    assert model.training  # evaluation leaves the mode as it was
    with pytest.raises(SystemExit, match="held-out split"):
        train_diloco.heldout_batches(b"x" * 10, 16, 4, batches=3)


def test_the_sample_is_one_reproducible_line() -> None:
    model = tiny_model()
    text = train_diloco.sample_text(model, b"def ", 40, seed=1)
    assert text.startswith("def ") and "\n" not in text
    assert text == train_diloco.sample_text(model, b"def ", 40, seed=1)


@pytest.mark.integration
def test_standalone_trains_one_group_without_a_lighthouse(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTDILOCO", "TORCHFT"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftdiloco.examples.train_diloco",
            "--model-size",
            "tiny",
            "--outer-steps",
            "2",
            "--sync-every",
            "4",
            "--eval-every",
            "1",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**env, "FTDILOCO_LIGHTHOUSE": "none", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("standalone: FTDILOCO_LIGHTHOUSE=none, training as one group")
    steps = [line for line in lines if line.startswith("outer step")]
    assert len(steps) == 2
    assert all(" | eval " in line and "participants 1" in line for line in steps), steps
    done = next(line for line in lines if line.startswith("done |"))
    assert "2 outer steps committed" in done and " | final eval " in done
    assert lines[-1].startswith("sample | def ")


def test_the_standalone_manager_needs_the_explicit_none() -> None:
    from ftdiloco.config import ConfigError
    from ftdiloco.coordination.standalone import StandaloneManager

    with pytest.raises(ConfigError, match="FTDILOCO_LIGHTHOUSE=none"):
        StandaloneManager(config())
    manager = StandaloneManager(Config.from_env({"FTDILOCO_LIGHTHOUSE": "none"}))
    plan = manager.start_quorum()
    assert plan is not None and plan.participants == ("group0",) and not plan.heal
    tensor = torch.ones(3)
    assert manager.allreduce([tensor]).wait() and torch.equal(tensor, torch.ones(3))
    assert manager.should_commit() and manager.step == 1
