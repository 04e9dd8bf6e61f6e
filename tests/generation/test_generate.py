import pytest
import torch

from glmlab.errors import EncodingError, GlmlabError
from glmlab.generation.generate import GenerationSettings, generate, stream
from glmlab.generation.text import held_back
from glmlab.runs import load_run


@pytest.fixture(scope="module")
def lm(trained_run):
    return load_run(trained_run)


def test_same_seed_same_text_and_different_seed_different_text(lm):
    a = lm.generate("First", max_new_tokens=40, seed=3, stop_at_eos=False)
    b = lm.generate("First", max_new_tokens=40, seed=3, stop_at_eos=False)
    c = lm.generate("First", max_new_tokens=40, seed=4, stop_at_eos=False)
    assert a == b and a != c
    assert all(len(c.token_ids) == 40 for c in lm.complete("First", max_new_tokens=40, seed=3, stop_at_eos=False)[0])


def test_greedy_matches_a_loop_without_cache(lm):
    model, tok = lm
    prompt = "First Citizen:"
    text = lm.generate(prompt, max_new_tokens=12, temperature=0)[0]
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert text == tok.decode(ids[len(tok.encode(prompt)):])


def test_generation_continues_past_the_context(lm):
    text = lm.generate("First", max_new_tokens=3 * lm.model.block_size, temperature=0.8, seed=1,
                       stop_at_eos=False)[0]
    # one character per token, but for a special token (the <eos> this tiny model may sample), which shows as ''
    assert 2 * lm.model.block_size < len(text) <= 3 * lm.model.block_size


def test_long_prompt_keeps_its_end_with_a_warning(lm):
    with pytest.warns(UserWarning, match="dropped"):
        out = lm.generate("First Citizen: " * 10, max_new_tokens=5, seed=0)
    assert len(out[0]) == 5


def test_stop_strings_are_cut_and_not_returned(lm):
    free = lm.generate("First", max_new_tokens=60, seed=11)[0]
    stop = free[20:22]
    cut = lm.generate("First", max_new_tokens=60, seed=11, stop=[stop])[0]
    assert cut == free[: free.find(stop)]


def test_stream_concatenates_to_the_generated_text(lm):
    settings = dict(max_new_tokens=50, seed=9, temperature=0.9)
    whole = lm.generate("First", **settings)[0]
    deltas = list(lm.stream("First", **settings))
    assert "".join(deltas) == whole and len(deltas) > 1
    stop = whole[30:33]
    assert "".join(lm.stream("First", stop=[stop], **settings)) == whole[: whole.find(stop)]


def test_held_back_text():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("abc\ufffd", []) == 1
    assert held_back("abc", ["xyz"]) == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(num_return_sequences=0), dict(stop=[""]),
                                 dict(min_p=2), dict(presence_penalty=3), dict(num_beams=2, num_return_sequences=3),
                                 dict(logprobs=50), dict(early_stopping="sometimes")])
def test_out_of_range_settings_are_refused(lm, bad):
    with pytest.raises(GlmlabError, match="invalid sampling setting"):
        generate(lm.model, lm.tokenizer, "a", GenerationSettings(**bad))


def test_unencodable_prompt_names_characters(lm):
    with pytest.raises(EncodingError, match="'€'"):
        list(stream(lm.model, lm.tokenizer, "price: 5€", GenerationSettings(max_new_tokens=2)))
