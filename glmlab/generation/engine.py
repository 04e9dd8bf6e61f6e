"""The generation engine's rows: one sequence being generated, and what one decoding step does to it.

Every path that decodes — ``generate``, ``generate_batch``, ``stream`` (:mod:`glmlab.generation.generate`) and
the server's continuous batching — runs the one loop of :mod:`glmlab.generation.continuous`, and that loop
takes each step's tokens and bookkeeping from here: a :class:`Row` keeps its own settings, its own random
generator (seeded from the request's seed and the row's sample index, so its text does not depend on what
else is in the batch), its tokens, its incremental text and its limits; :func:`next_tokens` applies every
control and picks each row's next token; :meth:`Row.accept` takes it (end of text, stop strings, length,
deadline); :meth:`Row.finish` gives the completion. Beam search (:mod:`glmlab.generation.beam`) shares the
constraints, the banned words and the context re-encoding rule.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation import grammar as G
from glmlab.generation import processors as P
from glmlab.generation.sampling import UniformStream, inverse_cdf
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import IncrementalText, continuation, find_stop, held_back


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives at that step."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)
    shown: bytes | None = None  # a chat reply's first token: its bytes less the leading whitespace the reply drops


@dataclass
class Completion:
    """One finished sequence. ``token_ids`` are the tokens of ``text``; a sequence that ended by generating
    ``<eos>`` says so in ``ended_at_eos``: that token is not part of the text, but it was generated, so it
    is counted in :attr:`generated_tokens` and its log-probability is the last of ``logprobs`` (as vLLM's
    server reports it; a chat reply's logprobs hold only the tokens its text shows)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens) or "time" (max_time)
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the length-normalised sum of log-probabilities
    ended_at_eos: bool = False
    error: str | None = None  # why the output could not follow its grammar (finish_reason "error")

    @property
    def generated_tokens(self) -> int:
        """Tokens generated, the closing ``<eos>`` included (what usage counts)."""
        return len(self.token_ids) + self.ended_at_eos


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


def start_token_id(model: nn.Module, tokenizer: Tokenizer) -> int:
    """The token every text starts after: ``<bos>`` for a model trained on sentences, ``<eos>`` (the document
    separator) for one of running text. What an export declares as its bos token and what lm-evaluation-
    harness prefixes empty contexts and rolling windows with."""
    start = start_id(model, tokenizer)
    return tokenizer.eos_id if start is None else start


def token_ids(tokenizer: Tokenizer, text: str | Sequence[int], vocab_size: int, what: str = "prompt") -> list[int]:
    """The ids of a text (refused if the tokenizer cannot encode it), or given ids checked against the vocabulary."""
    if isinstance(text, str):
        return tokenizer.encode_checked(text, what)
    ids = [int(i) for i in text]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GlmlabError(f"{what} token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})",
                          "give ids from this model's tokenizer")
    return ids


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], block_size: int,
                  vocab_size: int, start: int | None = None) -> list[int]:
    """Prompt ids, after ``start`` when given (an empty prompt of running text starts from ``<eos>``, the
    document separator), cut to fit the context."""
    ids = token_ids(tokenizer, prompt, vocab_size)
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
    """Token sequences to ban for each text; with a subword tokenizer also its form after a space."""
    if not words:
        return []
    ids = [tokenizer.encode(w) for w in words]
    if tokenizer.kind in ("bpe", "unigram"):
        ids += [tokenizer.encode(" " + w) for w in words]
    return [seq for seq in ids if seq]


