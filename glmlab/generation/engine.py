"""The generation engine: batched decoding over a preallocated KV cache, used by the CLI, the Python API
and (later) the HTTP server.

A batch holds rows of any prompt length. Each row keeps its own positions in the cache (prompts are
right-padded once for the prefill; no left padding, no re-encoding of the prefix), its own settings
and its own random generator, seeded from the request's seed and the row's sample index, so a
request's text does not depend on what else is in the batch. Finished rows leave the batch. When a
row fills the model's context, its last half is re-encoded and decoding goes on. Text comes out as
deltas that never split a character or a stop string.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation import processors as P
from glmlab.generation.sampling import UniformStream, inverse_cdf
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import IncrementalText, find_stop, held_back


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives at that step."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens) or "time" (max_time)
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the length-normalised sum of log-probabilities


def row_seed(seed: int | None, index: int) -> int:
    """A row's generator seed from its request's seed and its sample index (random when seed is None,
    without touching PyTorch's global generator)."""
    if seed is None:
        return secrets.randbits(63)
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0] >> 1)


def start_id(model: nn.Module, tokenizer: Tokenizer) -> int | None:
    """The token every prompt starts with: ``<bos>`` for a model trained on sentences (it read ``<bos>``
    before each one); None for a model of running text."""
    return tokenizer.bos_id if model.traits.sentence_level else None


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], block_size: int,
                  vocab_size: int, start: int | None = None) -> list[int]:
    """Prompt ids, after ``start`` when given (an empty prompt of running text starts from ``<eos>``, the
    document separator), cut to fit the context."""
    if isinstance(prompt, str):
        ids = tokenizer.encode_checked(prompt)
    else:
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise GlmlabError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})",
                              "give ids from this model's tokenizer")
    if start is not None:
        ids = [start, *ids]
    if not ids:
        ids = [tokenizer.eos_id]
    keep = max(1, block_size - 1)  # room for at least one generated token
    if len(ids) > keep:
        warnings.warn(f"the prompt has {len(ids)} tokens but the context holds {block_size}; "
                      f"its first {len(ids) - keep} tokens were dropped", stacklevel=3)
        ids = ids[-keep:]
    return ids


def bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Token sequences to ban for each text; with a BPE tokenizer also its form after a space."""
    if not words:
        return []
    ids = [tokenizer.encode(w) for w in words]
    if tokenizer.kind == "bpe":
        ids += [tokenizer.encode(" " + w) for w in words]
    return [seq for seq in ids if seq]


class _Row:
    """One sequence being generated: its settings, generator, tokens, text and state."""

    def __init__(self, prompt_ids: list[int], settings: GenerationSettings, index: int, tokenizer: Tokenizer,
                 device: torch.device) -> None:
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(row_seed(settings.seed, index))
        self.uniforms = UniformStream(self.generator)  # what sampling draws tokens with
        self.generated: list[int] = []
        self.done = False
        self.finish_reason = "length"
        self.text = IncrementalText(tokenizer) if settings.stop else None
        self.emitted = ""  # text already handed out as deltas
        self.final_text: str | None = None  # text cut at a stop string
        self.logprobs: list[TokenLogprob] | None = [] if settings.logprobs is not None else None
        self.bad_words = bad_word_ids(tokenizer, settings.bad_words)
        self.deadline = time.perf_counter() + settings.max_time if settings.max_time else None
        self.context = list(prompt_ids)  # what the cache holds, for re-encoding when the context fills

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.generated


@dataclass(frozen=True)
class _Controls:
    """Which controls any row of a batch uses, worked out once so a plain greedy or sampling step
    pays for nothing it does not use."""

    constraints: bool  # anything that looks at the tokens so far
    temperature: bool
    top_k: bool
    top_p: bool
    min_p: bool
    typical: bool
    sampling: bool
    logprobs: bool

    @classmethod
    def of(cls, rows: list[_Row]) -> _Controls:
        s = [r.settings for r in rows]
        constraints = any(x.repetition_penalty != 1.0 or x.presence_penalty or x.frequency_penalty
                          or x.no_repeat_ngram_size or x.min_new_tokens for x in s) or any(r.bad_words for r in rows)
        return cls(constraints=constraints, temperature=any(x.temperature not in (0.0, 1.0) for x in s),
                   top_k=any(x.top_k for x in s), top_p=any(x.top_p < 1 for x in s),
                   min_p=any(x.min_p > 0 for x in s), typical=any(x.typical_p < 1 for x in s),
                   sampling=any(x.temperature > 0 for x in s), logprobs=any(x.logprobs is not None for x in s))


def _process(logits: torch.Tensor, rows: list[_Row], eos_id: int, on: _Controls) -> torch.Tensor:
    """Apply every control in use, in Hugging Face's order, to the next-token logits (B, V) of ``rows``."""
    if not (on.constraints or on.temperature or on.top_k or on.top_p or on.min_p or on.typical):
        return logits  # plain greedy or sampling: the common case costs nothing here
    s = [r.settings for r in rows]
    if on.constraints:
        logits = P.apply_constraints(logits, [r.history for r in rows], [r.generated for r in rows], s,
                                     [r.bad_words for r in rows], eos_id)
    if on.temperature:
        logits = P.apply_temperature(logits, [x.temperature for x in s])
    if on.top_k:
        logits = P.apply_top_k(logits, [x.top_k for x in s])
    if on.top_p:
        logits = P.apply_top_p(logits, [x.top_p for x in s])
    if on.min_p:
        logits = P.apply_min_p(logits, [x.min_p for x in s])
    if on.typical:
        logits = P.apply_typical_p(logits, [x.typical_p for x in s])
    return logits


