"""What ``--init`` and ``--tokenizer-from`` point at: a glmlab run, a glmlab data directory (tokenizer only) or a
Hugging Face model directory (GPT-2 or BERT weights; any ``tokenizer.json``, GPT-2's ``vocab.json`` + ``merges.txt``
or BERT's ``vocab.txt``),
told apart by the files they hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmlab.data.prepare import ExistingTokenizer
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.interop.hf_gpt2 import hf_tokenizer, read_hf
from glmlab.training.initial import InitialWeights, from_run

WHAT = "a glmlab run (glmlab train), a data directory (glmlab prepare) or a Hugging Face model directory"


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _kind(path: Path) -> str:
    """``run``, ``data`` or ``hf``; a clear error for anything else."""
    if not path.is_dir():
        raise GlmlabError(f"{path} is not a directory", f"give {WHAT}")
    config = _json(path / "config.json") if (path / "config.json").is_file() else None
    if config is not None and isinstance(config.get("model"), dict) and (path / "tokenizer.json").is_file():
        return "run"
    if (path / "meta.json").is_file() and (path / "tokenizer.json").is_file():
        return "data"
    if (config is not None and "model_type" in config) or (path / "tokenizer.json").is_file() or \
            ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()) or (path / "vocab.txt").is_file():
        return "hf"
    raise GlmlabError(f"{path} holds no tokenizer glmlab can read (no tokenizer.json, nor vocab.json + merges.txt, "
                      "nor vocab.txt)",
                      f"give {WHAT}")


def tokenizer_from(path: str | Path) -> ExistingTokenizer:
    """The tokenizer of a run, a data directory or a Hugging Face directory, with its special-token roles."""
    path = Path(path)
    kind = _kind(path)
    if kind == "run":
        roles = (_json(path / "config.json") or {}).get("special_tokens")
        return ExistingTokenizer(Tokenizer.from_file(path / "tokenizer.json", roles), str(path))
    if kind == "data":
        roles = (_json(path / "meta.json") or {}).get("special_token_roles")
        return ExistingTokenizer(Tokenizer.from_file(path / "tokenizer.json", roles), str(path))
    return ExistingTokenizer(hf_tokenizer(path), str(path))


def initial_weights(path: str | Path, checkpoint: str = "best") -> InitialWeights:
    """The weights a run starts from: a glmlab run's (``checkpoint``) or a Hugging Face GPT-2's or BERT's."""
    path = Path(path)
    kind = _kind(path)
    if kind == "data":
        raise GlmlabError(f"{path} is a data directory: it holds a tokenizer but no weights",
                          "give --init a run directory or a Hugging Face model directory")
    if kind == "run":
        return from_run(path, checkpoint)
    if checkpoint != "best":
        raise GlmlabError(f"--init-checkpoint {checkpoint} picks a glmlab run's checkpoint, and {path} is a "
                          "Hugging Face directory", "drop --init-checkpoint")
    source = read_hf(path)
    template = (_json(path / "tokenizer_config.json") or {}).get("chat_template")
    return InitialWeights(str(path), "hf", source.section, source.model.state_dict(), source.tokenizer,
                          template if isinstance(template, str) else None)
