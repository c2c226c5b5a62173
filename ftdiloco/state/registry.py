"""The replicated state of a group, by name: what heals and checkpoints carry.

Training code registers each piece (DiLoCo its backups and optimizer state,
LocalSGD its weights) as a pair of callbacks; heals and checkpoints see one
flat namespace of tensors, ``<name>/<key>``, and hand loaded tensors back to
the piece they belong to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: the registry itself never touches a tensor's data
    import torch

StateSave = Callable[[], "dict[str, torch.Tensor]"]
StateLoad = Callable[["dict[str, torch.Tensor]"], None]


@dataclass(frozen=True)
class _State:
    save: StateSave
    load: StateLoad


class StateRegistry:
    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def __bool__(self) -> bool:
        return bool(self._states)

    def register(self, name: str, save: StateSave, load: StateLoad) -> None:
        if "/" in name or name in self._states:
            raise ValueError(f"state name {name!r} is taken or contains '/'")
        self._states[name] = _State(save, load)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every registered tensor, as ``<name>/<key>``."""
        return {
            f"{name}/{key}": tensor
            for name, state in self._states.items()
            for key, tensor in state.save().items()
        }

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Hand each piece its own tensors (their names without the ``<name>/`` prefix)."""
        for name, state in self._states.items():
            prefix = f"{name}/"
            state.load({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
