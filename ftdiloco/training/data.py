"""Which samples each process reads: one disjoint shard per (replica group, rank).

DiLoCo gains from its groups only if they learn from different data: groups
that read the same batches produce the same pseudo-gradients, and averaging
those buys nothing.  :class:`ShardSampler` splits one epoch's order among
every rank of every group, and needs no communication to do it: each process
computes the same order from ``(seed, epoch)`` and keeps its own slice.

The sampler also remembers how far it got, as two plain integers, so that a
checkpoint (or a peer, when a group heals) can carry the data position along
with the weights instead of replaying samples already learned from.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator, Mapping

import torch
from torch.utils.data import Sampler


def _order_seed(seed: int, epoch: int) -> int:
    """A generator seed for one epoch that no other (seed, epoch) pair shares.

    ``seed + epoch`` (the usual choice) would give run ``seed=1`` the order
    of run ``seed=0`` one epoch later; hashing the pair keeps runs apart.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in an int64


class ShardSampler(Sampler[int]):
    """Yields this process's shard of ``range(num_samples)``, one epoch per pass.

    The ``num_replica_groups * world_size`` shards of an epoch are disjoint
    and equally long; the ragged tail (fewer than one sample per shard) is
    left out, so that every rank runs the same number of steps and none waits
    at a collective for a batch that another rank never has.

    A pass continues from the current position, and handing out an epoch's
    last sample moves the sampler to the start of the next epoch; so a
    training loop can simply iterate again, and a sampler restored with
    :meth:`load_state_dict` picks up exactly where the saved one stopped.
    The position counts samples handed out, which is what training consumed
    when the ``DataLoader`` has no worker processes (workers prefetch ahead).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        replica_group: int,
        num_replica_groups: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if num_replica_groups < 1:
            raise ValueError(f"num_replica_groups={num_replica_groups} must be >= 1")
        if not 0 <= replica_group < num_replica_groups:
            raise ValueError(
                f"replica_group={replica_group} must be in [0, {num_replica_groups}) "
                f"(num_replica_groups={num_replica_groups})"
            )
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, {world_size}) (world_size={world_size})")
        num_shards = num_replica_groups * world_size
        if num_samples < num_shards:
            raise ValueError(
                f"num_samples={num_samples} is too few for {num_replica_groups} replica "
                f"group(s) x {world_size} rank(s): every shard needs at least one sample"
            )
        self.num_samples = num_samples
        self.num_shards = num_shards
        self.shard = replica_group * world_size + rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples // self.num_shards

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.epoch = epoch
        self.position = 0

    def indices(self, epoch: int) -> list[int]:
        """This shard's samples for ``epoch``, in the order they are handed out."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(_order_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.shard : len(self) * self.num_shards : self.num_shards]

    def __iter__(self) -> Iterator[int]:
        shard = self.indices(self.epoch)
        for index in shard[self.position :]:
            # Advance before yielding: the consumer may stop (or save the
            # state) right after taking this sample and never resume us.
            self.position += 1
            if self.position == len(shard):
                self.epoch, self.position = self.epoch + 1, 0
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # operator.index takes ints from anywhere (numpy, 0-d tensors) but no floats.
        epoch, position = operator.index(state["epoch"]), operator.index(state["position"])
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if not 0 <= position < len(self):
            # A position from a differently sharded run would silently
            # skip or repeat data; refuse it instead.
            raise ValueError(f"position={position} must be in [0, {len(self)}) for this shard")
        self.epoch, self.position = epoch, position
