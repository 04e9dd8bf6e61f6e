"""Fine-tuning fixtures: a tiny pre-trained char-level gpt, and a synthetic task it can learn in seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from glmlab.training.trainer import train
from tests.conftest import tiny_config

WORDS = ["the", "a", "of", "and", "to", "my", "thou", "king", "lord", "sweet", "fair", "foul", "dark", "night",
         "day", "sun", "moon", "heart"]


def write_task(path: Path, n: int, seed: int, header: str = "sentence\tlabel") -> Path:
    """Label 1 when the text holds 'good', 0 when it holds 'evil'; the other words are noise."""
    rng = random.Random(seed)
    lines = [header]
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(WORDS, k=rng.randint(3, 7))
        words.insert(rng.randint(0, len(words)), "good" if label else "evil")
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append(json.dumps({"prompt": f"say {w}:", "completion": f" {w} {w}"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pre"
    train(tiny_config("model.block_size=64", "train.max_steps=40", "train.threads=1", "train.sample_tokens=0"),
          char_data, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("task")
    return {"train": write_task(d / "train.tsv", 300, 0), "val": write_task(d / "val.tsv", 60, 1),
            "pairs": write_pairs(d / "pairs.jsonl", 120, 2)}
