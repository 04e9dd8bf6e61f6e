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
        assert sorted(e.slot for e in batch._by_key.values()) == list(range(len(batch._by_key)))
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


@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 1, 6], [2, 3]])
def test_decode_rows_matches_the_general_forward(lm, slots):
    model = lm.model
    cache = model.new_cache(8, torch.device("cpu"))
    reference = model.new_cache(8, torch.device("cpu"))
    prompts = [[5, 6, 7, 8, 9][: 2 + i] for i in range(len(slots))]
    if len(slots) == 2:
        prompts = [[5, 6, 7], [8, 9, 10]]  # one position, consecutive slots: the plain step on a view
    with torch.no_grad():
        for c in (cache, reference):
            for slot, ids in zip(slots, prompts, strict=True):
                model(torch.tensor([ids]), c, rows=[slot])
        tokens = torch.tensor([11, 12, 13][: len(slots)])
        fast = model.decode_rows(tokens, cache, slots)
        slow = model(tokens[:, None], reference, rows=slots, last_only=True)[:, -1]
    assert torch.allclose(fast, slow, atol=1e-5)
    assert [cache.lengths[s] for s in slots] == [reference.lengths[s] for s in slots]


@pytest.mark.parametrize("scripted", [True, False])
@pytest.mark.parametrize("lengths", [[5, 2, 4], [5, 5, 5], [1, 5, 1]])
def test_prefill_rows_matches_the_general_forward(lm, scripted, lengths, monkeypatch):
    """Right-padded prompts of different (or equal: nothing to pack) lengths into scattered empty slots:
    the same logits at each prompt's last token, the same keys and values, the same fill levels; the
    eager function equals the compiled one."""
    from glmlab.models import gpt_decode

    if not scripted:
        monkeypatch.setattr("glmlab.models.gpt.scripted_prefill_rows", lambda: gpt_decode.prefill_rows)
    model = lm.model
    cache, reference = model.new_cache(8, torch.device("cpu")), model.new_cache(8, torch.device("cpu"))
    slots = [6, 1, 3]
    idx = torch.tensor([[5 + 3 * r + t if t < n else 0 for t in range(5)] for r, n in enumerate(lengths)])
    with torch.no_grad():
        fast = model.prefill_rows(idx, cache, slots, lengths)
        slow = model(idx, reference, rows=slots, valid=lengths, last_only=True)[:, -1]
    assert fast is not None and torch.allclose(fast, slow, atol=1e-5)
    assert [cache.lengths[s] for s in slots] == lengths == [reference.lengths[s] for s in slots]
    for s, n in zip(slots, lengths, strict=True):
        assert torch.allclose(cache.kv[:, s, :, :, :n], reference.kv[:, s, :, :, :n], atol=1e-6)
    with torch.no_grad():  # then a decode step reads what the prefill wrote exactly as the forward's
        tokens = torch.tensor([1, 2, 3])
        assert torch.allclose(model.decode_rows(tokens, cache, slots),
                              model(tokens[:, None], reference, rows=slots, last_only=True)[:, -1], atol=1e-5)


def test_prefill_rows_leaves_a_slot_that_holds_tokens_to_the_forward(lm):
    model = lm.model
    cache = model.new_cache(4, torch.device("cpu"))
    with torch.no_grad():
        model(torch.tensor([[5, 6]]), cache, rows=[2])
        assert model.prefill_rows(torch.tensor([[7, 8]]), cache, [2], [2]) is None
        model.train()
        try:
            assert model.prefill_rows(torch.tensor([[7, 8]]), cache, [0], [2]) is None
        finally:
            model.eval()
    assert cache.lengths == [0, 0, 2, 0]


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
