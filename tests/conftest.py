"""Shared fixtures: a small Shakespeare data directory and a tiny trained run, built once per session."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from glmlab.config import resolve_config
from glmlab.data.corpus import default_corpus_path
from glmlab.data.prepare import prepare
from glmlab.models import gpt as gpt_module
from glmlab.models import gpt_aot
from glmlab.models.gpt_decode import scripted_decode_rows, unoptimised_graphs
from glmlab.training.trainer import train


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=40, metavar="N",
                     help="request bodies the server's fuzz test tries (default 40, a few seconds; e.g. 2000 for a "
                          "long search with fresh random cases)")


TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0"]
TINY_TRAIN = ["train.batch_size=8", "train.eval_interval=20", "train.log_interval=5", "train.warmup_steps=5",
              "train.lr=3e-3", "train.sample_tokens=20", "train.eval_tokens=2048",
              # untimed: tests that compare two runs need both to attend alike (auto's timing of tiny shapes is close)
              "train.attention_precision=bf16"]


@pytest.fixture(scope="session")
def shakespeare_excerpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40,000 characters of the bundled corpus, as a .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "excerpt.txt"
    path.write_text(default_corpus_path().read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory, shakespeare_excerpt: Path) -> Path:
    out = tmp_path_factory.mktemp("data") / "char"
    prepare([shakespeare_excerpt], out, tokenizer="char")
    return out


def tiny_config(*extra: str):
    return resolve_config({}, [*TINY_MODEL, *TINY_TRAIN, *extra])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    """A tiny gpt trained for 40 steps (two evaluations)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config("train.max_steps=40"), char_data, out, show_progress=False)
    return out


def excerpt_lines(limit: int = 40_000) -> list[str]:
    """The non-empty lines of the bundled corpus's first ``limit`` characters, stripped."""
    text = default_corpus_path().read_text(encoding="utf-8")[:limit]
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def short_docs_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gpt trained for 200 steps on many short documents (each line of the excerpt its own JSONL
    document), so that after a whole line its likely next token is ``<eos>``."""
    base = tmp_path_factory.mktemp("short-docs")
    (base / "docs.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in excerpt_lines()),
                                     encoding="utf-8")
    prepare([base / "docs.jsonl"], base / "data", tokenizer="char")
    train(tiny_config("train.max_steps=200", "train.eval_interval=100", "train.sample_tokens=0"), base / "data",
          base / "run", show_progress=False)
    return base / "run"


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and fair to whatever else runs on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metrics_records(run: Path, split: str) -> list[dict]:
    """The records of one split (train, val, adversarial, ...) in a run's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture
def stand_in(monkeypatch):
    """Compiled steps replaced by a library that runs the scripted step (the same numbers) and records each call's
    batch size and position, and each build's batch size: which steps go to the library, without a compiler."""
    record = types.SimpleNamespace(builds=[], calls=[])

    def build(w, n_head, eps, batch, max_len):
        record.builds.append(batch)

        def runner(tokens, positions, span, *kv_layers):
            assert tokens.size(0) == positions.numel() == batch
            assert all(kv.size(0) == batch and kv.size(3) == max_len for kv in kv_layers)
            record.calls.append((tokens.size(0), span.size(0) - 1))
            with unoptimised_graphs():
                return scripted_decode_rows()(tokens, torch.arange(batch), positions, span.size(0), list(kv_layers),
                                              w, n_head, eps)

        return gpt_aot.CompiledDecodeStep(runner, batch, max_len)

    monkeypatch.setattr(gpt_module, "compiled_decode_step", build)
    return record
