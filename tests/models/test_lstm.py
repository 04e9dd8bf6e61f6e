"""Family `lstm`: the recurrent state as a generation cache, loss masking, weight tying, and the engine."""

import torch
import torch.nn.functional as F

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import train_char
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models.lstm import LSTMLM, LSTMConfig

CFG = LSTMConfig(vocab_size=40, block_size=32, n_embd=16, n_hidden=24, n_layer=2, dropout=0.0)


def tiny(**changes) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(**{**CFG.__dict__, **changes})).eval()


def test_decoding_with_the_state_equals_a_full_pass():
    model = tiny()
    idx = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, torch.device("cpu"))
        parts = [model(idx[:, :4], cache), model(idx[:, 4:7], cache)]
        parts += [model(idx[:, i:i + 1], cache) for i in range(7, 12)]
    assert cache.lengths == [12, 12]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_ragged_prompts_give_each_row_its_own_logits():
    model = tiny()
    a, b = torch.randint(0, 40, (1, 9)), torch.randint(0, 40, (1, 4))
    with torch.no_grad():
        cache = model.new_cache(2, torch.device("cpu"))
        padded = torch.full((2, 9), 3)
        padded[0], padded[1, :4] = a[0], b[0]
        last = model(padded, cache, valid=[9, 4], last_only=True)
        assert last.shape == (2, 1, 40) and cache.lengths == [9, 4]
        assert torch.allclose(last[0, 0], model(a)[0, -1], atol=1e-5)
        assert torch.allclose(last[1, 0], model(b)[0, -1], atol=1e-5)
        nxt = torch.tensor([[7], [11]])
        step = model(nxt, cache)  # row 1 continues after its 4 real tokens, not after the padding
        assert torch.allclose(step[0, 0], model(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-5)
        assert torch.allclose(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5)


def test_select_reorders_and_repeats_rows_and_reset_row_restarts_one():
    model = tiny()
    idx = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        cache = model.new_cache(3, torch.device("cpu"))
        model(idx, cache, valid=[5, 3, 4])
        h, c = cache.h.clone(), cache.c.clone()
        cache.select([2, 0, 0])
        assert cache.lengths == [4, 5, 5]
        assert torch.equal(cache.h, h[:, [2, 0, 0]]) and torch.equal(cache.c, c[:, [2, 0, 0]])
        cache.reset_row(1)
        assert cache.lengths == [4, 0, 5]
        assert not cache.h[:, 1].any() and not cache.c[:, 1].any()  # an lstm starts from zeros
        assert torch.equal(cache.h[:, 2], h[:, 0])  # the other copy is untouched
        # a reset row then reads like a fresh sequence
        out = model(idx[:1, :2], cache, rows=[1])
        assert torch.allclose(out, model(idx[:1, :2]), atol=1e-5)


def test_loss_ignores_targets_marked_ignore_index():
    model = tiny()
    x = torch.randint(0, 40, (2, 6))
    y = torch.randint(0, 40, (2, 6))
    y[0, 4:] = IGNORE_INDEX
    y[1, 1] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(x)
        keep = y != IGNORE_INDEX
        expected = F.cross_entropy(logits[keep], y[keep])
        assert torch.allclose(model.loss(x, y), expected, atol=1e-6)
        assert torch.allclose(model.nll(x, y), F.cross_entropy(logits[keep], y[keep], reduction="sum"), atol=1e-4)


def test_tied_weights_share_storage():
    model = tiny()  # n_hidden 24 != n_embd 16: a projection feeds the tied softmax
    net = model.net
    assert net.head.weight.data_ptr() == net.embedding.weight.data_ptr() and net.proj is not None
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    names = [name for name, _ in model.named_parameters()]
    assert "net.head.weight" not in names  # counted once
    untied = tiny(tie_weights=False)
    assert untied.net.head.weight.data_ptr() != untied.net.embedding.weight.data_ptr() and untied.net.proj is None
    same = tiny(n_hidden=16)
    assert same.net.proj is None and same.net.head.weight is same.net.embedding.weight


def test_engine_greedy_equals_an_argmax_loop_and_rows_do_not_mix():
    tok = train_char(["abcdefghij klmnopqrstuvwxyz.\n"])
    model = tiny(vocab_size=tok.vocab_size)
    settings = GenerationSettings(max_new_tokens=10, temperature=0.0, stop_at_eos=False)
    prompts = ["abc", "hello world"]
    [[one], [two]] = generate_batch(model, tok, prompts, settings)
    for prompt, completion in zip(prompts, (one, two), strict=True):
        ids = tok.encode(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert completion.token_ids == ids[len(tok.encode(prompt)):]
    assert not model.training
    sampled = generate_batch(model, tok, prompts, GenerationSettings(max_new_tokens=10, seed=5, stop_at_eos=False))
    again = generate_batch(model, tok, prompts, GenerationSettings(max_new_tokens=10, seed=5, stop_at_eos=False))
    assert [c[0].token_ids for c in sampled] == [c[0].token_ids for c in again]


def test_generation_goes_on_past_the_context():
    tok = train_char(["abcdefghij klmnopqrstuvwxyz.\n"])
    model = tiny(vocab_size=tok.vocab_size, block_size=8)
    [[c]] = generate_batch(model, tok, ["ab"], GenerationSettings(max_new_tokens=30, seed=1, stop_at_eos=False))
    assert len(c.token_ids) == 30 and c.finish_reason == "length"