def _choose(logits: torch.Tensor, rows: list[_Row], on: _Controls) -> list[int]:
    """Greedy rows take the argmax; sampling rows draw, all in one batched inverse-CDF search, with a
    uniform number from their own generator."""
    if not on.sampling:
        return logits.argmax(dim=-1).tolist()
    sampling = [row.settings.temperature != 0 for row in rows]
    u = torch.tensor([row.uniforms.next() if s else 0.0 for row, s in zip(rows, sampling, strict=True)],
                     dtype=torch.float64)
    sampled = inverse_cdf(logits, u).tolist()
    if all(sampling):
        return sampled
    greedy = logits.argmax(dim=-1).tolist()
    return [t if s else g for t, g, s in zip(sampled, greedy, sampling, strict=True)]


def _record_logprobs(raw: torch.Tensor, rows: list[_Row], chosen: list[int], tokenizer: Tokenizer) -> None:
    wanted = [i for i, r in enumerate(rows) if r.logprobs is not None]
    if not wanted:
        return
    logp = raw[wanted].float().log_softmax(dim=-1)
    for j, i in enumerate(wanted):
        n = rows[i].settings.logprobs or 0
        top = []
        if n:
            values, ids = logp[j].topk(n)
            top = [(int(t), tokenizer.decode([int(t)], skip_special_tokens=False), float(v))
                   for v, t in zip(values, ids, strict=True)]
        token = chosen[i]
        rows[i].logprobs.append(TokenLogprob(token, tokenizer.decode([token], skip_special_tokens=False),
                                             float(logp[j, token]), top))


def _advance_text(row: _Row, token: int) -> str:
    """Feed ``token`` to the row's text and return the new, safe-to-show delta ('' if none)."""
    if row.text is None:
        return ""
    row.text.push(token)
    text = row.text.text
    cut = find_stop(text, row.settings.stop)
    if cut >= 0:
        row.final_text = text[:cut]
        row.done, row.finish_reason = True, "stop"
        delta = text[len(row.emitted):cut] if cut > len(row.emitted) else ""
        row.emitted = text[:cut]
        return delta
    safe = len(text) - held_back(text, row.settings.stop)
    if safe > len(row.emitted):
        delta = text[len(row.emitted):safe]
        row.emitted = text[:safe]
        return delta
    return ""


