"""The lines the example prints, read back for the launcher's summary and status."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# The lines the example script prints; any script that prints them gets a summary.
#   outer step 7 | loss 2.314 | participants 3 | sync 0.042s | sent 12.3 MB | committed
#   done | 20 outer steps committed, 1 rolled back | ... | final loss 2.101
_STEP = re.compile(
    r"outer step (?P<step>\d+) \| loss (?P<loss>\S+) \|.*\| (?P<outcome>committed|rolled back)"
    r"(?P<healed> \| healed)?"
)
_DONE = re.compile(r"^done \|.*final loss (?P<loss>\S+)")
# Held-out loss, in a step line (`| eval 2.401 |`) and in the done line (`| final eval 2.399`).
_EVAL = re.compile(r"\| (?:final )?eval (?P<eval>[^\s|]+)")


@dataclass(frozen=True)
class StepLine:
    step: int
    loss: float
    committed: bool
    healed: bool
    eval_loss: float | None = None  # held-out loss, on steps that evaluate


def parse_step_line(line: str) -> StepLine | None:
    """The outer-step line of the training script, or None for any other line."""
    m = _STEP.search(line)
    if m is None:
        return None
    return StepLine(
        step=int(m["step"]),
        loss=_float(m["loss"]),
        committed=m["outcome"] == "committed",
        healed=m["healed"] is not None,
        eval_loss=parse_eval(line),
    )


def parse_eval(line: str) -> float | None:
    """The held-out loss in a step or done line, if it has one."""
    m = _EVAL.search(line)
    return None if m is None else _float(m["eval"])


def parse_done_line(line: str) -> float | None:
    """The final loss from the script's ``done | ...`` line, or None for any other line."""
    m = _DONE.search(line.strip())
    return None if m is None else _float(m["loss"])


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan
