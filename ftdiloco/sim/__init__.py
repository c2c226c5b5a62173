"""Simulate N DiLoCo workers in one process, with failures and a network model.

``from ftdiloco.sim import DilocoSimulator`` runs a script written for
diloco-sim unchanged; see :mod:`ftdiloco.sim.simulator`.
"""

from ftdiloco.sim.failures import Failure, FailurePlan
from ftdiloco.sim.network import NetworkModel, WhatIf, what_if
from ftdiloco.sim.simulator import DilocoSimulator, EvalStats, SimResult, TrainStats

__all__ = [
    "DilocoSimulator",
    "EvalStats",
    "Failure",
    "FailurePlan",
    "NetworkModel",
    "SimResult",
    "TrainStats",
    "WhatIf",
    "what_if",
]