class Decoder:
    """Decodes a batch of rows step by step. Iterate over :meth:`steps` for text deltas, then read :meth:`results`."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompts: list[list[int]],
                 settings: list[GenerationSettings], sample_indices: list[int] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        indices = sample_indices or [0] * len(prompts)
        self.rows = [_Row(p, s, i, tokenizer, self.device) for p, s, i in zip(prompts, settings, indices, strict=True)]

    @torch.inference_mode()
    def steps(self, stream: bool = False) -> Iterator[tuple[int, str]]:
        """Run to completion; yields (row index, text delta) as text becomes safe to show when ``stream``."""
        if stream:
            for row in self.rows:
                if row.text is None:
                    row.text = IncrementalText(self.tokenizer)
        model, rows = self.model, self.rows
        block = model.block_size
        timed = any(r.deadline is not None for r in rows)
        fast_step = model.decode_step if "decode_step" in model.traits.fast_paths else None
        cache = model.new_cache(len(rows), self.device)
        lengths = [len(r.prompt_ids) for r in rows]
        width = max(lengths)
        idx = torch.full((len(rows), width), self.tokenizer.eos_id, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : lengths[i]] = torch.tensor(r.prompt_ids)
        logits = model(idx.to(self.device), cache, valid=lengths, last_only=True)[:, -1].float()
        active = list(range(len(rows)))  # indices of the rows still generating; cache slot j holds active[j]
        on = _Controls.of(rows)
        while active:
            live = [rows[i] for i in active]
            chosen = _choose(_process(logits, live, self.tokenizer.eos_id, on), live, on)
            if on.logprobs:
                _record_logprobs(logits, live, chosen, self.tokenizer)
            for index, row, token in zip(active, live, chosen, strict=True):
                if token == self.tokenizer.eos_id and row.settings.stop_at_eos:
                    row.done, row.finish_reason = True, "stop"
                    if row.logprobs:  # the EOS token is not part of the output, nor is its log-probability
                        row.logprobs.pop()
                    continue
                row.generated.append(token)
                row.context.append(token)
                delta = _advance_text(row, token)
                if delta and stream:
                    yield index, delta
                if not row.done and len(row.generated) >= row.settings.max_new_tokens:
                    row.done, row.finish_reason = True, "length"
            if timed:
                now = time.perf_counter()
                for row in live:
                    if not row.done and row.deadline is not None and now >= row.deadline:
                        row.done, row.finish_reason = True, "time"
            still = [index for index in active if not rows[index].done]
            if not still:
                break
            if len(still) < len(active):
                cache.select([active.index(index) for index in still])
                active = still
            for j, index in enumerate(active):
                if cache.lengths[j] >= block:  # context full: re-encode the row's last half, then go on
                    row = rows[index]
                    row.context = row.context[-max(1, block // 2):]
                    cache.reset_row(j)
                    if len(row.context) > 1:
                        model(torch.tensor([row.context[:-1]], device=self.device), cache, rows=[j],
                              last_only=True)
            newest = torch.tensor([rows[index].context[-1] for index in active], device=self.device)
            logits = fast_step(newest, cache) if fast_step is not None else None
            if logits is None:
                logits = model(newest[:, None], cache, last_only=True)[:, -1]
            logits = logits.float()
        if stream:
            for i, row in enumerate(rows):
                tail = self._tail(row)
                if tail:
                    yield i, tail

    def _tail(self, row: _Row) -> str:
        """Text not yet handed out when the row ended (what the stop-string hold-back kept)."""
        text = self.final_text(row)
        return text[len(row.emitted):] if text.startswith(row.emitted) and len(text) > len(row.emitted) else ""

    def final_text(self, row: _Row) -> str:
        return row.final_text if row.final_text is not None else self.tokenizer.decode(row.generated)

    def results(self) -> list[Completion]:
        return [Completion(self.final_text(r), r.generated, r.finish_reason, len(r.prompt_ids), r.logprobs)
                for r in self.rows]
