"""Autoregressive decoding with a KV cache: token loop, stop strings, EOS, and streaming text deltas.

The prefix is encoded once into a preallocated cache; each step feeds one token. When the cache
fills (prompt plus output reach the model's ``block_size``), the last half of the context is kept
and re-encoded, and decoding continues: generation length is not limited by the context.
A prompt longer than the context keeps its last ``block_size - 1`` tokens (with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.sampling import sample_next

MAX_NUM_SAMPLES = 1024


@dataclass
class GenerationSettings:
    """Decoding controls (names follow Hugging Face ``GenerationConfig`` where they overlap)."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # the same seed gives the same text
    num_samples: int = 1
    stop: list[str] = field(default_factory=list)  # stop strings; the stop text is not returned
    stop_at_eos: bool = True

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (1 <= self.num_samples <= MAX_NUM_SAMPLES,
             f"num_samples={self.num_samples} must be in 1..{MAX_NUM_SAMPLES}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty text"),
        ]
        for ok, problem in checks:
            if not ok:
                raise GlmlabError(f"invalid sampling setting: {problem}", "change the value and try again")


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """Prompt ids (an empty prompt starts from ``<eos>``, the document separator), cut to fit the context."""
    ids = tokenizer.encode_checked(prompt) if prompt else [tokenizer.eos_id]
    if len(ids) >= block_size:
        dropped = len(ids) - (block_size - 1)
        warnings.warn(f"the prompt has {len(ids)} tokens but the context holds {block_size}; "
                      f"its first {dropped} tokens were dropped", stacklevel=3)
        ids = ids[-(block_size - 1):]
    return ids


@torch.no_grad()
def token_steps(model: nn.Module, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample (shape (num_samples,)) per step, up to ``max_new_tokens`` steps."""
    device = next(model.parameters()).device
    batch = settings.num_samples
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    block = model.block_size
    seq = torch.tensor(prompt_ids, dtype=torch.long, device=device).repeat(batch, 1)  # (B, T)
    cache = model.new_cache(batch, device)
    logits = model(seq, cache, last_only=True)[:, -1]
    for _ in range(settings.max_new_tokens):
        token = sample_next(logits, settings.temperature, settings.top_k, settings.top_p, generator)
        yield token
        seq = torch.cat([seq, token[:, None]], dim=1)
        if cache.length == block:  # context full: keep the last half and re-encode it
            cache.reset()
            logits = model(seq[:, -max(1, block // 2):], cache, last_only=True)[:, -1]
        else:
            logits = model(token[:, None], cache, last_only=True)[:, -1]


def _find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, settings: GenerationSettings) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (the prompt itself is not included)."""
    settings.validate()
    was_training = model.training
    model.eval()
    prompt_ids = encode_prompt(tokenizer, prompt, model.block_size)
    rows: list[list[int]] = [[] for _ in range(settings.num_samples)]
    stopped: list[str | None] = [None] * settings.num_samples  # text cut at a stop string
    done = [False] * settings.num_samples
    try:
        for tokens in token_steps(model, prompt_ids, settings):
            for i, token in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if token == tokenizer.eos_id and settings.stop_at_eos:
                    done[i] = True
                    continue
                rows[i].append(token)
                if settings.stop:
                    text = tokenizer.decode(rows[i])
                    cut = _find_stop(text, settings.stop)
                    if cut >= 0:
                        stopped[i], done[i] = text[:cut], True
            if all(done):
                break
    finally:
        model.train(was_training)
    return [text if text is not None else tokenizer.decode(row) for text, row in zip(stopped, rows, strict=True)]


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold back: a partial stop string, or an incomplete UTF-8 sequence."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    return hold


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str, settings: GenerationSettings) -> Iterator[str]:
    """Text deltas of one continuation as it is generated; a delta never splits a character or a stop string."""
    settings.validate()
    if settings.num_samples != 1:
        raise GlmlabError("streaming produces one sample at a time", "use num_samples=1 when streaming")
    was_training = model.training
    model.eval()
    prompt_ids = encode_prompt(tokenizer, prompt, model.block_size)
    row: list[int] = []
    emitted = ""
    try:
        for tokens in token_steps(model, prompt_ids, settings):
            token = int(tokens[0])
            if token == tokenizer.eos_id and settings.stop_at_eos:
                break
            row.append(token)
            text = tokenizer.decode(row)
            cut = _find_stop(text, settings.stop)
            if cut >= 0:
                if cut > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):cut]
                return
            safe = len(text) - _held_back(text, settings.stop)
            if safe > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):safe]
                emitted = text[:safe]
        text = tokenizer.decode(row)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
    finally:
        model.train(was_training)
