"""The likeliest tokens for each ``[MASK]`` of a text, as Hugging Face's ``pipeline("fill-mask")`` gives them:
``glmlab fill`` and ``LoadedRun.fill``.

For each ``[MASK]``, the ``top_k`` candidates by probability, each with its ``score`` (probability), ``token``
(id), ``token_str`` (its text) and ``sequence`` (the text with that mask filled and any other left as it is).
One mask gives a list of candidates, several a list per mask — the pipeline's shapes, and its conventions: the
whole vocabulary competes (special tokens included), a one-mask sequence is decoded without special tokens and a
several-mask one with them (so the other ``[MASK]``s show), ``<pad>`` is left out of a sequence.

How a family scores a mask follows from how it fills one (``traits.infilling``): a masked LM (``bert``,
``mask_predict``) reads the text once and scores every mask from that one pass; a blank-infilling model (``glm``,
``blank``) scores each blank by the first token of the piece it would write there — Part A is the text with
every ``[MASK]`` in it, and ``<|startofpiece|>`` takes the position of the blank being scored (its
``blank_logits`` at that blank), one row per blank in one batch.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn as nn

from glmlab.data.tokenizer import MASK, MASK_ID, Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import start_id
from glmlab.models.glm import FRAME

FILLS = ("mask_predict", "blank")  # the infilling traits of families that score a mask


class Candidate(TypedDict):
    """One candidate for a mask, in the fill-mask pipeline's shape."""

    score: float
    token: int
    token_str: str
    sequence: str


def check_can_fill(model: nn.Module) -> None:
    """Refuse a model that cannot score a ``[MASK]`` (a causal or latent-variable family)."""
    if model.traits.infilling not in FILLS:
        raise GlmlabError(f"a {model.traits.family} run cannot fill [MASK]s (it was not trained to read [MASK] "
                          "blanks in a text)", "use a bert or a glm run, or glmlab generate to continue a prompt")


def context(model: nn.Module) -> int:
    """How many tokens of text (masks included) the model reads when it scores masks: a masked LM's window; a
    glm's Part A, which leaves one place for ``<|startofpiece|>`` in the ``block_size + 2`` it reads."""
    return model.block_size + FRAME - 1 if model.traits.infilling == "blank" else model.block_size


def mask_logits(model: nn.Module, ids: list[int], masks: list[int]) -> torch.Tensor:
    """Logits (masks, vocab) for the tokens at positions ``masks`` of ``ids``: one pass of a masked LM, or one
    Part A + ``<|startofpiece|>`` row per blank of a glm."""
    device = next(model.parameters()).device
    if model.traits.infilling == "mask_predict":
        return model(torch.tensor([ids], device=device))[0, masks]
    return model.blank_logits(torch.tensor([ids] * len(masks), device=device), blank_at=masks)


@torch.no_grad()
def fill_mask(model: nn.Module, tokenizer: Tokenizer, text: str, top_k: int = 5,
              ) -> list[Candidate] | list[list[Candidate]]:
    """The ``top_k`` likeliest tokens for each ``[MASK]`` in ``text``: a list of candidates for one mask, a list
    per mask for several (the order of the text)."""
    check_can_fill(model)
    if not 1 <= top_k <= model.vocab_size:
        raise GlmlabError(f"top_k={top_k} is outside 1..{model.vocab_size} (the model's vocabulary)",
                          "ask for 5 candidates (the default), or any number up to the vocabulary size")
    ids = tokenizer.encode_checked(text, "text")
    masks = [i for i, t in enumerate(ids) if t == MASK_ID]
    if not masks:
        raise GlmlabError(f"the text holds no {MASK} to fill",
                          f"write {MASK} where a token is missing, e.g. 'The {MASK} sat on the mat.'")
    start = start_id(model, tokenizer)  # a sentence-level run read <bos> first
    head = [] if start is None else [start]
    limit = context(model)
    if len(head) + len(ids) > limit:
        raise GlmlabError(f"the text is {len(head) + len(ids)} tokens long (with its {len(masks)} {MASK}"
                          f"{'s' if len(masks) > 1 else ''}); this {model.traits.family} run reads at most {limit} "
                          "at once", f"shorten the text to at most {limit} tokens around its masks")
    was_training = model.training
    model.eval()
    try:
        logits = mask_logits(model, head + ids, [len(head) + m for m in masks])
    finally:
        model.train(was_training)
    scores, tokens = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
    single = len(masks) == 1
    out = []
    for m, row_scores, row_tokens in zip(masks, scores.tolist(), tokens.tolist(), strict=True):
        row = []
        for score, token in zip(row_scores, row_tokens, strict=True):
            filled = [t for t in ids[:m] + [token] + ids[m + 1:] if t != tokenizer.pad_id]
            row.append(Candidate(score=score, token=token,
                                 token_str=tokenizer.decode([token], skip_special_tokens=False),
                                 sequence=tokenizer.decode(filled, skip_special_tokens=single)))
        out.append(row)
    return out[0] if single else out
