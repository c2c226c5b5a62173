"""ShardSampler: every (group, rank) reads its own data, reproducibly, and resumes exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ftdiloco.training.data import ShardSampler


def shards(
    num_samples: int, groups: int, world_size: int, *, epoch: int = 0, **kwargs: bool | int
) -> list[list[int]]:
    """Every (group, rank)'s epoch, in group-major order."""
    out = []
    for group, rank in itertools.product(range(groups), range(world_size)):
        sampler = ShardSampler(
            num_samples,
            replica_group=group,
            num_replica_groups=groups,
            rank=rank,
            world_size=world_size,
            **kwargs,  # type: ignore[arg-type]
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(
    ("num_samples", "groups", "world_size"),
    [(1, 1, 1), (10, 1, 1), (100, 3, 1), (101, 2, 2), (7, 7, 1), (1000, 3, 4), (23, 1, 5)],
)
def test_shards_are_disjoint_equal_and_cover_all_but_the_tail(
    num_samples: int, groups: int, world_size: int, shuffle: bool
) -> None:
    result = shards(num_samples, groups, world_size, epoch=3, shuffle=shuffle)
    num_shards = groups * world_size
    per_shard = num_samples // num_shards
    assert [len(s) for s in result] == [per_shard] * num_shards
    flat = [i for s in result for i in s]
    assert len(set(flat)) == len(flat), "shards overlap"
    assert set(flat) <= set(range(num_samples))
    assert num_samples - len(flat) < num_shards, "more than the ragged tail was dropped"


def test_without_shuffle_the_order_is_the_identity_split_round_robin() -> None:
    assert shards(10, 2, 1, shuffle=False) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def test_same_arguments_give_the_same_order() -> None:
    assert shards(500, 3, 2, epoch=5, seed=7) == shards(500, 3, 2, epoch=5, seed=7)


def test_epochs_and_seeds_change_the_order() -> None:
    epoch0 = shards(500, 2, 1, epoch=0)
    assert shards(500, 2, 1, epoch=1) != epoch0
    assert shards(500, 2, 1, epoch=0, seed=1) != epoch0
    # Not merely shifted by one: seed 1's epoch 0 is not seed 0's epoch 1.
    assert shards(500, 2, 1, epoch=0, seed=1) != shards(500, 2, 1, epoch=1, seed=0)


def test_a_pass_moves_to_the_next_epoch() -> None:
    sampler = ShardSampler(50, replica_group=1, num_replica_groups=2)
    first, second = list(sampler), list(sampler)
    assert first == sampler.indices(0)
    assert second == sampler.indices(1)
    assert sampler.state_dict() == {"epoch": 2, "position": 0}


@pytest.mark.parametrize("stop_after", [0, 1, 17, 24, 25, 26, 60])
def test_resuming_from_a_saved_position_continues_identically(stop_after: int) -> None:
    def make() -> ShardSampler:
        return ShardSampler(100, replica_group=0, num_replica_groups=2, seed=3)

    reference = make()
    expected = [i for _ in range(4) for i in reference]  # four uninterrupted epochs

    interrupted = make()
    consumed: list[int] = []
    while len(consumed) < stop_after:
        consumed.extend(itertools.islice(interrupted, stop_after - len(consumed)))
    state = interrupted.state_dict()
    assert all(type(v) is int for v in state.values())

    resumed = make()
    resumed.load_state_dict(state)
    while len(consumed) < len(expected):
        consumed.extend(resumed)
    assert consumed[: len(expected)] == expected


def test_dataloader_position_counts_the_samples_trained_on() -> None:
    dataset = TensorDataset(torch.arange(40))
    sampler = ShardSampler(40, replica_group=0, num_replica_groups=1, seed=1)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    seen = []
    for step, (batch,) in enumerate(loader):
        seen.append(batch)
        if step == 2:
            break
    assert sampler.state_dict() == {"epoch": 0, "position": 12}
    rest = [batch for (batch,) in loader]
    assert torch.cat(seen + rest).tolist() == sampler.indices(0)


def test_load_state_dict_accepts_integer_tensors() -> None:
    sampler = ShardSampler(10, replica_group=0, num_replica_groups=1)
    sampler.load_state_dict({"epoch": torch.tensor(2), "position": torch.tensor(3)})  # type: ignore[dict-item]
    assert sampler.state_dict() == {"epoch": 2, "position": 3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_replica_groups": 0}, "num_replica_groups=0"),
        ({"replica_group": 3}, "replica_group=3"),
        ({"replica_group": -1}, "replica_group=-1"),
        ({"world_size": 0}, "world_size=0"),
        ({"rank": 2, "world_size": 2}, "rank=2"),
        ({"num_samples": 5, "num_replica_groups": 3, "world_size": 2}, "num_samples=5"),
        ({"num_samples": 0}, "num_samples=0"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(kwargs: dict[str, int], message: str) -> None:
    arguments = {"num_samples": 100, "replica_group": 0, "num_replica_groups": 3} | kwargs
    num_samples = arguments.pop("num_samples")
    with pytest.raises(ValueError, match=message):
        ShardSampler(num_samples, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"epoch": -1, "position": 0}, "epoch=-1"),
        ({"epoch": 0, "position": 50}, "position=50"),
        ({"epoch": 0, "position": -1}, "position=-1"),
    ],
)
def test_bad_states_are_refused(state: dict[str, int], message: str) -> None:
    sampler = ShardSampler(100, replica_group=0, num_replica_groups=2)
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(state)


def test_fractional_positions_and_negative_epochs_are_refused() -> None:
    sampler = ShardSampler(100, replica_group=0, num_replica_groups=2)
    with pytest.raises(TypeError):
        sampler.load_state_dict({"epoch": 0, "position": 1.5})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="epoch=-2"):
        sampler.set_epoch(-2)
