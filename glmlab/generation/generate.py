"""Generation for the library and the CLI: texts, completions with details, or a stream of text deltas.

All paths run the one decoding loop (:class:`~glmlab.generation.continuous.ContinuousBatch`, with every row
admitted at once) or beam search (:mod:`glmlab.generation.beam`); see :class:`GenerationSettings` for every
control.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from glmlab.data.tokenizer import BLANKS, Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.beam import beam_search
from glmlab.generation.continuous import ContinuousBatch
from glmlab.generation.engine import Completion, row_seed
from glmlab.generation.infill import prompt_ids
from glmlab.generation.mask_predict import ITERATIONS, mask_predict
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import find_stop

__all__ = ["Completion", "GenerationSettings", "fill_blanks", "generate", "generate_batch", "stream"]


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
                   settings: GenerationSettings | Sequence[GenerationSettings],
                   suffixes: Sequence[str | list[int] | None] | None = None,
                   iterations: int = ITERATIONS) -> list[list[Completion]]:
    """Completions for every prompt (``num_return_sequences`` each), decoded together in one batch. With
    ``suffixes``, each completion fills the middle between its prompt and suffix (a run that can infill:
    glm, bert, a gpt trained with ``train.fim_rate``). A bert writes by mask-predict in ``iterations`` rounds."""
    per_prompt = list(settings) if isinstance(settings, Sequence) else [settings] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise GlmlabError(f"{len(prompts)} prompts but {len(per_prompt)} settings", "give one settings per prompt")
    tails = list(suffixes) if suffixes is not None else [None] * len(prompts)
    if len(tails) != len(prompts):
        raise GlmlabError(f"{len(prompts)} prompts but {len(tails)} suffixes", "give one suffix (or None) per prompt")
    for s in per_prompt:
        s.validate()
    if not model.traits.left_to_right:  # a masked LM writes all at once
        with _decoding(model, 1):
            return [mask_predict(model, tokenizer, p, s, suffix=t, iterations=iterations)
                    for p, s, t in zip(prompts, per_prompt, tails, strict=True)]
    rows_total = sum(max(s.num_return_sequences, s.num_beams) for s in per_prompt)
    with _decoding(model, rows_total), torch.inference_mode():  # entered once, not at every step
        encoded = [prompt_ids(model, tokenizer, p, t) for p, t in zip(prompts, tails, strict=True)]
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
             suffix: str | list[int] | None = None) -> list[str]:
    """The texts of ``num_return_sequences`` continuations of ``prompt`` (the prompt not included), or of the
    middles between ``prompt`` and ``suffix``."""
    return [c.text for c in generate_batch(model, tokenizer, [prompt], settings, [suffix])[0]]


def fill_blanks(model: nn.Module, tokenizer: Tokenizer, text: str, settings: GenerationSettings,
                ) -> list[Completion]:
    """A glm's fill of every ``[MASK]``-style blank in ``text``, one blank at a time (the last first; each
    piece is put back into Part A before the next is written): ``num_return_sequences`` completions whose text
    is the whole filled text and whose token ids are the pieces' tokens, in the order written."""
    settings.validate()
    if model.traits.infilling != "blank":
        raise GlmlabError(f"a {model.traits.family} run does not fill [MASK] blanks in a text",
                          "use a glm run, or glmlab fill for a bert run's candidates per mask")
    out = []
    for r in range(settings.num_return_sequences):
        ids = tokenizer.encode_checked(text)
        written: list[int] = []
        finish = "stop"
        for blank in range(sum(t in BLANKS for t in ids)):
            one = dataclasses.replace(settings, num_return_sequences=1,
                                      seed=None if settings.seed is None else row_seed(settings.seed, r * 1000 + blank))
            [completion] = generate_batch(model, tokenizer, [ids], one)[0]
            at = max(i for i, t in enumerate(ids) if t in BLANKS)
            ids = ids[:at] + completion.token_ids + ids[at + 1:]
            written = completion.token_ids + written
            finish = completion.finish_reason if completion.finish_reason != "stop" else finish
        out.append(Completion(tokenizer.decode(ids), written, finish, len(tokenizer.encode(text))))
    return out


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], settings: GenerationSettings,
           suffix: str | list[int] | None = None) -> Iterator[str]:
    """Text deltas of one continuation (or middle, with ``suffix``) as it is generated; a delta never splits a
    character or a stop string. A bert's text comes whole, once mask-predict has written it."""
    settings.validate()
    if settings.num_return_sequences != 1 or settings.num_beams != 1:
        raise GlmlabError("streaming produces one sampled sequence", "use num_return_sequences=1 and num_beams=1")
    if not model.traits.left_to_right:
        yield generate(model, tokenizer, prompt, settings, suffix)[0]
        return
    with _decoding(model, 1):
        ids = prompt_ids(model, tokenizer, prompt, suffix)
        batch = _all_at_once(model, tokenizer, [(ids, settings, 0)], deltas=True)
        while batch.busy:
            for event in batch.step():
                if event.delta:
                    yield event.delta
                if event.completion is not None and event.completion.error:
                    raise _grammar_failed(event.completion.error)
