"""What ``--out DIR`` keeps of a run: logs, per-step JSONL, events, the summary and plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, TextIO


def json_float(value: float | None) -> float | None:
    """JSON has no NaN: a missing number is null."""
    return None if value is None or math.isnan(value) else value


class Record:
    """What ``--out DIR`` keeps: every child's log, steps.jsonl, events.jsonl, summary, plots."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self._logs: dict[str, TextIO] = {}
        self._steps = open(os.path.join(root, "steps.jsonl"), "w", encoding="utf-8")  # noqa: SIM115
        self._events = open(os.path.join(root, "events.jsonl"), "w", encoding="utf-8")  # noqa: SIM115
        self.steps: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def log(self, name: str, line: str) -> None:
        stream = self._logs.get(name)
        if stream is None:
            path = os.path.join(self.root, f"{name}.log")
            stream = self._logs[name] = open(path, "a", encoding="utf-8")  # noqa: SIM115
        stream.write(line + "\n")
        stream.flush()

    def step(self, record: dict[str, Any]) -> None:
        self.steps.append(record)
        self._steps.write(json.dumps(record) + "\n")
        self._steps.flush()

    def event(self, t: float, kind: str, **fields: Any) -> None:
        record = {"t": t, "event": kind, **fields}
        self.events.append(record)
        self._events.write(json.dumps(record) + "\n")
        self._events.flush()

    def close(self) -> None:
        for stream in [*self._logs.values(), self._steps, self._events]:
            stream.close()

    def write_summary(self, document: dict[str, Any]) -> None:
        with open(os.path.join(self.root, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")

    def plot(self) -> str | None:
        """loss.png; a one-line reason instead when it cannot be drawn."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return (
                "--out: no plots (matplotlib is not installed: pip install 'ftdiloco[sim]'); "
                "the JSONL and the summary are there"
            )
        figure, axes = plt.subplots(figsize=(9, 5))
        groups = sorted({r["group"] for r in self.steps})
        for index in groups:
            mine = [r for r in self.steps if r["group"] == index and r["loss"] is not None]
            (line,) = axes.plot(
                [r["t"] for r in mine], [r["loss"] for r in mine], label=f"group{index} train"
            )
            evals = [r for r in mine if r["eval_loss"] is not None]
            if evals:
                axes.plot(
                    [r["t"] for r in evals],
                    [r["eval_loss"] for r in evals],
                    "o--",
                    color=line.get_color(),
                    markersize=3,
                    label=f"group{index} held-out",
                )
        for i, e in enumerate(x for x in self.events if x["event"] == "kill"):
            axes.axvline(e["t"], color="red", linestyle=":", label="kill" if i == 0 else None)
        for i, e in enumerate(x for x in self.events if x["event"] == "recovered"):
            axes.axvline(
                e["t"], color="green", linestyle="--", label="recovered" if i == 0 else None
            )
        axes.set_xlabel("seconds since launch")
        axes.set_ylabel("loss")
        axes.set_title("ftdiloco launch: loss per group (kills and recoveries marked)")
        if groups:
            axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(os.path.join(self.root, "loss.png"), dpi=100)
        plt.close(figure)
        return None
