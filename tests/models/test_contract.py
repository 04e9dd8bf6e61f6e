"""Every registered family against the family contract (glmlab/models/contract.py): a new family is tested by
registering it and giving it a tiny config here.

Checked for each: its traits are consistent with what it has; its loss is finite and agrees with its summed
NLL; decoding with a cache gives the full forward pass's logits (rows at one position and at several);
its weights survive a save/load round trip; the engine decodes it greedily exactly as an argmax loop over the
full forward pass does; its features turn into its logits; its cache's slots move and reset; a latent model's
decoder given z decodes row i from z[i].
"""

from __future__ import annotations

import pytest
import torch

from glmlab.data.tokenizer import SPECIAL_TOKENS, train_char
from glmlab.errors import GlmlabError
from glmlab.generation.generate import generate_batch
from glmlab.generation.infill import prompt_ids
from glmlab.generation.settings import GenerationSettings
from glmlab.models import FAMILIES, build_model, family_config_class, family_traits
from glmlab.models.contract import FAST_PATHS, DecodeCache, LanguageModel
from glmlab.models.lora import lora_targets
from glmlab.runs import load_weights, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 60
TINY = {
    "glm": dict(n_layer=2, n_head=2, n_embd=16, dropout=0.0),
    "bert": dict(n_layer=2, n_head=2, n_embd=16, dropout=0.0),
    "gpt": dict(n_layer=2, n_head=2, n_embd=16, dropout=0.0),
    "lstm": dict(n_embd=8, n_hidden=16, n_layer=2, dropout=0.0),
    "seqgan": dict(n_embd=8, n_hidden=16, d_embd=8, d_filter_sizes="1,2", d_num_filters="4,4", d_dropout=0.0,
                   adv_rounds=2),
    "vae": dict(n_embd=8, n_hidden=16, encoder_hidden=8, latent_dim=4, dropout=0.0),
}


