"""What a training script reports about its outer steps, as structured events.

The example prints a line for people after every outer step; next to it,
group rank 0 writes the same facts as one JSON line that programs read (the
launcher's status line, summary and ``steps.jsonl``).  Neither side parses
text meant for people, and any script that emits these events gets the
launcher's summary.  This module imports no torch: the launcher uses it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import IO, Any, Protocol

from ftwire import protocol

# Every event line starts with this, so a reader skips the rest without
# trying to decode it, and a person sees at once what the line is for.
PREFIX = "ftdiloco-event "
STEP = "outer_step"
DONE = "done"


class _Report(Protocol):
    """The fields of ftdiloco.training.outer_loop.SyncReport an event carries."""

    @property
    def step(self) -> int: ...
    @property
    def committed(self) -> bool: ...
    @property
    def healed(self) -> bool: ...
    @property
    def participants(self) -> int: ...


@dataclass(frozen=True)
class StepEvent:
    """One outer step of a group, as its group rank 0 saw it."""

    step: int
    committed: bool
    healed: bool
    participants: int
    loss: float | None
    eval_loss: float | None = None

    @classmethod
    def of(cls, report: _Report, loss: float, eval_loss: float | None = None) -> StepEvent:
        return cls(
            report.step, report.committed, report.healed, report.participants, loss, eval_loss
        )


@dataclass(frozen=True)
class DoneEvent:
    """The end of a group's training: its final losses."""

    committed: int
    rolled_back: int
    loss: float | None
    eval_loss: float | None


def emit(event: StepEvent | DoneEvent, stream: IO[str] | None = None) -> None:
    """Write ``event`` as one line (JSON; NaN and infinities as null)."""
    kind = STEP if isinstance(event, StepEvent) else DONE
    fields = {k: _finite(v) for k, v in asdict(event).items()}
    line = PREFIX + json.dumps({"kind": kind, **fields}, allow_nan=False)
    print(line, file=stream or sys.stdout, flush=True)


def parse(line: str) -> StepEvent | DoneEvent | None:
    """The event on ``line``, or None for any other line (or a malformed event)."""
    if not line.startswith(PREFIX):
        return None
    try:
        message = json.loads(line[len(PREFIX) :])
        if not isinstance(message, dict):
            return None
        kind = protocol.read_text(message, "kind", 32)
        if kind == STEP:
            return StepEvent(
                step=protocol.read_count(message, "step", 0),
                committed=protocol.read_field(message, "committed", bool),
                healed=protocol.read_field(message, "healed", bool),
                participants=protocol.read_count(message, "participants", 0),
                loss=_number(message, "loss"),
                eval_loss=_number(message, "eval_loss"),
            )
        if kind == DONE:
            return DoneEvent(
                committed=protocol.read_count(message, "committed", 0),
                rolled_back=protocol.read_count(message, "rolled_back", 0),
                loss=_number(message, "loss"),
                eval_loss=_number(message, "eval_loss"),
            )
    except (ValueError, protocol.ProtocolError):
        return None
    return None


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(message: dict[str, Any], name: str) -> float | None:
    if message.get(name) is None:
        return None
    return float(protocol.read_field(message, name, float))
