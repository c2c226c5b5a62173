"""Cutting a model into pipeline stages.

A model given as an ordered list of layers (an ``nn.Sequential``, or the
layers a script lists itself) is cut into ``n`` consecutive runs of about
equal parameter count: each stage then costs its workers about the same
memory, and each boundary carries one activation tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn


def balanced_cuts(sizes: Sequence[int], n: int) -> list[int]:
    """Start indices of ``n`` consecutive, non-empty runs of ``sizes`` of about equal sum.

    Greedy on the running total: run k ends once the total passes k/n of the
    whole, keeping at least one item for each run still to come.
    """
    if not 1 <= n <= len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} layers into {n} stages")
    total = sum(sizes)
    cuts, running = [0], 0
    for i, size in enumerate(sizes[:-1]):
        running += size
        left = len(sizes) - (i + 1)  # items after this one
        stages_to_come = n - len(cuts)
        if stages_to_come and (running * n >= total * len(cuts) or left == stages_to_come):
            cuts.append(i + 1)
    return cuts


def split_layers(layers: Sequence[nn.Module], n: int) -> list[nn.Sequential]:
    """``layers`` as ``n`` stages, each an ``nn.Sequential`` of consecutive layers.

    Each worker of a job builds the model and keeps only its own stage, so
    weights tied across a cut (an output head sharing the embedding) train
    apart from then on, one copy per stage.
    """
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    cuts = [*balanced_cuts(sizes, n), len(layers)]
    return [nn.Sequential(*layers[a:b]) for a, b in itertools.pairwise(cuts)]
