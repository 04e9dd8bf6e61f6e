"""What a row starts from per family (generation/infill.py): fill-in-the-middle layouts, refusals, and rows that
must not slide past a full context."""

from __future__ import annotations

import pytest
import torch

from glmlab.data.fim import fim_prompt
from glmlab.data.tokenizer import EOP_ID, GMASK_ID, MASK_ID, SOP_ID, train_char
from glmlab.errors import GlmlabError
from glmlab.generation.generate import generate_batch
from glmlab.generation.infill import end_id, prompt_ids
from glmlab.generation.settings import GenerationSettings
from glmlab.models.glm import GLM, GLMConfig
from glmlab.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = train_char(["abcdefghijklmnopqrstuvwxyz .,"])


def gpt(fim: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          dropout=0.0)).eval()
    if fim:
        model.traits = model.traits.filling_in_the_middle()
    return model


def test_each_family_lays_out_prefix_and_suffix_its_own_way():
    fim = prompt_ids(gpt(fim=True), TOK, "ab", "yz")
    assert fim == fim_prompt(TOK.encode("ab"), TOK.encode("yz"))
    torch.manual_seed(0)
    glm = GLM(GLMConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    assert prompt_ids(glm, TOK, "ab", "yz") == [*TOK.encode("ab"), MASK_ID, *TOK.encode("yz"), SOP_ID]
    assert prompt_ids(glm, TOK, "ab") == [*TOK.encode("ab"), GMASK_ID, SOP_ID]
    assert end_id(glm, TOK) == EOP_ID and end_id(gpt(fim=True), TOK) == TOK.eos_id
    with pytest.raises(GlmlabError, match="cannot fill in the middle"):
        prompt_ids(gpt(fim=False), TOK, "ab", "yz")
    with pytest.raises(GlmlabError, match="leaves no room"):
        prompt_ids(gpt(fim=True), TOK, "ab", "y" * 20)


def test_a_middle_ends_at_its_context_instead_of_losing_its_sentinels():
    model = gpt(fim=True)
    settings = GenerationSettings(max_new_tokens=40, temperature=0.0, stop_at_eos=False)
    [middle] = generate_batch(model, TOK, ["ab"], settings, ["yz"])[0]
    laid_out = len(fim_prompt(TOK.encode("ab"), TOK.encode("yz")))
    assert middle.finish_reason == "length" and len(middle.token_ids) == 16 - laid_out
    [plain] = generate_batch(model, TOK, ["ab"], settings)[0]  # a plain prompt still slides on
    assert len(plain.token_ids) == 40
