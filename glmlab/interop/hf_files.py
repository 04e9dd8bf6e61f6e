"""Reading a local Hugging Face model directory: its JSON files, its weights, its tokenizer and the tokens it names
for each role. What the GPT-2 and the BERT import share (:mod:`glmlab.interop.hf_gpt2`, :mod:`~.hf_bert`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError


@dataclass
class HFCheckpoint:
    """A Hugging Face directory read as a glmlab model: its model section, the model holding its weights and its
    tokenizer with its roles."""

    section: dict[str, Any]
    model: nn.Module
    tokenizer: Tokenizer


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmlabError(f"cannot read {path}: {exc}", "give a Hugging Face model directory") from None
    if not isinstance(data, dict):
        raise GlmlabError(f"{path} holds no JSON object", "give a Hugging Face model directory")
    return data


def model_type(hf_dir: Path) -> str | None:
    """config.json's ``model_type`` (None without a config.json: a tokenizer saved alone)."""
    return read_json(hf_dir / "config.json").get("model_type") if (hf_dir / "config.json").is_file() else None


def load_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    if (hf_dir / "model.safetensors").is_file():
        try:
            return load_file(str(hf_dir / "model.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise GlmlabError(f"{hf_dir / 'model.safetensors'} cannot be read ({exc})") from None
    if (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refuses anything but tensors
            raise GlmlabError(f"{hf_dir / 'pytorch_model.bin'} cannot be loaded as plain weights "
                              f"({type(exc).__name__})", "convert it to model.safetensors") from None
    raise GlmlabError(f"{hf_dir} has no model.safetensors or pytorch_model.bin",
                      "give a directory saved by save_pretrained")


def load_tokenizer(hf_dir: Path) -> HFTokenizer:
    """``tokenizer.json``; else GPT-2's ``vocab.json`` + ``merges.txt`` (byte-level BPE). (BERT's ``vocab.txt`` alone:
    :func:`glmlab.interop.hf_bert.bert_tokenizer`.)"""
    if (hf_dir / "tokenizer.json").is_file():
        try:
            return HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception on malformed JSON
            raise GlmlabError(f"{hf_dir / 'tokenizer.json'} is not a valid tokenizer.json "
                              f"({str(exc).splitlines()[0]})", "save it again with tokenizer.save_pretrained") from None
    vocab, merges = hf_dir / "vocab.json", hf_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    raise GlmlabError(f"{hf_dir} has no tokenizer.json, nor vocab.json + merges.txt",
                      "save the tokenizer next to the model (tokenizer.save_pretrained)")


def named_tokens(hf_dir: Path, tok: HFTokenizer | None, roles: tuple[str, ...]) -> dict[str, str]:
    """The token ``tokenizer_config.json`` or ``special_tokens_map.json`` names for each of ``roles`` (``eos`` reads
    ``eos_token``), where ``tok`` (if given) has it."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = hf_dir / name
        if path.is_file():
            data = read_json(path)
            for role in roles:
                value = data.get(f"{role}_token")
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str) and (tok is None or tok.token_to_id(value) is not None):
                    found.setdefault(role, value)
    return found
