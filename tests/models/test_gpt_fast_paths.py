"""The `gpt` family's fast paths against its one forward pass (``GPT.forward`` without a cache): the compiled
decoding steps (rows at one position in consecutive slots, rows at several positions in scattered slots, the
server's prefill of right-padded prompts) and the int8 step, at every kind of input each accepts, with and
without biases, with either GELU; eager and compiled forms give the same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmlab.errors import ConfigError
from glmlab.models import gpt_decode
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.gpt_decode import (
    gelu_rows,
    scripted_decode_layers,
    scripted_decode_rows,
    scripted_prefill_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, BLOCK = 50, 16
CPU = torch.device("cpu")


# the model variants every fast path is checked on: (biases, MLP activation)
VARIANTS = {"bias": (True, "gelu_tanh"), "no-bias": (False, "gelu_tanh"), "exact-gelu": (True, "gelu")}


def model_with(variant: str) -> GPT:
    bias, activation = VARIANTS[variant]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                          bias=bias, activation=activation)).eval()
    with torch.no_grad():  # weights away from their initial values: LayerNorms other than 1 and 0, real biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def sequences(rows: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths[:rows]]


@torch.no_grad()
def reference(model: GPT, rows: list[list[int]]) -> torch.Tensor:
    """The next-token logits of each row by the module forward over the whole row: the one definition."""
    return torch.stack([model(torch.tensor([r]))[0, -1] for r in rows])


@torch.no_grad()
def filled(model: GPT, capacity: int, slots: list[int], rows: list[list[int]]):
    """A cache whose ``slots`` hold ``rows`` (all but each row's last token), read by the module forward."""
    cache = model.new_cache(capacity, CPU)
    for slot, row in zip(slots, rows, strict=True):
        if len(row) > 1:
            model(torch.tensor([row[:-1]]), cache, rows=[slot])
    return cache


def test_every_fast_step_compiles():
    """The fast steps fall back to running eagerly when TorchScript refuses them (same numbers, slower):
    the ones shipped here must all compile."""
    for step in (scripted_decode_layers, scripted_decode_rows, scripted_prefill_rows):
        assert isinstance(step(), torch.jit.ScriptFunction), step.__name__


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # PyTorch marks TorchScript deprecated
@pytest.mark.parametrize("rows", [1, 7, 8, 64])
def test_gelu_rows_is_the_tanh_gelu(rows):
    """From 8 rows on it is written as h * sigmoid(2u); below, it is PyTorch's own kernel."""
    torch.manual_seed(rows)
    h = torch.randn(rows, 96) * 4
    expected = F.gelu(h, approximate="tanh")
    assert torch.allclose(gelu_rows(h.clone()), expected, atol=2e-6, rtol=1e-6)
    scripted = torch.jit.script(gelu_rows)  # as the compiled steps that call it are
    assert torch.allclose(scripted(h.clone()), expected, atol=2e-6, rtol=1e-6)
    assert not torch.allclose(gelu_rows(h.clone()), F.gelu(h), atol=1e-4)  # not the erf GELU


# (capacity, slots, row lengths): one position in consecutive slots (the plain step on a view of them, the whole
# cache or part of it, from the first token to the last position), several positions, scattered slots
DECODES = [
    (3, [0, 1, 2], [9, 9, 9]),
    (1, [0], [1]),
    (4, [1, 2], [BLOCK, BLOCK]),
    (9, list(range(9)), [5] * 9),
    (3, [0, 1, 2], [2, 9, 5]),
    (8, [4, 1, 6], [3, 3, 3]),
    (10, [7, 0, 3, 9, 2, 5, 1, 8, 4], [2, 16, 5, 7, 1, 9, 12, 3, 8]),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("capacity", "slots", "lengths"), DECODES)
def test_decode_rows_is_the_forward_pass(variant, capacity, slots, lengths):
    model = model_with(variant)
    rows = sequences(len(slots), lengths)
    cache = filled(model, capacity, slots, rows)
    general = filled(model, capacity, slots, rows)
    tokens = torch.tensor([r[-1] for r in rows])
    with torch.no_grad():
        fast = model.decode_rows(tokens, cache, slots)
        slow = model(tokens[:, None], general, rows=slots, last_only=True)[:, -1]  # the module forward, cached
    torch.testing.assert_close(fast, reference(model, rows), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)
    assert [cache.lengths[s] for s in slots] == lengths == [general.lengths[s] for s in slots]
    for s, n in zip(slots, lengths, strict=True):  # the new key and value went where the forward puts them
        torch.testing.assert_close(cache.kv[:, s, :, :, :n], general.kv[:, s, :, :, :n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("slots", "lengths"), [([6, 1, 3], [5, 2, 4]), ([0, 1, 2], [5, 5, 5]), ([1], [BLOCK]),
                                                ([0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 5, 1, 3, 9, 2, 2, 7, 4])])
def test_prefill_rows_is_the_forward_pass(variant, slots, lengths, monkeypatch):
    """Right-padded prompts of different (or equal: nothing to pack) lengths into scattered empty slots: each
    prompt's next-token logits, its keys and values and its fill level; then a decode step reads them."""
    model = model_with(variant)
    rows = sequences(len(slots), lengths, seed=2)
    width = max(lengths)
    idx = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr("glmlab.models.gpt.scripted_prefill_rows", lambda: gpt_decode.prefill_rows)
        cache, general = model.new_cache(10, CPU), model.new_cache(10, CPU)
        with torch.no_grad():
            fast = model.prefill_rows(idx, cache, slots, lengths)
            slow = model(idx, general, rows=slots, valid=lengths, last_only=True)[:, -1]
        torch.testing.assert_close(fast, reference(model, rows), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-4)
        assert [cache.lengths[s] for s in slots] == lengths
        for s, n in zip(slots, lengths, strict=True):
            torch.testing.assert_close(cache.kv[:, s, :, :, :n], general.kv[:, s, :, :, :n], atol=1e-6, rtol=1e-5)
    live = [s for s, n in zip(slots, lengths, strict=True) if n < BLOCK]
    if live:
        tokens = torch.full((len(live),), 7)
        with torch.no_grad():
            torch.testing.assert_close(model.decode_rows(tokens, cache, live),
                                       model(tokens[:, None], general, rows=live, last_only=True)[:, -1],
                                       atol=2e-5, rtol=1e-4)


def test_the_eager_steps_equal_the_compiled_ones():
    """Bit for bit, with TorchScript's graph optimisation off as glmlab runs them (it fuses operations)."""
    model = model_with("bias")
    rows = sequences(3, [4, 9, 6])
    for slots in ([0, 1, 2], [2, 0, 1]):
        results = []
        for step in (scripted_decode_rows(), gpt_decode.decode_rows):
            cache = filled(model, 3, slots, rows)
            with torch.no_grad(), torch.jit.optimized_execution(False):
                results.append(step(torch.tensor([r[-1] for r in rows]), torch.tensor(slots),
                                    torch.tensor([len(r) - 1 for r in rows]), 9, cache.layers, cache.weights, 2,
                                    1e-5))
        assert torch.equal(*results)
    same = sequences(3, [6, 6, 6])
    results = []
    for step in (scripted_decode_layers(), gpt_decode.decode_layers):
        cache = filled(model, 3, [0, 1, 2], same)
        with torch.no_grad(), torch.jit.optimized_execution(False):
            results.append(step(torch.tensor([r[-1] for r in same]), 5, cache.layers, cache.weights, 2, 1e-5))
    assert torch.equal(*results)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("capacity", "slots", "lengths"), DECODES)
def test_int8_decoding_stays_close_to_the_forward_pass(variant, capacity, slots, lengths):
    model = model_with(variant)
    rows = sequences(len(slots), lengths)
    exact = reference(model, rows)
    model.set_decode_weights("int8")
    cache = filled(model, capacity, slots, rows)  # the prompt is read at full precision
    with torch.no_grad():
        quantized = model.decode_rows(torch.tensor([r[-1] for r in rows]), cache, slots)
    assert 0 < float((quantized - exact).abs().max()) < 0.06 * float(exact.abs().max())  # 7-bit activations
    assert [cache.lengths[s] for s in slots] == lengths


def test_int8_weights_follow_weight_changes_and_only_known_formats():
    model = model_with("bias")
    rows = sequences(2, [10, 10])
    model.set_decode_weights("int8")

    def last_step() -> torch.Tensor:
        cache = filled(model, 2, [0, 1], rows)
        with torch.no_grad():
            return model.decode_rows(torch.tensor([r[-1] for r in rows]), cache, [0, 1])

    quantized = last_step()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # tied to wte: the quantized copy must be rebuilt
    assert not torch.allclose(last_step(), quantized, atol=1e-3)
    with pytest.raises(ConfigError, match="int4"):
        model.set_decode_weights("int4")


def test_the_fast_paths_step_aside_where_they_do_not_apply():
    model = model_with("bias")
    cache = model.new_cache(4, CPU)
    with torch.no_grad():
        model(torch.tensor([[5, 6]]), cache, rows=[2])
        assert model.prefill_rows(torch.tensor([[7, 8]]), cache, [2], [2]) is None  # a slot that holds tokens
        full = model.new_cache(1, CPU)
        model(torch.tensor([list(range(BLOCK))]), full)
        assert model.decode_rows(torch.tensor([1]), full, [0]) is None  # a full slot
        model.train()
        try:
            assert model.prefill_rows(torch.tensor([[7, 8]]), cache, [0], [2]) is None
            assert model.decode_rows(torch.tensor([1]), cache, [2]) is None
        finally:
            model.eval()
        model.set_decode_weights("int8")
        assert model.prefill_rows(torch.tensor([[7, 8]]), model.new_cache(1, CPU), [0], [2]) is None
    assert cache.lengths == [0, 0, 2, 0]
