"""What a row of the engine starts from, for every family: a prompt to continue, or a blank to fill.

A causal model continues its prompt. A `gpt` trained with ``train.fim_rate`` fills the middle between a prompt
and a suffix from its sentinel layout (:func:`glmlab.data.fim.fim_prompt`, ended by ``<eos>``). A `glm` reads
its prompt as Part A, bidirectionally: the text and ``[gMASK]`` to continue it, or prefix ``[MASK]`` suffix to
fill the blank, then writes the piece after ``<|startofpiece|>`` until ``<|endofpiece|>``; a text with several
``[MASK]`` blanks is filled one blank at a time (:func:`fill_blanks`). A `bert` writes by mask-predict
(:mod:`glmlab.generation.mask_predict`), not through the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from glmlab.data.fim import fim_prompt
from glmlab.data.tokenizer import BLANKS, EOP_ID, FIM_PREFIX_ID, GMASK_ID, MASK_ID, Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import encode_prompt, start_id, token_ids
from glmlab.models.glm import frame


def end_id(model: nn.Module, tokenizer: Tokenizer) -> int:
    """The token that ends what a row writes: ``<|endofpiece|>`` for a glm's piece, else ``<eos>``."""
    return EOP_ID if model.traits.objective == "blank_infilling" else tokenizer.eos_id


def check_suffix(model: nn.Module, family: str | None = None) -> None:
    """Refuse a suffix for a model that cannot fill in the middle."""
    if model.traits.infilling is None:
        raise GlmlabError(f"this {family or model.traits.family} run cannot fill in the middle (no suffix)",
                          "drop the suffix, or use a run that can infill: glm, bert, or a gpt trained with "
                          "train.fim_rate > 0")


def prompt_ids(model: nn.Module, tokenizer: Tokenizer, prompt: str | Sequence[int],
               suffix: str | Sequence[int] | None = None) -> list[int]:
    """The ids a row starts from: the prompt (cut to fit the context, keeping its end) for a causal model, and
    the layouts above with a suffix or for a glm. A suffix that leaves no room is refused."""
    traits = model.traits
    if suffix is not None:
        check_suffix(model)
    if traits.objective != "blank_infilling" and suffix is None:
        return encode_prompt(tokenizer, prompt, model.block_size, model.vocab_size, start_id(model, tokenizer))
    tail = token_ids(tokenizer, suffix, model.vocab_size, "suffix") if suffix is not None else []
    if any(t in BLANKS for t in tail):
        raise GlmlabError("the suffix holds a blank token ([MASK], [sMASK] or [gMASK])",
                          "put the blanks in the prompt and drop the suffix")
    room = model.block_size - 1 - len(tail) - (1 if traits.objective == "blank_infilling" else 3)
    if room < 0:
        raise GlmlabError(f"a suffix of {len(tail)} tokens leaves no room in the context of {model.block_size}",
                          "shorten the suffix")
    start = start_id(model, tokenizer)
    head = ([start] if start is not None else []) + token_ids(tokenizer, prompt, model.vocab_size)
    head = head[max(0, len(head) - room):]
    if traits.objective == "blank_infilling":
        if suffix is None:
            return frame(head if any(t in BLANKS for t in head) else [*head, GMASK_ID])
        return frame([*head, MASK_ID, *tail])
    return fim_prompt(head, tail)


def slides(model: nn.Module, ids: Sequence[int]) -> bool:
    """Whether a row that starts from ``ids`` may go on past a full context by re-encoding its tail: only a plain
    prompt of a model that slides (a glm's piece belongs to its Part A, a fill-in-the-middle row's middle to its
    sentinel layout: such a row ends when its context is full)."""
    return model.traits.slides and FIM_PREFIX_ID not in ids


def blanks_in(model: nn.Module, tokenizer: Tokenizer, text: str) -> int:
    """How many ``[MASK]``-style blanks a prompt holds for a glm to fill (0 for other families)."""
    if model.traits.objective != "blank_infilling":
        return 0
    return sum(t in BLANKS for t in tokenizer.encode(text))
