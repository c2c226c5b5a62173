"""Small helpers shared by the benchmark scripts: flags, percentiles, the result table.

Every benchmark prints one table (scenario, metric, value, goal, met?) and can
write its headline numbers to a JSON file, so CI and people read the same
results.  Kept deliberately tiny: scripts own their measurements, this only
formats them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: --quick (CI-sized) and --json PATH."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions; under a minute")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the metrics here")
    return p


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): always a value that was measured.

    With fewer than 100 samples the p99 is the maximum, which is the honest
    reading of "99 % of rounds were at most this".
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Row:
    """One line of the table; ``met`` is None where the metric has no goal."""

    scenario: str
    metric: str
    value: str
    goal: str = ""
    met: bool | None = None


def print_table(rows: Sequence[Row]) -> None:
    header = ("scenario", "metric", "value", "goal", "met?")
    cells = [
        (r.scenario, r.metric, r.value, r.goal, "" if r.met is None else ("yes" if r.met else "NO"))
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def write_json(path: Path | None, metrics: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
