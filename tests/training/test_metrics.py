"""metrics.jsonl: the one reader every consumer (compare, reports, the model card, the oracle bench) uses."""

from __future__ import annotations

from pathlib import Path

from glmlab.runs import read_metrics
from glmlab.training.metrics import MetricsLog


def test_read_metrics_keeps_the_readable_records_in_order(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # a run that never wrote one
    path.write_text('{"step": 1, "split": "train", "loss": 2.5}\n[1, 2]\n\n'
                    '{"step": 2, "split": "val", "loss": 2.0}\n{"step": 3, "spl', encoding="utf-8")
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 2.5}, {"step": 2, "split": "val", "loss": 2.0}]


def test_a_resumed_log_keeps_the_records_up_to_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo', encoding="utf-8")
    log = MetricsLog(path, resume_step=1)
    log.write({"step": 2, "loss": 1.5})
    log.close()
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5}]
