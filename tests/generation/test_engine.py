"""The batched engine: ragged batches, per-request seeds, logprobs, limits, incremental text, beam search."""

import types

import pytest
import torch

from glmlab.data.tokenizer import train_tokenizer
from glmlab.generation.beam import beam_search
from glmlab.generation.generate import GenerationSettings, generate_batch, stream
from glmlab.generation.text import IncrementalText, continuation
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.runs import load_run


@pytest.fixture(scope="module")
def lm(trained_run):
    return load_run(trained_run)


def test_a_ragged_batch_matches_each_prompt_alone(lm):
    prompts = ["First", "Citizen: we are", "A"]
    greedy = GenerationSettings(max_new_tokens=30, temperature=0)
    together = generate_batch(lm.model, lm.tokenizer, prompts, greedy)
    for prompt, completions in zip(prompts, together, strict=True):
        alone = generate_batch(lm.model, lm.tokenizer, [prompt], greedy)[0]
        assert completions[0].token_ids == alone[0].token_ids


def test_seeds_are_per_request_whatever_else_is_in_the_batch(lm):
    mine = GenerationSettings(max_new_tokens=25, seed=7, num_return_sequences=2)
    other = GenerationSettings(max_new_tokens=40, seed=99, temperature=0.7)
    alone = generate_batch(lm.model, lm.tokenizer, ["First"], mine)[0]
    mixed = generate_batch(lm.model, lm.tokenizer, ["Second thing", "First"], [other, mine])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]
    assert alone[0].token_ids != alone[1].token_ids  # the two samples of one request differ


def test_logprobs_are_the_model_distribution(lm):
    settings = GenerationSettings(max_new_tokens=6, seed=1, logprobs=3, top_k=5)
    completion = generate_batch(lm.model, lm.tokenizer, ["First"], settings)[0][0]
    ids = lm.tokenizer.encode("First") + completion.token_ids
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids])).log_softmax(-1)[0]
    start = len(lm.tokenizer.encode("First")) - 1
    for i, entry in enumerate(completion.logprobs):
        assert entry.token_id == completion.token_ids[i]
        assert entry.logprob == pytest.approx(float(logp[start + i, entry.token_id]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]
        assert entry.top[0][0] == int(logp[start + i].argmax())


def test_finish_reasons_and_min_new_tokens(lm):
    eos = lm.tokenizer.eos_id
    out = generate_batch(lm.model, lm.tokenizer, ["First"], GenerationSettings(max_new_tokens=8, seed=0))[0][0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8 and out.prompt_tokens == 5
    timed = generate_batch(lm.model, lm.tokenizer, ["First"], GenerationSettings(max_new_tokens=100_000,
                                                                                 max_time=0.2, seed=0,
                                                                                 stop_at_eos=False))[0][0]
    assert timed.finish_reason == "time" and len(timed.token_ids) < 100_000
    result = generate_batch(lm.model, lm.tokenizer, [[eos]], GenerationSettings(max_new_tokens=5, min_new_tokens=5,
                                                                                bad_words=["e"], seed=3))[0][0]
    assert len(result.token_ids) == 5 and eos not in result.token_ids
    assert lm.tokenizer.encode("e")[0] not in result.token_ids


def test_incremental_text_never_splits_a_character():
    tok = train_tokenizer("bpe", ["plain ascii text only " * 50], vocab_size=300)
    text = "héllo wörld 😀 日本"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    inc = IncrementalText(tok)
    deltas = [inc.push(i) for i in ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens completed no character


def test_char_incremental_text_matches_a_full_decode_even_past_the_vocabulary():
    tok = train_tokenizer("char", ["to be or not to be\nthat is the question"])
    ids = tok.encode("to be\nor not") + [tok.eos_id, tok.vocab_size + 5] + tok.encode(" that")
    inc = IncrementalText(tok)
    deltas = [inc.push(i) for i in ids]
    assert "".join(deltas) == inc.text == tok.decode(ids) == "to be\nor not that"


def test_word_level_incremental_text_matches_a_full_decode():
    tok = train_tokenizer("word", ["to be or not to be\nthat is the question\n\nwhether"], vocab_size=100)
    ids = tok.encode("to be or\n\nnot to be\nthat")
    inc = IncrementalText(tok)
    assert "".join(inc.push(i) for i in ids) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["word", "unigram", "bpe", "char"])
def test_a_continuation_appended_to_its_prompt_reads_as_the_whole_text(kind):
    corpus = ["the game was played in the rain and the crowd went home\nthe end"] * 30
    tok = train_tokenizer(kind, corpus, vocab_size={"char": None, "bpe": 300}.get(kind, 60))
    prompt, rest = tok.encode("the game"), tok.encode("the game was played\nthe end")[len(tok.encode("the game")):]
    whole = tok.decode(prompt + rest)
    assert tok.decode(prompt) + continuation(tok, prompt, rest) == whole
    inc = IncrementalText(tok, context=prompt)
    assert tok.decode(prompt) + "".join(inc.push(i) for i in rest) == whole
    if kind == "word":  # decoded alone, the first word would lose its space
        assert tok.decode(prompt) + tok.decode(rest) != whole
        ended = [*prompt, tok.eos_id]  # a special token last: the word before it gives the spacing
        expected = whole[len(tok.decode(prompt)):]
        assert expected.startswith(" was") and continuation(tok, ended, rest) == expected
        after_eos = IncrementalText(tok, context=ended)
        assert "".join(after_eos.push(i) for i in rest) == expected


def test_generated_text_keeps_the_space_between_the_prompt_and_the_first_word():
    tok = train_tokenizer("word", ["the game was played in the rain and the crowd went home"] * 5, vocab_size=60)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    settings = GenerationSettings(max_new_tokens=4, seed=3, stop_at_eos=False)
    [[done]] = generate_batch(model, tok, ["the game"], settings)
    [beam] = beam_search(model, tok, tok.encode("the game"), GenerationSettings(max_new_tokens=4, num_beams=2))
    for completion in (done, beam):
        assert completion.text.startswith(" ") and "the game" + completion.text == tok.decode(
            tok.encode("the game") + completion.token_ids)
    assert "".join(stream(model, tok, "the game", settings)) == done.text


def _tiny_pair(vocab=40):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32,
                                                               n_layer=2, n_head=2, bos_token_id=None,
                                                               eos_token_id=None)).eval()
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    return ours, hf


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.5, True), (2.0, "never")])
def test_beam_search_matches_transformers(length_penalty, early_stopping):
    ours, hf = _tiny_pair()
    prompt = [5, 9, 2, 17]
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    eos = greedy[len(prompt) + 2]  # a token the model likes: beams end at different lengths
    fake_tokenizer = types.SimpleNamespace(eos_id=eos, encode=lambda text: [], decode=lambda ids: "")
    settings = GenerationSettings(max_new_tokens=10, num_beams=4, num_return_sequences=3,
                                  length_penalty=length_penalty, early_stopping=early_stopping)
    ours_out = beam_search(ours, fake_tokenizer, prompt, settings)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, num_beams=4, num_return_sequences=3,
                             do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                             eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    for completion, sequence, score in zip(ours_out, theirs.sequences.tolist(), theirs.sequences_scores.tolist(),
                                           strict=True):
        body = sequence[len(prompt):]
        if eos in body:
            body = body[: body.index(eos)]
        assert completion.token_ids == body
        assert completion.score == pytest.approx(score, abs=1e-4)


