"""What a simulated run leaves in ``save_dir``.

- ``metrics.jsonl``: one JSON object per event (``train`` per local step,
  ``eval``, ``sync`` per outer step, ``failure``, ``rejoin``), in order;
- ``summary.json``: the run's settings and totals (:class:`SimResult`);
- ``loss.png``: train and eval loss against local steps (needs matplotlib:
  ``pip install 'ftdiloco[sim]'``; skipped with a warning without it);
- ``model_iter_<local step>.pth`` (a plain state_dict, as diloco-sim writes
  it) with a ``.safetensors`` twin, which is what :meth:`DilocoSimulator.train`
  reads back (this library never unpickles);
- ``checkpoints/group<i>/rank-0/step-<N>/``: each live worker's replicated
  state in the real jobs' format (:mod:`ftdiloco.state.checkpoint`), so a real job
  with ``FTDILOCO_CHECKPOINT_DIR=<save_dir>/checkpoints`` resumes from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import structlog
import torch

from ftdiloco.state.checkpoint import rank_directory, save_checkpoint

log = structlog.get_logger("ftdiloco.sim")


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Recorder:
    """Collects events in memory (for the plot and the result) and appends them to JSONL."""

    def __init__(self, save_dir: Path | None) -> None:
        self.save_dir = save_dir
        self.events: list[dict[str, Any]] = []
        self._file: IO[str] | None = None
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(save_dir / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def event(self, kind: str, **fields: Any) -> None:
        record = {"event": kind, **fields}
        self.events.append(record)
        if self._file is not None:
            self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if self.save_dir is not None:
            text = json.dumps(_finite(dict(summary)), indent=1, allow_nan=False)
            (self.save_dir / "summary.json").write_text(text + "\n", encoding="utf-8")

    def plot(self, title: str) -> Path | None:
        if self.save_dir is None:
            return None
        return plot_losses({title: self.events}, self.save_dir / "loss.png")


def plot_losses(runs: Mapping[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One loss curve per run (train: thin, eval: markers); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot", path=str(path))
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, events in runs.items():
        train = [(e["local_step"], e["loss"]) for e in events if e["event"] == "train"]
        evals = [(e["local_step"], e["loss"]) for e in events if e["event"] == "eval"]
        if train:
            xs, ys = zip(*_smooth(train), strict=True)
            (line,) = ax.plot(xs, ys, linewidth=1, label=f"{name} (train)")
            color = line.get_color()
        else:
            color = None
        if evals:
            xs, ys = zip(*evals, strict=True)
            ax.plot(xs, ys, "o--", color=color, markersize=3, label=f"{name} (eval)")
    ax.set_xlabel("local step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(points: list[tuple[int, float]], window: int = 20) -> list[tuple[int, float]]:
    """A trailing mean, so the curve's trend shows through per-batch noise."""
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y
        if i >= window:
            total -= points[i - window][1]
        out.append((x, total / min(i + 1, window)))
    return out


def save_model(save_dir: Path, local_step: int, state: Mapping[str, torch.Tensor]) -> Path:
    """``model_iter_<local_step>.pth`` (plain state_dict) and its ``.safetensors`` twin."""
    # Clones: tied weights share storage, which safetensors refuses to write twice.
    host = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    path = save_dir / f"model_iter_{local_step}.pth"
    torch.save(host, path)
    safetensors.torch.save_file(host, str(path.with_suffix(".safetensors")))
    return path


def load_model_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights for :meth:`DilocoSimulator.train`: a ``.safetensors`` file, or a ``.pth`` we wrote.

    A ``.pth`` is a pickle; it is read through the ``.safetensors`` twin this
    simulator writes next to it.  A ``.pth`` from elsewhere is refused rather
    than unpickled: convert it once, where you trust it.
    """
    p = Path(path)
    candidates = [p] if p.suffix == ".safetensors" else [p.with_suffix(".safetensors")]
    for candidate in candidates:
        if candidate.is_file():
            return safetensors.torch.load_file(str(candidate))
    if not p.exists():
        raise FileNotFoundError(f"model_path {str(p)!r}: no such file")
    raise ValueError(
        f"model_path {str(p)!r} is a pickle without a .safetensors twin, and this simulator "
        "never unpickles; convert it where you trust it: "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), "
        f"{str(p.with_suffix('.safetensors'))!r})"
    )


def save_job_checkpoint(
    root: Path, replica_id: str, step: int, tensors: Mapping[str, torch.Tensor], local_step: int
) -> Path:
    """A worker's state where a real job's group ``replica_id`` (rank 0) keeps its checkpoints."""
    return save_checkpoint(
        rank_directory(root, replica_id, 0),
        step,
        tensors,
        {"group_rank": 0, "group_size": 1, "user": {"simulated": True, "local_step": local_step}},
        replica_id=replica_id,
    )
