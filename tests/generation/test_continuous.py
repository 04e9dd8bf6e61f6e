"""Continuous batching: rows that join and leave a running batch get the tokens they would get alone."""

import pytest
import torch

from glmlab.errors import GlmlabError
from glmlab.generation.continuous import ContinuousBatch
from glmlab.generation.engine import encode_prompt
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models.lstm import LSTMLM, LSTMConfig
from glmlab.runs import load_run

REQUESTS = [  # prompt, settings, sample index
    ("First", GenerationSettings(max_new_tokens=12, seed=1), 0),
    ("Citizen: we", GenerationSettings(max_new_tokens=30, seed=2, temperature=0.7, top_k=5), 1),
    ("A", GenerationSettings(max_new_tokens=20, temperature=0), 0),
    ("You are", GenerationSettings(max_new_tokens=25, seed=4, top_p=0.9, stop=["e"], logprobs=2), 0),
    ("Speak", GenerationSettings(max_new_tokens=70, seed=5, repetition_penalty=1.3, stop_at_eos=False), 0),
    ("O", GenerationSettings(max_new_tokens=9, seed=6, presence_penalty=1.0, frequency_penalty=0.5), 2),
]


@pytest.fixture(scope="module")
def lm(trained_run):
    return load_run(trained_run)


def alone(model, tokenizer, prompt, settings, index):
    """What generate_batch gives this row (sample ``index`` of a request)."""
    n = GenerationSettings(**{**settings.__dict__, "num_return_sequences": index + 1})
    return generate_batch(model, tokenizer, [prompt], n)[0][index]


def run_staggered(model, tokenizer, slots, cancel=None):
    """Add one request per step (waiting while the batch is full); collect deltas and completions."""
    batch = ContinuousBatch(model, tokenizer, slots)
    pending = list(enumerate(REQUESTS))
    texts, done = {}, {}
    while pending or batch.active or batch.free_slots < slots:
        if pending and batch.free_slots:
            key, (prompt, settings, index) = pending.pop(0)
            ids = encode_prompt(tokenizer, prompt, model.block_size, model.config.vocab_size)
            batch.add(key, ids, settings, index)
        events = batch.step()
        # rows that outlive others move down into the freed slots: the slots in use stay 0..n-1
        assert batch.slots_in_use == list(range(len(batch.slots_in_use)))
        for event in events:
            texts[event.key] = texts.get(event.key, "") + event.delta
            if event.completion is not None:
                done[event.key] = event.completion
            if cancel is not None and event.key == cancel and len(texts[cancel]) >= 3:
                assert batch.cancel(cancel)
                done[cancel] = None
    return texts, done


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_rows_joining_and_leaving_get_what_they_get_alone(lm, one_thread, slots):
    texts, done = run_staggered(lm.model, lm.tokenizer, slots)
    for key, (prompt, settings, index) in enumerate(REQUESTS):
        expected = alone(lm.model, lm.tokenizer, prompt, settings, index)
        got = done[key]
        assert got.token_ids == expected.token_ids, key
        assert got.text == expected.text and texts[key] == expected.text
        assert got.finish_reason == expected.finish_reason
        if settings.logprobs:
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in expected.logprobs],
                                                                      abs=1e-4)
    assert len(done[4].token_ids) == 70 > lm.model.block_size  # re-encoded when the context filled


def test_a_cancelled_row_frees_its_slot_for_the_others(lm, one_thread):
    texts, done = run_staggered(lm.model, lm.tokenizer, 2, cancel=1)
    assert done[1] is None
    for key in (0, 2, 3, 4, 5):
        prompt, settings, index = REQUESTS[key]
        assert done[key].token_ids == alone(lm.model, lm.tokenizer, prompt, settings, index).token_ids


def test_an_lstm_batch_matches_generate_batch(lm, one_thread):
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=lm.tokenizer.vocab_size, n_embd=16, n_hidden=24, block_size=16,
                              dropout=0.0)).eval()
    texts, done = run_staggered(model, lm.tokenizer, 3)
    for key, (prompt, settings, index) in enumerate(REQUESTS):
        assert done[key].token_ids == alone(model, lm.tokenizer, prompt, settings, index).token_ids


