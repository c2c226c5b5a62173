"""``ftdiloco launch --stages N --workers-per-stage M``: a DiLoCo-SWARM job on this machine.

The launcher runs it as it runs replica groups -- one child per stage worker,
streamed, restarted after ``--kill-every``, summed up at the end -- and this
module says what differs: the lighthouse serves one room per stage, each
child is ``python -m ftdiloco.examples.train_swarm`` for its stage (one
process: a stage worker has no ranks of its own), and a worker's
``REPLICA_GROUP_ID`` / ``NUM_REPLICA_GROUPS`` are its place in its stage.
Torch-free, like the rest of the launcher.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

SWARM_MODULE = "ftdiloco.examples.train_swarm"


def stage_room(stage: int) -> str:
    """The lighthouse room of a stage: one rule for the launcher and the workers."""
    return f"stage{stage}"


@dataclass(frozen=True)
class StageLayout:
    """``stages`` pipeline stages of ``workers_per_stage`` workers; launcher group i is
    worker ``i % workers_per_stage`` of stage ``i // workers_per_stage``."""

    stages: int
    workers_per_stage: int

    def __post_init__(self) -> None:
        if self.stages < 2:
            raise ValueError(f"a pipeline needs at least 2 stages, got --stages {self.stages}")
        if self.workers_per_stage < 1:
            raise ValueError(f"--workers-per-stage must be >= 1, got {self.workers_per_stage}")

    def check(self, groups: int, nproc_per_node: int, script: str | None) -> None:
        """The launcher's other options, as far as they concern a pipeline."""
        if groups != self.workers:
            raise ValueError(f"groups={groups}, but {self.stages} stages x "
                             f"{self.workers_per_stage} workers are {self.workers}")  # fmt: skip
        if nproc_per_node != 1 or script is not None:
            raise ValueError(
                f"--stages runs {SWARM_MODULE}, one process per stage worker: "
                "no --script or --nproc-per-node"
            )

    @property
    def workers(self) -> int:
        return self.stages * self.workers_per_stage

    def place(self, index: int) -> tuple[int, int]:
        """(stage, worker within the stage) of launcher group ``index``."""
        return divmod(index, self.workers_per_stage)

    def name(self, index: int) -> str:
        stage, worker = self.place(index)
        return f"stage{stage}.worker{worker}"

    def lighthouse_args(self) -> list[str]:
        return ["--rooms", ",".join(stage_room(s) for s in range(self.stages))]

    def command(self, index: int) -> list[str]:
        """The child's command line, before the user's script arguments."""
        stage, _ = self.place(index)
        return [
            sys.executable,
            "-m",
            SWARM_MODULE,
            "--stage",
            str(stage),
            "--stages",
            str(self.stages),
        ]

    def env(self, index: int) -> dict[str, str]:
        """The worker's identity within its stage's room (each room is a job of its own)."""
        _, worker = self.place(index)
        return {"REPLICA_GROUP_ID": str(worker), "NUM_REPLICA_GROUPS": str(self.workers_per_stage)}

    def describe(self, status: dict[str, Any] | None) -> str:
        """The summary's pipeline line, or the status line's quorum part: each room's last
        quorum (its members) from the lighthouse's ``/status``."""
        rooms = (status or {}).get("rooms", {})
        parts = []
        for s in range(self.stages):
            room = rooms.get(stage_room(s), {})
            members = ",".join(str(m) for m in room.get("members", []))
            parts.append(f"{stage_room(s)} [{members}]" if members else f"{stage_room(s)} forming")
        return " ".join(parts)
