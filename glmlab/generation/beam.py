"""Beam search, following Hugging Face ``transformers`` (v4.5x / v5) step for step.

Its loop is its own (beams are reordered, not rows admitted), and it shares the engine's pieces: the
constraints (:mod:`glmlab.generation.processors`), banned words, the completion record and the rule for
re-encoding a context that fills up (:func:`~glmlab.generation.engine.context_tail`).

Each step scores ``2 * num_beams`` candidate continuations; those that end (EOS, or the length limit)
among the top ``num_beams`` become finished hypotheses scored ``sum_logprobs / length ** length_penalty``
(length = generated tokens, EOS included); the best ``num_beams`` unfinished ones run on. Stopping
follows ``early_stopping``: True stops once ``num_beams`` hypotheses are finished; False stops when
the best running beam, normalised at its current length, cannot beat the worst finished one;
"never" normalises that bound at the maximum length when ``length_penalty > 0``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.generation import processors as P
from glmlab.generation.engine import Completion, bad_word_ids, context_tail
from glmlab.generation.infill import end_id, slides
from glmlab.generation.settings import GenerationSettings
from glmlab.generation.text import continuation

NEG = -1.0e9


@torch.inference_mode()
def beam_search(model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int],
                settings: GenerationSettings) -> list[Completion]:
    """The ``num_return_sequences`` best hypotheses for one prompt, best first."""
    s = settings
    nb, eos = s.num_beams, end_id(model, tokenizer)
    device = next(model.parameters()).device
    block = model.block_size
    bad = bad_word_ids(tokenizer, s.bad_words)
    cache = model.new_cache(1, device)
    max_new = s.max_new_tokens if slides(model, prompt_ids) else min(s.max_new_tokens, cache.max_len - len(prompt_ids))
    logits = model(torch.tensor([prompt_ids], device=device), cache, last_only=True)[:, -1].float()
    cache.select([0] * nb)
    logits = logits.expand(nb, -1)
    vocab = logits.size(-1)
    running: list[list[int]] = [[] for _ in range(nb)]
    running_scores = torch.tensor([0.0] + [NEG] * (nb - 1), device=device)
    finished_scores = torch.full((nb,), NEG, device=device)
    finished: list[list[int] | None] = [None] * nb
    improvable = True
    for step in range(max_new):
        logp = (P.apply_logit_bias(logits, [s.logit_bias] * nb) if s.logit_bias else logits).log_softmax(dim=-1)
        logp = P.apply_constraints(logp, [prompt_ids + r for r in running], running, [s] * nb, [bad] * nb, eos)
        scores, flat = (logp + running_scores[:, None]).view(-1).topk(2 * nb)
        beams, tokens = (flat // vocab).tolist(), (flat % vocab).tolist()
        last_step = step + 1 == max_new
        ends = torch.tensor([(t == eos and s.stop_at_eos) or t in s.stop_token_ids or last_step for t in tokens],
                            device=device)
        candidates = [running[b] + [t] for b, t in zip(beams, tokens, strict=True)]

        # finished hypotheses: ended candidates among the top num_beams, length-normalised
        eligible = ends.clone()
        eligible[nb:] = False
        normalised = scores / float(step + 1) ** s.length_penalty
        full = bool((finished_scores > NEG / 2).all()) and s.early_stopping is True
        if full or not improvable:
            eligible[:] = False
        merged = torch.cat([finished_scores, torch.where(eligible, normalised, torch.full_like(normalised, NEG))])
        pool = finished + candidates
        finished_scores, order = merged.topk(nb)
        finished = [pool[i] if merged[i] > NEG / 2 else None for i in order.tolist()]

        # running beams: the best candidates that did not end
        alive = scores + ends.float() * NEG
        running_scores, keep = alive.topk(nb)
        keep = keep.tolist()
        running = [candidates[i] for i in keep]
        source = [beams[i] for i in keep]

        # stopping (Hugging Face's _check_early_stop_heuristic and _beam_search_has_unfinished_sequences)
        length = max_new if (s.early_stopping == "never" and s.length_penalty > 0) else step + 1
        best_possible = float(running_scores[0]) / float(length) ** s.length_penalty
        all_finished = bool((finished_scores > NEG / 2).all())
        if all_finished:
            improvable = improvable and best_possible > float(finished_scores.min())
        if not improvable or (all_finished and s.early_stopping is True) or bool(ends.all()):
            break
        cache.select(source)
        if cache.lengths[0] >= block:  # context full: re-encode every beam's last half, as the engine's rows do
            contexts = [context_tail(prompt_ids + r, block) for r in running]
            cache = model.new_cache(nb, device)
            if len(contexts[0]) > 1:
                model(torch.tensor([c[:-1] for c in contexts], device=device), cache, last_only=True)
        newest = torch.tensor([[r[-1]] for r in running], device=device)
        logits = model(newest, cache, last_only=True)[:, -1].float()

    results = []
    for score, tokens in zip(finished_scores.tolist(), finished, strict=True):
        if tokens is None:
            continue
        body = tokens[:-1] if tokens and ((tokens[-1] == eos and s.stop_at_eos) or tokens[-1] in s.stop_token_ids) \
            else tokens
        reason = "stop" if len(body) < len(tokens) else "length"
        results.append(Completion(continuation(tokenizer, prompt_ids, body), body, reason, len(prompt_ids),
                                  score=score, ended_at_eos=reason == "stop"))
    return results[: s.num_return_sequences]
