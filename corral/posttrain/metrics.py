"""Held-out metrics of a fine-tuning run, and the picture of all its metrics.

The shared loop logs each training step to metrics.jsonl (and TensorBoard under train/); the held-out
evaluation of an objective has several numbers (loss, reward accuracy, margin ...), so ``EvalLog``
appends them to the same metrics.jsonl as ``{"step", "event": "eval", ...}`` records (read_metrics skips
events) and to TensorBoard under val/. ``plot_metrics`` draws every numeric series of both into one PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

_NOT_PLOTTED = {"step", "lr", "tokens_seen", "step_s", "applied", "mfu", "tokens_per_s"}


class EvalLog:
    """Append held-out metrics to <run>/metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.last: dict[str, float] = {}
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.last = dict(metrics)
        if not self.enabled or not metrics:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "event": "eval", **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_series(path: str | Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """(training series, held-out series): name -> [(step, value)], the last record of each step kept."""
    train: dict[int, dict[str, Any]] = {}
    held: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            held[record["step"]] = record
        elif "event" not in record and "loss" in record:
            train[record["step"]] = record
    return _series(train), _series(held)


def _series(records: dict[int, dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(records):
        for key, value in records[step].items():
            if key in _NOT_PLOTTED or key == "event" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(key, []).append((step, float(value)))
    return out


def plot_metrics(metrics_path: str | Path, out: str | Path) -> Path:
    """One panel per metric (training line, held-out points) written as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    train, held = read_series(metrics_path)
    names = sorted(set(train) | {k.removeprefix("val_") for k in held} - {"tokens", "trained_tokens"})
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        if name in train:
            steps, values = zip(*train[name])
            ax.plot(steps, values, lw=1, label="train")
        for key in (name, f"val_{name}"):
            if key in held:
                steps, values = zip(*held[key])
                ax.plot(steps, values, "o-", ms=4, label="held out")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