def test_a_row_time_limit_does_not_stop_its_neighbours(lm):
    quick = GenerationSettings(max_new_tokens=100_000, max_time=0.05, seed=1, stop_at_eos=False)
    full = GenerationSettings(max_new_tokens=300, seed=2, stop_at_eos=False)
    timed, whole = generate_batch(lm.model, lm.tokenizer, ["First", "First"], [quick, full])
    assert timed[0].finish_reason == "time"
    assert whole[0].finish_reason == "length" and len(whole[0].token_ids) == 300


def test_logprobs_keep_the_closing_eos_as_vllm_does(lm):
    """A row that ends by generating <eos> reports that token's log-probability last (its text is not part of
    the output): what lm-evaluation-harness reads as the generated token when it scores an echoed prompt."""
    ended_by_eos = 0
    eos = lm.tokenizer.eos_id
    for seed in range(40):
        c = generate_batch(lm.model, lm.tokenizer, [""], GenerationSettings(max_new_tokens=30, seed=seed,
                                                                           logprobs=1))[0][0]
        assert [e.token_id for e in c.logprobs] == c.token_ids + ([eos] if c.ended_at_eos else [])
        assert c.generated_tokens == len(c.logprobs)
        assert eos not in c.token_ids and c.ended_at_eos == (c.finish_reason == "stop")
        if c.ended_at_eos:
            ended_by_eos += 1
            with torch.no_grad():  # the kept value is the model's own log-probability of <eos> there
                ids = torch.tensor([[eos, *c.token_ids]])
                expected = lm.model(ids).float().log_softmax(-1)[0, -1, eos].item()
            assert c.logprobs[-1].logprob == pytest.approx(expected, abs=1e-4)
    assert ended_by_eos > 0


def test_token_id_prompts_are_checked_and_unseeded_sampling_leaves_the_global_rng(lm):
    from glmlab.errors import GlmlabError

    with pytest.raises(GlmlabError, match="outside the vocabulary"):
        generate_batch(lm.model, lm.tokenizer, [[1, 10_000]], GenerationSettings(max_new_tokens=2))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_batch(lm.model, lm.tokenizer, ["First"], GenerationSettings(max_new_tokens=5))
    assert torch.equal(torch.rand(3), expected)


def test_a_one_token_context_still_generates():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=1, n_layer=1, n_head=1, n_embd=8)).eval()
    tok = types.SimpleNamespace(eos_id=3, kind="char", encode=lambda text: [], decode=lambda ids, **kw: "x" * len(ids),
                                encode_checked=lambda text, what="prompt": [5, 6, 7])
    with pytest.warns(UserWarning, match="dropped"):
        out = generate_batch(model, tok, ["abc"], GenerationSettings(max_new_tokens=6, temperature=0,
                                                                       stop_at_eos=False))[0][0]
    assert len(out.token_ids) == 6


def test_running_out_of_memory_is_a_clear_error(lm, monkeypatch):
    from glmlab.errors import GlmlabError

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(lm.model, "new_cache", no_memory)
    with pytest.raises(GlmlabError, match="not enough memory to decode 64"):
        generate_batch(lm.model, lm.tokenizer, ["First"], GenerationSettings(num_return_sequences=64))