def tiny(family: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    config = family_config_class(family)(family=family, vocab_size=VOCAB, block_size=16, **TINY[family])
    config.validate()
    return build_model(config).eval()


def ids(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(len(SPECIAL_TOKENS), VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


families = pytest.mark.parametrize("family", sorted(FAMILIES))
# families whose loss is the NLL they report (the others train on an objective of their own: masked tokens,
# blanked spans)
causal = pytest.mark.parametrize("family", [f for f in sorted(FAMILIES)
                                            if family_traits(family_config_class(f)()).objective == "causal"])
# families the engine decodes token by token through a cache
left_to_right = pytest.mark.parametrize("family", [f for f in sorted(FAMILIES)
                                                   if family_traits(family_config_class(f)()).left_to_right])


def test_every_family_has_a_tiny_config_here():
    assert set(TINY) == set(FAMILIES)


@families
def test_traits_say_what_the_model_has(family):
    model = tiny(family)
    traits = model.traits
    assert isinstance(model, LanguageModel) and traits.family == family
    assert traits == family_traits(model.config), "traits come from the config alone"
    assert traits.sentence_level or traits.windows
    assert build_model(model.config, sentences=True).traits.sentence_level
    assert build_model(model.config, sentences=False).traits.sentence_level == (not traits.windows)
    for name in traits.fast_paths:
        assert name in FAST_PATHS and callable(getattr(model, name)), name
    for name in traits.auxiliary:
        assert sum(p.numel() for p in model.get_submodule(name).parameters()) > 0
    if traits.adapter_targets:
        assert lora_targets(model)
    else:
        with pytest.raises(GlmlabError, match="--mode lora"):
            lora_targets(model)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@causal
def test_loss_is_finite_and_agrees_with_the_summed_nll(family):
    model = tiny(family)
    x, y = ids(3, 10), ids(3, 10, seed=2)
    y[0, 7:] = -100  # padding is not scored
    tokens = int((y != -100).sum())
    torch.manual_seed(0)  # a latent model draws z for its loss from the global generator, and seeds its nll's
    with torch.no_grad():
        loss = model.loss(x, y)
        nll = model.nll(x, y)
    assert torch.isfinite(loss) and torch.isfinite(nll) and nll > 0
    assert float(loss) * tokens == pytest.approx(float(nll), rel=1e-5)  # exact NLL, or -ELBO with the same z


@left_to_right
def test_cached_decoding_gives_the_full_forward_pass(family):
    model = tiny(family)
    idx = ids(2, 12)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, torch.device("cpu"))
        assert isinstance(cache, DecodeCache)
        steps = [model(idx[:, :5], cache)]
        steps += [model(idx[:, t:t + 1], cache) for t in range(5, 12)]
        assert cache.lengths[0] == cache.lengths[1] >= 12  # a glm's slot also holds the [gMASK] it reads first
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
        ragged = model.new_cache(2, torch.device("cpu"))  # rows of different lengths, right-padded
        last = model(idx[:, :8], ragged, valid=[5, 8], last_only=True)[:, -1]
        torch.testing.assert_close(last, full[[0, 1], [4, 7]], atol=1e-5, rtol=1e-4)
        nxt = model(idx[:, 8:9], ragged, last_only=True)[:, -1]  # each row goes on from its own position
        row0 = model(torch.cat([idx[:1, :5], idx[:1, 8:9]], dim=1))[0, -1]
        torch.testing.assert_close(nxt, torch.stack([row0, full[1, 8]]), atol=1e-5, rtol=1e-4)


@families
def test_every_loss_is_finite_and_every_nll_positive(family):
    model = tiny(family)
    x, y = ids(3, 10), ids(3, 10, seed=2)
    y[0, 7:] = -100
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.isfinite(model.loss(x, y))
        assert torch.isfinite(model.nll(x, y)) and model.nll(x, y) > 0


@families
def test_weights_survive_a_save_load_round_trip(family, tmp_path):
    model = tiny(family)
    save_weights(model, tmp_path / "w.safetensors")
    other = tiny(family, seed=5)
    load_weights(other, tmp_path / "w.safetensors")
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


@left_to_right
def test_the_engine_decodes_greedily_as_an_argmax_loop_over_the_full_pass(family):
    model = tiny(family)
    tokenizer = train_char(["abcdefghijklmnopqrstuvwxyz .,!?"])
    assert tokenizer.vocab_size <= VOCAB
    prompt = "hi, you"  # with <bos> and 6 new tokens, inside the context of 16
    settings = GenerationSettings(temperature=0.0, max_new_tokens=6, stop_at_eos=False)
    completion = generate_batch(model, tokenizer, [prompt], settings)[0][0]
    sequence = prompt_ids(model, tokenizer, prompt)  # what the row starts from (a glm's prompt as Part A)
    assert sequence[-len(tokenizer.encode(prompt)):] == tokenizer.encode(prompt) or model.traits.objective != "causal"
    with torch.no_grad():
        for _ in range(6):  # the whole sequence read afresh at each step
            full = model(torch.tensor([sequence]), model.new_cache(1, torch.device("cpu")), last_only=True)
            sequence.append(int(full[0, -1].argmax()))
    assert completion.token_ids == sequence[-6:]


@families
def test_features_turn_into_the_logits(family):
    model = tiny(family)
    x = ids(2, 7)
    if not model.traits.feature_width:
        with pytest.raises(GlmlabError, match="no per-token features"):
            model.features(x)
        return
    with torch.no_grad():
        h = model.features(x)
        assert h.shape == (2, 7, model.traits.feature_width)
        torch.testing.assert_close(model.features_to_logits(h), model(x), atol=1e-5, rtol=1e-4)


@left_to_right
def test_cache_slots_move_and_reset(family):
    model = tiny(family)
    idx, cpu = ids(3, 6), torch.device("cpu")
    token = torch.full((1, 1), 5)
    with torch.no_grad():
        alone = model.new_cache(1, cpu)
        model(idx[2:], alone)
        expected = model(token, alone, last_only=True)[:, -1]  # row 2, then one more token, in a cache of its own
        cache = model.new_cache(3, cpu)
        model(idx[2:], cache, rows=[2])  # row 2 in slot 2
        held = cache.lengths[2]
        cache.move_row(2, 0)
        assert cache.lengths == [held, 0, 0] and held >= 6
        torch.testing.assert_close(model(token, cache, rows=[0], last_only=True)[:, -1], expected, atol=1e-5,
                                   rtol=1e-4)
        cache.reset_row(0)
        assert cache.lengths[0] == 0
        fresh = model(idx[:1], model.new_cache(1, cpu), last_only=True)[:, -1]
        torch.testing.assert_close(model(idx[:1], cache, rows=[0], last_only=True)[:, -1], fresh, atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if family_traits(tiny(f).config).latent_dim])
def test_a_latent_model_decodes_row_i_from_z_i(family):
    model = tiny(family)
    d = model.traits.latent_dim
    mu, logvar = model.encode(ids(3, 6))
    assert mu.shape == logvar.shape == (3, d)
    z = model.sample_prior(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, d) and model.kl_divergence(mu, logvar).shape == (3,)
    decoder = model.given(z)
    assert isinstance(decoder, LanguageModel) and not decoder.traits.latent_dim
    x = ids(3, 5)
    with torch.no_grad():
        together = decoder(x)
        for i in range(3):
            torch.testing.assert_close(model.given(z[i:i + 1])(x[i:i + 1])[0], together[i], atol=1e-5, rtol=1e-4)
