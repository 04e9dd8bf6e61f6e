"""Generation for the library and the CLI: texts, completions with details, or a stream of text deltas.

All paths run the one decoding loop (:class:`~glmlab.generation.continuous.ContinuousBatch`, with every row
admitted at once) or beam search (:mod:`glmlab.generation.beam`); see :class:`GenerationSettings` for every
control.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.beam import beam_search
from glmlab.generation.continuous import ContinuousBatch
from glmlab.generation.engine import Completion, encode_prompt, start_id
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import find_stop

__all__ = ["Completion", "GenerationSettings", "generate", "generate_batch", "stream"]


def _cut_at_stop(completion: Completion, stops: list[str]) -> Completion:
    cut = find_stop(completion.text, stops)
    if cut >= 0:
        completion.text, completion.finish_reason = completion.text[:cut], "stop"
    return completion


@contextmanager
def _decoding(model: nn.Module, rows: int) -> Iterator[None]:
    """Decode in evaluation mode (restored after); running out of memory (the cache grows with rows x context)
    becomes a clear error, not a traceback."""
    was_training = model.training
    model.eval()
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "allocate" in str(exc):
            raise GlmlabError(f"not enough memory to decode {rows} sequence(s) together",
                              "ask for fewer num_return_sequences / num_beams or fewer prompts at once") from None
        raise
    finally:
        model.train(was_training)


def _all_at_once(model: nn.Module, tokenizer: Tokenizer, rows: list[tuple[list[int], GenerationSettings, int]],
                 deltas: bool) -> ContinuousBatch:
    """A continuous batch holding every row (prompt ids, settings, sample index), keyed by its position."""
    batch = ContinuousBatch(model, tokenizer, len(rows), deltas=deltas)
    for key, (ids, settings, index) in enumerate(rows):
        batch.add(key, ids, settings, index)
    return batch


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str | list[int]],
                   settings: GenerationSettings | Sequence[GenerationSettings]) -> list[list[Completion]]:
    """Completions for every prompt (``num_return_sequences`` each), decoded together in one batch."""
    per_prompt = list(settings) if isinstance(settings, Sequence) else [settings] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise GlmlabError(f"{len(prompts)} prompts but {len(per_prompt)} settings", "give one settings per prompt")
    for s in per_prompt:
        s.validate()
    rows_total = sum(max(s.num_return_sequences, s.num_beams) for s in per_prompt)
    with _decoding(model, rows_total), torch.inference_mode():  # entered once, not at every step
        start = start_id(model, tokenizer)
        encoded = [encode_prompt(tokenizer, p, model.block_size, model.vocab_size, start) for p in prompts]
        out: list[list[Completion]] = [[] for _ in prompts]
        rows, owners = [], []
        for i, (ids, s) in enumerate(zip(encoded, per_prompt, strict=True)):
            if s.num_beams > 1:
                out[i] = [_cut_at_stop(c, s.stop) for c in beam_search(model, tokenizer, ids, s)]
                continue
            rows += [(ids, s, j) for j in range(s.num_return_sequences)]
            owners += [i] * s.num_return_sequences
        if rows:
            done: dict[int, Completion] = {}
            batch = _all_at_once(model, tokenizer, rows, deltas=False)
            while batch.busy:
                done.update((e.key, e.completion) for e in batch.step() if e.completion is not None)
            for key, owner in enumerate(owners):
                out[owner].append(done[key])
            failed = next((c for c in done.values() if c.error), None)
            if failed is not None:
                raise _grammar_failed(failed.error)
        return out


def _grammar_failed(error: str) -> GlmlabError:
    return GlmlabError(f"structured output failed: {error}",
                       "check that the run's tokenizer can write what the grammar asks for")


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
    with _decoding(model, 1):
        ids = encode_prompt(tokenizer, prompt, model.block_size, model.vocab_size, start_id(model, tokenizer))
        batch = _all_at_once(model, tokenizer, [(ids, settings, 0)], deltas=True)
        while batch.busy:
            for event in batch.step():
                if event.delta:
                    yield event.delta
                if event.completion is not None and event.completion.error:
                    raise _grammar_failed(event.completion.error)
