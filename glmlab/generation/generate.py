"""Generation for the library and the CLI: texts, completions with details, or a stream of text deltas.

All paths run through the one engine (:mod:`glmlab.generation.engine`, beam search in
:mod:`glmlab.generation.beam`); see :class:`GenerationSettings` for every control.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.beam import beam_search
from glmlab.generation.engine import Completion, Decoder, encode_prompt, start_id
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import find_stop

__all__ = ["Completion", "GenerationSettings", "generate", "generate_batch", "stream"]


def _cut_at_stop(completion: Completion, stops: list[str]) -> Completion:
    cut = find_stop(completion.text, stops)
    if cut >= 0:
        completion.text, completion.finish_reason = completion.text[:cut], "stop"
    return completion


@contextmanager
def _memory_errors(rows: int) -> Iterator[None]:
    """Out of memory (the KV cache grows with rows x context) becomes a clear error, not a traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "allocate" in str(exc):
            raise GlmlabError(f"not enough memory to decode {rows} sequence(s) together",
                              "ask for fewer num_return_sequences / num_beams or fewer prompts at once") from None
        raise


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str | list[int]],
                   settings: GenerationSettings | Sequence[GenerationSettings]) -> list[list[Completion]]:
    """Completions for every prompt (``num_return_sequences`` each), decoded together in one batch."""
    per_prompt = list(settings) if isinstance(settings, Sequence) else [settings] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise GlmlabError(f"{len(prompts)} prompts but {len(per_prompt)} settings", "give one settings per prompt")
    for s in per_prompt:
        s.validate()
    was_training = model.training
    model.eval()
    rows_total = sum(max(s.num_return_sequences, s.num_beams) for s in per_prompt)
    try:
        with _memory_errors(rows_total):
            return _generate_batch(model, tokenizer, prompts, per_prompt)
    finally:
        model.train(was_training)


def _generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str | list[int]],
                    per_prompt: list[GenerationSettings]) -> list[list[Completion]]:
    vocab = model.config.vocab_size
    start = start_id(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p, model.block_size, vocab, start) for p in prompts]
    out: list[list[Completion]] = [[] for _ in prompts]
    rows, row_settings, indices, owners = [], [], [], []
    for i, (ids, s) in enumerate(zip(encoded, per_prompt, strict=True)):
        if s.num_beams > 1:
            out[i] = [_cut_at_stop(c, s.stop) for c in beam_search(model, tokenizer, ids, s)]
            continue
        for j in range(s.num_return_sequences):
            rows.append(ids)
            row_settings.append(s)
            indices.append(j)
            owners.append(i)
    if rows:
        decoder = Decoder(model, tokenizer, rows, row_settings, indices)
        for _ in decoder.steps():
            pass
        for owner, completion in zip(owners, decoder.results(), strict=True):
            out[owner].append(completion)
    return out


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], settings: GenerationSettings,
             ) -> list[str]:
    """The texts of ``num_return_sequences`` continuations of ``prompt`` (the prompt not included)."""
    return [c.text for c in generate_batch(model, tokenizer, [prompt], settings)[0]]


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], settings: GenerationSettings,
           ) -> Iterator[str]:
    """Text deltas of one continuation as it is generated; a delta never splits a character or a stop string."""
    settings.validate()
    if settings.num_return_sequences != 1 or settings.num_beams != 1:
        raise GlmlabError("streaming produces one sampled sequence", "use num_return_sequences=1 and num_beams=1")
    was_training = model.training
    model.eval()
    try:
        ids = encode_prompt(tokenizer, prompt, model.block_size, model.config.vocab_size, start_id(model, tokenizer))
        decoder = Decoder(model, tokenizer, [ids], [settings])
        for _, delta in decoder.steps(stream=True):
            yield delta
    finally:
        model.train(was_training)
