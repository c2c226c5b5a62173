"""ftdiloco: fault-tolerant DiLoCo training for replica groups that come and go.

The names a training script needs are importable from here::

    from ftdiloco import Config, DiLoCo, LocalSGD, Manager, ShardSampler, SyncReport

They are imported on first use, so ``import ftdiloco`` (and the ``ftdiloco``
command, the launcher, the lighthouse) work without torch.  The training side
needs the ``train`` extra (torch, safetensors, numpy); without it, asking for
one of its names raises an ImportError whose one-line message says what to
install.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftdiloco.config import Config
    from ftdiloco.coordination.manager import Manager
    from ftdiloco.training.data import ShardSampler
    from ftdiloco.training.diloco import DiLoCo
    from ftdiloco.training.local_sgd import LocalSGD
    from ftdiloco.training.outer_loop import SyncReport

__all__ = ["Config", "DiLoCo", "LocalSGD", "Manager", "ShardSampler", "SyncReport"]

# Where each public name lives.
_HOMES: dict[str, str] = {
    "Config": "ftdiloco.config",
    "DiLoCo": "ftdiloco.training.diloco",
    "LocalSGD": "ftdiloco.training.local_sgd",
    "Manager": "ftdiloco.coordination.manager",
    "ShardSampler": "ftdiloco.training.data",
    "SyncReport": "ftdiloco.training.outer_loop",
}

# Top-level packages of the `train` extra (pyproject.toml).
TRAIN_EXTRA_PACKAGES = frozenset({"torch", "safetensors", "numpy", "xxhash"})
TRAIN_EXTRA_HINT = "pip install 'ftdiloco[train]'"


class MissingExtraError(ImportError):
    """The training side was asked for but the ``train`` extra is not installed."""


def missing_extra_message(what: str, error: ModuleNotFoundError) -> str | None:
    """The one-line message for ``error`` if a package of the train extra is missing."""
    missing = (error.name or "").partition(".")[0]
    if missing not in TRAIN_EXTRA_PACKAGES:
        return None
    return f"{what} needs the training extra ({missing} is not installed): {TRAIN_EXTRA_HINT}"


def train_extra_missing(what: str) -> str | None:
    """The one-line message if a package of the train extra is missing, else None.

    Finds the packages without importing them, so a script can check before
    its own ``import torch`` and exit with the message instead of a traceback.
    """
    for package in sorted(TRAIN_EXTRA_PACKAGES):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a None in sys.modules, a broken package
            found = False
        if not found:
            return f"{what} needs the training extra ({package} is not installed): " + (
                TRAIN_EXTRA_HINT
            )
    return None


def import_training(module: str, what: str | None = None) -> Any:
    """Import a training-side module, or raise :class:`MissingExtraError` in one line.

    ``what`` names what the user asked for in the message (default: ``module``).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        message = missing_extra_message(what or module, e)
        if message is None:
            raise
        raise MissingExtraError(message, name=e.name) from None


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ftdiloco' has no attribute {name!r}")
    value = getattr(import_training(home, f"ftdiloco.{name}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
