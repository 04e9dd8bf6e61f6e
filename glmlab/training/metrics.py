"""Writing metrics.jsonl (one JSON record per line; :func:`glmlab.runs.read_metrics` reads it) and the loss.png
plot drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from glmlab import atomic
from glmlab.runs import read_metrics


class MetricsLog:
    """Appends records to metrics.jsonl; on resume, drops records from steps after the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.enabled = enabled
        self._file = None
        if not enabled:  # a non-zero rank of a distributed run: writes nothing
            return
        if resume_step is not None:
            self.records = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - open for the run

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss (each log line) and validation loss (each evaluation) against step, as a PNG. Drawn with
    matplotlib's object API (no pyplot state) and fixed margins: a run redraws it at every evaluation, and
    pyplot's figure manager with ``tight_layout`` cost twice the time (0.2 vs 0.09 s a plot on this VM)."""
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and math.isfinite(r["loss"])]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and math.isfinite(r["loss"])]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", alpha=0.7, linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val", linewidth=1.5, markersize=3)
        best = min(val, key=lambda sv: sv[1])
        ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
