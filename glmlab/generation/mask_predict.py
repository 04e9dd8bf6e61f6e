"""Writing with a masked language model: mask-predict (Ghazvininejad et al., 2019).

A masked LM has no left-to-right factorisation to sample from, but it can still write a text of a given
length: start with ``max_new_tokens`` ``[MASK]`` tokens after the prompt (and before a suffix, to infill),
predict them all at once, then for ``iterations - 1`` rounds mask again the ones it is least sure of (a
linearly shrinking number) and predict those given the rest. Each row draws from its own generator, seeded as
the engine seeds its rows, so the same seed gives the same text.

The settings a masked LM can honour: length, temperature (0 = greedy), top-k, top-p, stop strings, ``<eos>``
(the text ends at the first one it writes), seed, several sequences. Any other control is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from glmlab.data.tokenizer import BLANKS, FIRST_TEXT_ID, MASK_ID, Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation import processors as P
from glmlab.generation.engine import Completion, row_seed, token_ids
from glmlab.generation.sampling import inverse_cdf
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import continuation, find_stop

ITERATIONS = 10  # Ghazvininejad et al.'s T for most of their results

def unsupported(settings: GenerationSettings) -> list[str]:
    """The controls ``settings`` asks for that mask-predict cannot honour (those with no meaning for a text written
    all at once), by their settings names."""
    s = settings
    off = {"min_new_tokens": s.min_new_tokens == 0, "logprobs": s.logprobs is None, "min_p": s.min_p == 0,
           "typical_p": s.typical_p == 1, "repetition_penalty": s.repetition_penalty == 1,
           "presence_penalty": s.presence_penalty == 0, "frequency_penalty": s.frequency_penalty == 0,
           "no_repeat_ngram_size": s.no_repeat_ngram_size == 0, "num_beams": s.num_beams == 1,
           "max_time": s.max_time is None, "grammar": s.grammar is None, "bad_words": not s.bad_words,
           "logit_bias": not s.logit_bias, "chat": not s.chat_reply}
    return [name for name, ok in off.items() if not ok]


def check_settings(settings: GenerationSettings) -> None:
    """Refuse every control mask-predict cannot honour (never ignore one)."""
    used = unsupported(settings)
    if used:
        raise GlmlabError(f"a masked language model writes by mask-predict, which cannot honour {', '.join(used)}",
                          "use temperature, top_k, top_p, stop, seed and the number of sequences only, or a causal "
                          "family (gpt, glm)")


def layout(tokenizer: Tokenizer, prompt: str | Sequence[int], suffix: str | Sequence[int] | None, length: int,
           block_size: int, vocab_size: int) -> tuple[list[int], list[int]]:
    """The ids a row starts from — the prompt (its end, when the rest does not fit), ``length`` masks, the suffix —
    and the positions to write. Texts or token ids."""
    ids = token_ids(tokenizer, prompt, vocab_size)
    tail = [] if suffix is None else token_ids(tokenizer, suffix, vocab_size, "suffix")
    if any(i in BLANKS for i in tail):
        raise GlmlabError("the suffix holds a blank token", "put the blanks in the prompt, or drop the suffix")
    if length + len(tail) >= block_size:
        raise GlmlabError(f"{length} new tokens and a suffix of {len(tail)} do not fit the context of {block_size}",
                          f"ask for at most {block_size - len(tail) - 1} new tokens")
    keep = block_size - length - len(tail)
    ids = ids[-keep:] if keep > 0 else []
    seq = ids + [MASK_ID] * length + tail
    return seq, list(range(len(ids), len(ids) + length))


@torch.no_grad()
def mask_predict(model: nn.Module, tokenizer: Tokenizer, prompt: str | Sequence[int], settings: GenerationSettings,
                 suffix: str | Sequence[int] | None = None, iterations: int = ITERATIONS) -> list[Completion]:
    """``num_return_sequences`` texts of ``max_new_tokens`` tokens written after ``prompt`` (and before
    ``suffix``) by mask-predict in ``iterations`` rounds. A completion's text ends at its first ``<eos>`` (unless
    ``stop_at_eos`` is off) or stop string."""
    settings.validate()
    check_settings(settings)
    if iterations < 1:
        raise GlmlabError(f"iterations={iterations} must be at least 1", "use 10 (the paper's choice)")
    n = settings.max_new_tokens
    seq, slots = layout(tokenizer, prompt, suffix, n, model.block_size, model.vocab_size)
    rows = settings.num_return_sequences
    device = next(model.parameters()).device
    tokens = torch.tensor([seq] * rows, device=device)
    where = torch.tensor(slots, device=device)
    generators = [torch.Generator(device=device).manual_seed(row_seed(settings.seed, i)) for i in range(rows)]
    confidence = torch.zeros(rows, n, device=device)
    banned = [i for i in range(FIRST_TEXT_ID) if not (settings.stop_at_eos and i == tokenizer.eos_id)]
    was_training = model.training
    model.eval()
    try:
        for step in range(iterations):
            count = n if step == 0 else n * (iterations - step) // iterations
            if count == 0:
                break
            if step:  # mask again the least confident of the written tokens
                redo = confidence.topk(count, dim=1, largest=False).indices  # (rows, count)
                tokens[torch.arange(rows, device=device)[:, None], where[redo]] = MASK_ID
            else:
                redo = torch.arange(n, device=device).expand(rows, n)
            logits = model(tokens)[torch.arange(rows, device=device)[:, None], where[redo]].float()  # (rows, c, V)
            logits[..., banned] = float("-inf")
            chosen, prob = _choose(logits, settings, generators)
            tokens[torch.arange(rows, device=device)[:, None], where[redo]] = chosen
            confidence.scatter_(1, redo, prob)
    finally:
        model.train(was_training)
    out = []
    for r in range(rows):
        written = tokens[r, where].tolist()
        finish = "length"
        if settings.stop_at_eos and tokenizer.eos_id in written:
            written, finish = written[: written.index(tokenizer.eos_id)], "stop"
        text = continuation(tokenizer, seq[:slots[0]], written)
        cut = find_stop(text, settings.stop)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        out.append(Completion(text, written, finish, len(seq) - n))
    return out


def _choose(logits: torch.Tensor, settings: GenerationSettings, generators: list[torch.Generator],
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (rows, c) for the masked positions and their probabilities under the model (what decides which
    to mask again): greedy at temperature 0, else drawn after temperature, top-k and top-p, per row."""
    rows, c, V = logits.shape
    flat = logits.reshape(rows * c, V)
    probs = flat.softmax(-1)
    if settings.temperature == 0:
        chosen = flat.argmax(-1)
    else:
        shaped = P.apply_temperature(flat, [settings.temperature] * len(flat))
        if settings.top_k:
            shaped = P.apply_top_k(shaped, [settings.top_k] * len(flat))
        if settings.top_p < 1:
            shaped = P.apply_top_p(shaped, [settings.top_p] * len(flat))
        u = torch.cat([torch.rand(c, generator=g, dtype=torch.float64, device=g.device).cpu() for g in generators])
        chosen = inverse_cdf(shaped, u)
    prob = probs.gather(1, chosen[:, None])[:, 0]
    return chosen.view(rows, c), prob.view(rows, c)