def context_tail(tokens: list[int], block_size: int) -> list[int]:
    """What a row keeps when it fills the context: its last half, re-encoded before decoding goes on."""
    return tokens[-max(1, block_size // 2):]


class Row:
    """One sequence being generated: its settings, generator, tokens, text and state. ``deltas``: keep its text
    incrementally for streaming (a row with stop strings always does)."""

    def __init__(self, prompt_ids: list[int], settings: GenerationSettings, index: int, tokenizer: Tokenizer,
                 device: torch.device, deltas: bool = False, vocab_size: int | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(row_seed(settings.seed, index))
        self.uniforms = UniformStream(self.generator)  # what sampling draws tokens with
        self.generated: list[int] = []
        self.max_new_tokens = settings.max_new_tokens
        self.done = False
        self.finish_reason = "length"
        self.text = IncrementalText(tokenizer, context=prompt_ids) if settings.stop or deltas or settings.chat_reply \
            else None
        self.emitted = ""  # text already handed out as deltas
        self.final_text: str | None = None  # text cut at a stop string
        self.ended_at_eos = False
        self.logprobs: list[TokenLogprob] | None = [] if settings.logprobs is not None else None
        self.shown = ReplyLogprobs(tokenizer.token_bytes) if settings.chat_reply and self.logprobs is not None \
            else None
        self._reported = 0  # entries of self.logprobs already reported (all rows but chat replies)
        self.bad_words = bad_word_ids(tokenizer, settings.bad_words)
        self.deadline = time.perf_counter() + settings.max_time if settings.max_time else None
        self.context = list(prompt_ids)  # what the cache holds, for re-encoding when the context fills
        self.slides = True  # whether it may re-encode its tail when the context fills (the batch decides)
        self.grammar = G.RowGrammar(settings.grammar, tokenizer, vocab_size or tokenizer.vocab_size) \
            if settings.grammar is not None else None

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.generated

    def accept(self, token: int, eos_id: int, now: float) -> str:
        """Take the step's token for this row: the end of its text (``<eos>``, unless ignored), or one more
        token, after which its stop strings, ``max_new_tokens`` and deadline may end it. Returns the text delta
        the token makes safe to show ('' if none)."""
        if (token == eos_id and (self.settings.stop_at_eos or self.grammar is not None)) or \
                token in self.settings.stop_token_ids:
            self.done, self.finish_reason, self.ended_at_eos = True, "stop", True  # its text is not output, its
            return ""  # logprob is
        self.generated.append(token)
        self.context.append(token)
        delta = self._advance_text(token) if self.text is not None else ""
        if self.shown is not None:
            self.shown.spans.append(len(self.text.text))
        if self.grammar is not None and self.grammar.accept(token) and not self.done:
            self.done, self.finish_reason = True, "stop"  # the grammar is complete: nothing else may follow
        if not self.done and len(self.generated) >= self.max_new_tokens:
            self.done, self.finish_reason = True, "length"
        if not self.done and self.deadline is not None and now >= self.deadline:
            self.done, self.finish_reason = True, "time"
        return delta

    def _advance_text(self, token: int) -> str:
        """Feed ``token`` to the text and return the new, safe-to-show delta ('' if none): never half a
        character, never what may be the start of a stop string."""
        self.text.push(token)
        text, stops = self.text.text, self.settings.stop
        if self.settings.chat_reply:  # a reply's leading whitespace is not shown, so no stop string can match it
            text = text.lstrip()
        cut = find_stop(text, stops)
        if cut >= 0:
            self.final_text = text[:cut]
            self.done, self.finish_reason = True, "stop"
            delta = text[len(self.emitted):cut] if cut > len(self.emitted) else ""
            self.emitted = text[:cut]
            return delta
        safe = len(text) - held_back(text, stops)
        if safe > len(self.emitted):
            delta = text[len(self.emitted):safe]
            self.emitted = text[:safe]
            return delta
        return ""

    def take_logprobs(self, final: bool = False) -> list[TokenLogprob]:
        """The log-probability entries ready to report since the last call: every generated token's (the
        closing ``<eos>`` included) as soon as it is chosen; for a chat reply, those of the tokens its text
        shows, once that text is shown."""
        if self.logprobs is None:
            return []
        if self.shown is not None:
            full = self.text.text
            return self.shown.settle(self.logprobs, full, len(self.emitted), final)
        new = self.logprobs[self._reported:]
        self._reported = len(self.logprobs)
        return new

    def finish(self, tokenizer: Tokenizer) -> tuple[Completion, str, list[TokenLogprob]]:
        """The row's completion, the text no delta has shown yet (what the stop-string hold-back kept) and the
        log-probability entries not reported yet (a chat reply's, decided once its text is final)."""
        text = self.final_text if self.final_text is not None else continuation(tokenizer, self.prompt_ids,
                                                                                  self.generated)
        if self.settings.chat_reply:
            text = text.lstrip()
        tail = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        logprobs, late = self.logprobs, self.take_logprobs(final=True)
        if self.shown is not None:
            logprobs = self.shown.kept
        error = self.grammar.error if self.grammar is not None else None
        return Completion(text, self.generated, "error" if error else self.finish_reason, len(self.prompt_ids),
                          logprobs, ended_at_eos=self.ended_at_eos, error=error), tail, late


class ReplyLogprobs:
    """Which generated tokens a chat reply shows, so its log-probabilities line up with its text: not the
    leading whitespace the reply drops, not a stop string or what follows, not the closing ``<eos>``.

    ``spans[i]`` is the length of the generated text after token ``i``. A token whose text is empty (the
    first byte of a character that is not whole yet) goes with the next token that completes text."""

    def __init__(self, token_bytes: list[bytes]) -> None:
        self.token_bytes = token_bytes
        self.spans: list[int] = []
        self.kept: list[TokenLogprob] = []
        self._next = 0  # the first token not decided yet

    def settle(self, entries: list[TokenLogprob], full: str, shown: int, final: bool) -> list[TokenLogprob]:
        """Decide what can be decided: the entries newly kept. ``full``: the generated text so far, whose
        leading whitespace the reply drops; ``shown``: characters of the reply shown so far (the whole reply
        when ``final``). A kept token that also holds dropped whitespace, or the start of a stop string, gets
        the bytes the reply shows of it (``shown``)."""
        lead = len(full) - len(full.lstrip())
        new: list[TokenLogprob] = []
        spans = self.spans
        while self._next < len(spans):
            first = self._next
            start = spans[first - 1] if first else 0
            last = first
            while last < len(spans) and spans[last] == (spans[last - 1] if last else 0):
                last += 1  # empty tokens, decided with the token that completes their character
            if last == len(spans):  # a character left incomplete: the final text shows it as U+FFFD
                if final:
                    if start < lead + shown:
                        new += entries[first:last]
                    self._next = len(spans)
                break
            end = spans[last]
            if end <= lead:  # leading whitespace, whatever follows
                keep: bool | None = False
            elif final or end <= lead + shown:
                keep = start < lead + shown
            else:
                keep = None  # not shown yet: wait
            if keep is None:
                break
            if keep:
                group = entries[first:last + 1]
                if end > lead + shown:  # the last token also holds the start of a stop string
                    raw, over = self.token_bytes[group[-1].token_id], full[lead + shown:end].encode("utf-8")
                    if raw.endswith(over):
                        group[-1].shown = raw[:len(raw) - len(over)]
                if start < lead:  # the first tokens also hold leading whitespace the reply drops
                    for e in group:
                        e.shown = (e.shown if e.shown is not None else self.token_bytes[e.token_id]).lstrip()
                        if e.shown:
                            break
                new += group
            self._next = last + 1
        self.kept += new
        return new


@dataclass(frozen=True)
class Controls:
    """Which controls any row of a batch uses, worked out once so a plain greedy or sampling step
    pays for nothing it does not use."""

    grammar: bool
    constraints: bool  # anything that looks at the tokens so far
    logit_bias: bool
    temperature: bool
    top_k: bool
    top_p: bool
    min_p: bool
    typical: bool
    sampling: bool
    logprobs: bool

    @classmethod
    def of(cls, rows: list[Row]) -> Controls:
        s = [r.settings for r in rows]
        constraints = any(x.repetition_penalty != 1.0 or x.presence_penalty or x.frequency_penalty
                          or x.no_repeat_ngram_size or x.min_new_tokens for x in s) or any(r.bad_words for r in rows)
        return cls(grammar=any(r.grammar is not None for r in rows), constraints=constraints,
                   logit_bias=any(x.logit_bias for x in s),
                   temperature=any(x.temperature not in (0.0, 1.0) for x in s),
                   top_k=any(x.top_k for x in s), top_p=any(x.top_p < 1 for x in s),
                   min_p=any(x.min_p > 0 for x in s), typical=any(x.typical_p < 1 for x in s),
                   sampling=any(x.temperature > 0 for x in s), logprobs=any(x.logprobs is not None for x in s))


def _process(logits: torch.Tensor, rows: list[Row], eos_id: int, on: Controls) -> torch.Tensor:
    """Apply every control in use, in Hugging Face's order, to the next-token logits (B, V) of ``rows``."""
    if not (on.grammar or on.constraints or on.logit_bias or on.temperature or on.top_k or on.top_p or on.min_p
            or on.typical):
        return logits  # plain greedy or sampling: the common case costs nothing here
    s = [r.settings for r in rows]
    if on.grammar:  # first, as vLLM does: the other controls choose among what the grammar allows
        logits = G.constrain(logits, [r.grammar for r in rows], eos_id)
    if on.logit_bias:
        logits = P.apply_logit_bias(logits, [x.logit_bias for x in s])
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


def _choose(logits: torch.Tensor, rows: list[Row], on: Controls) -> torch.Tensor:
    """Greedy rows take the argmax; sampling rows draw, all in one batched inverse-CDF search, with a
    uniform number from their own generator. Token ids (B,), where the logits are."""
    if not on.sampling:
        return logits.argmax(dim=-1)
    sampling = [row.settings.temperature != 0 for row in rows]
    u = torch.tensor([row.uniforms.next() if s else 0.0 for row, s in zip(rows, sampling, strict=True)],
                     dtype=torch.float64)
    sampled = inverse_cdf(logits, u)
    if all(sampling):
        return sampled
    return torch.where(torch.tensor(sampling, device=logits.device), sampled, logits.argmax(dim=-1))


def _record_logprobs(raw: torch.Tensor, rows: list[Row], chosen: list[int], tokenizer: Tokenizer) -> None:
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


def next_tokens(logits: torch.Tensor, rows: list[Row], tokenizer: Tokenizer, on: Controls,
                eos_id: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Each row's next token from the step's logits (B, V): every control in use applied, greedy or drawn
    with the row's own generator, its log-probabilities recorded when asked for. The token ids as a tensor
    where the logits are (what the next decoding step reads) and as a list. ``eos_id``: the token that ends a row
    (default ``<eos>``)."""
    chosen = _choose(_process(logits, rows, tokenizer.eos_id if eos_id is None else eos_id, on), rows, on)
    tokens = chosen.tolist()
    if on.logprobs:
        _record_logprobs(logits, rows, tokens, tokenizer)
    return chosen, tokens
