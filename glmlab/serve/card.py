"""A run's model card for the playground and ``GET /v1/models/{id}``: family, size, tokenizer, training
data and the latest training figures, read from the run directory, and what it can do (infill, decode left to
right). It names files and folders, never where they are on the server's disk (no local paths in responses)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmlab.runs import METRICS, LoadedRun, read_metrics


def _metrics(run_dir: Path) -> dict[str, Any]:
    """The last training line and the last evaluation of ``metrics.jsonl`` (what is readable of it)."""
    out: dict[str, Any] = {}
    last_train = last_val = None
    for record in read_metrics(run_dir / METRICS):
        if record.get("split") == "train":
            last_train = record
        elif record.get("split") == "val":
            last_val = record
    if last_train:
        out.update(steps=last_train.get("step"), train_loss=last_train.get("loss"),
                   training_seconds=last_train.get("elapsed"))
    if last_val:
        out.update(val_loss=last_val.get("loss"), best_val_loss=last_val.get("best_loss"))
    return out


def _data(raw: dict[str, Any]) -> dict[str, Any]:
    data = dict(raw.get("data") or {})
    meta_path = Path(data["dir"]) / "meta.json" if isinstance(data.get("dir"), str) and data["dir"] else None
    if "dir" in data:
        data["dir"] = _name(data["dir"])
    if meta_path is not None and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        sources = meta.get("sources") or []
        data["sources"] = [_name(s.get("path", s) if isinstance(s, dict) else s) for s in sources][:10]
        splits = meta.get("splits") or {}
        if isinstance(splits, dict) and isinstance(splits.get("train"), dict):
            data["train_tokens"] = splits["train"].get("tokens")
    return data


def _name(path: Any) -> Any:
    """A path's last part (a file's or folder's name); anything else as it is."""
    return Path(path).name if isinstance(path, str) and path else path


def model_card(run: LoadedRun, name: str, checkpoint: str) -> dict[str, Any]:
    model = run.model
    return {
        "id": name,
        "family": run.config.model.family,
        "parameters": model.num_parameters(),
        "context": model.block_size,
        "architecture": run.raw_config.get("model", {}),
        "tokenizer": {"kind": run.tokenizer.kind, "vocab_size": run.tokenizer.vocab_size},
        "training_data": _data(run.raw_config),
        "metrics": _metrics(run.run_dir),
        "checkpoint": checkpoint,
        "run_dir": run.run_dir.resolve().name,
        "sentence_level": model.traits.sentence_level,
        "latent": model.traits.latent_dim > 0,
        # how it fills the middle before a completions request's suffix: "fim" (a gpt trained with
        # train.fim_rate), "blank" (glm), "mask_predict" (bert, which writes every completion that way); null: no suffix
        "infilling": model.traits.infilling,
        "left_to_right": model.traits.left_to_right,
    }
