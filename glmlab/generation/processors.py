"""Logits processors: every standard decoding control, vectorised over a batch with per-row settings.

Semantics follow Hugging Face ``transformers`` where the controls overlap (tests compare against its
own processors on the same logits); ``presence_penalty`` and ``frequency_penalty`` follow OpenAI
(counts over the tokens generated so far). A row whose setting is "off" (top_k 0, top_p 1, ...) is
left untouched. Filters set logits to ``-inf``; at least one token always survives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmlab.generation.settings import GenerationSettings

NEG_INF = float("-inf")


def _column(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, 1)


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float]]) -> torch.Tensor:
    """Add each row's bias to the logits of the tokens it names (OpenAI's ``logit_bias``: -100 bans a token,
    100 all but forces it); rows without one are left alone."""
    rows = [(r, t, b) for r, bias in enumerate(biases) for t, b in bias.items() if t < logits.size(-1)]
    if not rows:
        return logits
    r, t, b = zip(*rows, strict=True)
    return logits.index_put((torch.tensor(r, device=logits.device), torch.tensor(t, device=logits.device)),
                            torch.tensor(b, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_temperature(logits: torch.Tensor, temperature: Sequence[float]) -> torch.Tensor:
    """Divide each row by its temperature (rows with temperature 0 are greedy and left as they are)."""
    t = _column(temperature, logits)
    return torch.where(t > 0, logits / t.clamp_min(1e-8), logits)


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept); k = 0 leaves the row alone."""
    k = torch.as_tensor(top_k, device=logits.device).clamp(0, logits.size(-1))
    if not bool((k > 0).any()):
        return logits
    ordered = logits.sort(dim=-1, descending=True).values
    kth = ordered.gather(-1, (k - 1).clamp_min(0).view(-1, 1))
    kth = torch.where((k > 0).view(-1, 1), kth, torch.full_like(kth, NEG_INF))
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (p = 1: the whole row)."""
    p = _column(top_p, logits)
    active = p < 1
    if not bool(active.any()):
        return logits
    ordered, order = logits.sort(dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)  # Hugging Face's rule, on ascending order
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted) & active
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (min_p = 0: off)."""
    m = _column(min_p, logits)
    if not bool((m > 0).any()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * m
    return logits.masked_fill((probs < threshold) & (m > 0), NEG_INF)


def apply_typical_p(logits: torch.Tensor, typical_p: Sequence[float]) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprisal is closest to the
    entropy until their mass reaches typical_p (1 = off)."""
    mass = _column(typical_p, logits)
    active = mass < 1
    if not bool(active.any()):
        return logits
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_scores, order = shifted.sort(dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    remove_sorted = sorted_scores > sorted_scores.gather(-1, last)
    remove_sorted[:, 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted) & active
    return logits.masked_fill(remove, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalty: Sequence[float]) -> torch.Tensor:
    """CTRL's penalty on every token already in the row (prompt and output): positive logits divided by
    it, negative ones multiplied (1 = off)."""
    out = logits
    for row, (tokens, factor) in enumerate(zip(history, penalty, strict=True)):
        if factor == 1.0 or not tokens:
            continue
        ids = torch.tensor(sorted(set(tokens)), device=logits.device)
        score = out[row, ids]
        if out is logits:
            out = logits.clone()
        out[row, ids] = torch.where(score < 0, score * factor, score / factor)
    return out


def apply_presence_frequency(logits: torch.Tensor, generated: list[list[int]], presence: Sequence[float],
                             frequency: Sequence[float]) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens: minus presence once per seen token, minus frequency
    per occurrence."""
    out = logits
    for row, (tokens, pres, freq) in enumerate(zip(generated, presence, frequency, strict=True)):
        if not tokens or (pres == 0 and freq == 0):
            continue
        ids, counts = torch.tensor(tokens, device=logits.device).unique(return_counts=True)
        if out is logits:
            out = logits.clone()
        out[row, ids] -= pres + freq * counts.to(logits.dtype)
    return out


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``tokens`` (Hugging Face's rule)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]


def apply_no_repeat_ngram(logits: torch.Tensor, history: list[list[int]], sizes: Sequence[int]) -> torch.Tensor:
    out = logits
    for row, (tokens, n) in enumerate(zip(history, sizes, strict=True)):
        banned = banned_ngram_tokens(tokens, n)
        if banned:
            if out is logits:
                out = logits.clone()
            out[row, banned] = NEG_INF
    return out


def apply_bad_words(logits: torch.Tensor, history: list[list[int]], bad: list[list[list[int]]]) -> torch.Tensor:
    """Ban the last token of each bad sequence whose other tokens end the row's history."""
    out = logits
    for row, (tokens, sequences) in enumerate(zip(history, bad, strict=True)):
        banned = [seq[-1] for seq in sequences
                  if len(seq) == 1 or (len(tokens) >= len(seq) - 1 and tokens[len(tokens) - len(seq) + 1:] == seq[:-1])]
        if banned:
            if out is logits:
                out = logits.clone()
            out[row, banned] = NEG_INF
    return out


def suppress_tokens(logits: torch.Tensor, rows: list[int], token_id: int) -> torch.Tensor:
    """Forbid ``token_id`` in the given rows (e.g. EOS before min_new_tokens)."""
    if not rows:
        return logits
    out = logits.clone()
    out[rows, token_id] = NEG_INF
    return out


def apply_constraints(logits: torch.Tensor, histories: list[list[int]], generated: list[list[int]],
                      settings: Sequence[GenerationSettings], bad_words: list[list[list[int]]],
                      eos_id: int) -> torch.Tensor:
    """The controls that depend on what came before, in Hugging Face's order: repetition penalty,
    presence / frequency penalties, no-repeat n-grams, bad words, and EOS before ``min_new_tokens``.

    Shared by sampling (on logits) and beam search (on log-probabilities, as Hugging Face does).
    """
    s = settings
    if any(x.repetition_penalty != 1.0 for x in s):
        logits = apply_repetition_penalty(logits, histories, [x.repetition_penalty for x in s])
    if any(x.presence_penalty or x.frequency_penalty for x in s):
        logits = apply_presence_frequency(logits, generated, [x.presence_penalty for x in s],
                                          [x.frequency_penalty for x in s])
    if any(x.no_repeat_ngram_size for x in s):
        logits = apply_no_repeat_ngram(logits, histories, [x.no_repeat_ngram_size for x in s])
    if any(bad_words):
        logits = apply_bad_words(logits, histories, bad_words)
    early = [i for i, (x, g) in enumerate(zip(s, generated, strict=True)) if len(g) < x.min_new_tokens]
    return suppress_tokens(logits, early, eos_id)