def test_publish_gets_each_steps_events_before_the_next_decode(lm, one_thread, monkeypatch):
    """A server hands a step's events on while the model computes the next step: ``publish`` receives
    exactly the events ``step`` returns, before the model is asked for the next logits."""
    model, order = lm.model, []
    decode = model.decode_rows

    def recording(*args, **kwargs):
        order.append("decode")
        return decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode_rows", recording)
    batch = ContinuousBatch(model, lm.tokenizer, 2)
    batch.add("a", [5, 6], GenerationSettings(max_new_tokens=3, seed=1))
    batch.add("b", [7], GenerationSettings(max_new_tokens=2, seed=2))
    published, returned = [], []
    while batch.active or not returned:
        order.clear()
        events = batch.step(publish=lambda ev: (order.append("publish"), published.append(ev)))
        returned.append(events)
        assert order[:1] == ["publish"] and order.count("publish") == 1
    assert published == returned and [len(e) for e in returned] == [2, 2, 1]
    assert returned[-1][0].completion is not None and order == ["publish"]  # the last step decodes nothing


def test_adding_to_a_full_batch_or_twice_is_refused(lm):
    batch = ContinuousBatch(lm.model, lm.tokenizer, 1)
    batch.add("a", [5, 6], GenerationSettings(max_new_tokens=2))
    with pytest.raises(GlmlabError, match="already in the batch|every slot"):
        batch.add("b", [5, 6], GenerationSettings(max_new_tokens=2))
    assert not batch.cancel("missing") and batch.cancel("a") and batch.free_slots == 1


def test_move_row_carries_a_rows_whole_state_to_a_free_slot(lm):
    from glmlab.models.vae import SentenceVAE, VAEConfig

    torch.manual_seed(0)
    vae = SentenceVAE(VAEConfig(vocab_size=30, n_embd=8, n_hidden=8, encoder_hidden=8, latent_dim=4)).eval()
    for model in (lm.model, vae):
        cache, reference = model.new_cache(4, torch.device("cpu")), model.new_cache(4, torch.device("cpu"))
        if model is vae:  # a row's own z travels with it
            cache.cond[3] += 1.0
            reference.cond[3] += 1.0
            cache.initial, reference.initial = vae.initial_state(cache.cond), vae.initial_state(reference.cond)
            cache.reset_row(3)
            reference.reset_row(3)
        with torch.no_grad():
            for c in (cache, reference):
                model(torch.tensor([[5, 6, 7]]), c, rows=[3])
            cache.move_row(3, 1)
            moved = model(torch.tensor([[8]]), cache, rows=[1], last_only=True)
            stayed = model(torch.tensor([[8]]), reference, rows=[3], last_only=True)
        assert torch.allclose(moved, stayed, atol=1e-6)
        assert cache.lengths[1] == 4 and cache.lengths[3] == 0


def test_int8_decode_weights_are_what_a_batch_decodes_with(lm, one_thread, monkeypatch):
    """``--decode-weights int8`` reaches every decoding step of the loop the server and generate_batch run (it
    used to fall back to the native forward there); the prompt is still read at full precision."""
    import copy

    import glmlab.models.gpt as gpt

    model = copy.deepcopy(lm.model)
    settings = GenerationSettings(max_new_tokens=12, temperature=0, logprobs=0, stop_at_eos=False)
    native = generate_batch(model, lm.tokenizer, ["First", "You are"], settings)
    model.set_decode_weights("int8")
    calls = []
    real = gpt.decode_rows_int8
    monkeypatch.setattr(gpt, "decode_rows_int8", lambda *args: calls.append(1) or real(*args))
    quantized = generate_batch(model, lm.tokenizer, ["First", "You are"], settings)
    assert len(calls) == 11  # every step after the prompt's
    for a, b in zip(native, quantized, strict=True):
        first_a, first_b = a[0].logprobs[0].logprob, b[0].logprobs[0].logprob
        # the first token's log-probability comes from the full-precision prefill: equal to rounding (the two
        # calls may take different fp32 kernels), where int8 weights move log-probabilities by 1e-3 and more
        assert abs(first_a - first_b) < 1e-5
        diffs = []
        for x, y in zip(a[0].logprobs[1:], b[0].logprobs[1:], strict=True):
            if x.token_id != y.token_id:  # greedy paths may part; compare while they agree
                break
            diffs.append(abs(x.logprob - y.logprob))
        assert diffs and 0 < max(diffs) < 0.5
