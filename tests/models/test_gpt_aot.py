"""``--compile-decode``: the `gpt` decoding step compiled ahead of time (AOTInductor) against the module forward,
its on-disk cache (loaded, not rebuilt; rebuilt when the weights change), where it steps aside, and its
refusals. Each compilation takes ~15 s, so the module compiles two models once and shares them."""

from __future__ import annotations

import copy

import pytest
import torch

from glmlab.errors import ConfigError, GlmlabError
from glmlab.models import gpt_aot
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.lstm import LSTMLM, LSTMConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

VOCAB, BLOCK = 50, 16
CPU = torch.device("cpu")


def model_with(activation: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                          activation=activation)).eval()
    with torch.no_grad():  # weights away from their initial values: LayerNorms other than 1 and 0, real biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("glmlab-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLMLAB_CACHE_DIR", str(root))
        yield root


@torch.no_grad()
def greedy(model: GPT, prompts: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Greedy tokens and each step's logits (steps, B, vocab) through the cache, and the cache."""
    cache = model.new_cache(prompts.size(0), CPU)
    logits = model(prompts, cache, last_only=True)[:, -1]
    tokens, every = [], [logits]
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = model(tokens[-1][:, None], cache)[:, -1]
        every.append(logits)
    return torch.stack(tokens, 1), torch.stack(every), cache


@pytest.mark.parametrize(("activation", "batch"), [("gelu_tanh", 3), ("gelu", 1)])
def test_the_compiled_step_is_the_forward_pass(activation, batch, cache_root):
    """Every position a generation meets, from the first decoded token to the full context (the last one steps
    aside to the scripted step): the same tokens, logits to rounding, the same keys and values in the cache;
    the logits are the module forward's over the whole row."""
    model = model_with(activation)
    prompts = torch.randint(0, VOCAB, (batch, 2), generator=torch.Generator().manual_seed(1))
    steps = BLOCK - prompts.size(1)
    tokens, logits, cache = greedy(model, prompts, steps)
    model.set_decode_compiled(True)
    fast_tokens, fast_logits, fast_cache = greedy(model, prompts, steps)
    assert fast_cache.compiled is not None and fast_cache.compiled.batch == batch
    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logits, logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_cache.kv, cache.kv, atol=1e-6, rtol=1e-5)
    rows = torch.cat([prompts, fast_tokens], 1)
    with torch.no_grad():
        whole = model(rows[:, :-1])  # the forward without a cache: row t predicts t + 1
    torch.testing.assert_close(fast_logits[:-1], whole[:, prompts.size(1) - 1:].transpose(0, 1), atol=2e-5,
                               rtol=1e-4)
    assert len(list((cache_root / "decode-steps").glob("gpt-*.pt2"))) >= 1


def test_a_compiled_step_is_loaded_from_the_cache_and_rebuilt_for_new_weights(cache_root, monkeypatch):
    model = model_with("gelu_tanh")  # the weights compiled at batch 3 above
    model.set_decode_compiled(True)
    prompts = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    built = []
    real_compile = gpt_aot._compile
    monkeypatch.setattr(gpt_aot, "_compile", lambda *args: built.append(args[3]) or real_compile(*args))
    fresh = copy.deepcopy(model)  # another process would start like this: nothing in memory
    tokens, _, cache = greedy(fresh, prompts, 3)
    assert built == [] and cache.compiled is not None  # loaded from disk
    with torch.no_grad():
        fresh.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    moved, moved_logits, moved_cache = greedy(fresh, prompts, 3)
    assert built == [3] and moved_cache.compiled is not cache.compiled  # a new library for the new weights
    fresh.set_decode_compiled(False)
    _, scripted_logits, _ = greedy(fresh, prompts, 3)
    torch.testing.assert_close(moved_logits, scripted_logits, atol=2e-5, rtol=1e-4)


def test_rows_at_different_positions_step_aside(cache_root):
    """A batch whose rows sit at different positions (a server's, or prompts of different lengths) runs the
    scripted step: the compiled one covers all rows at one position."""
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    cache = model.new_cache(3, CPU)
    with torch.no_grad():
        for slot, n in enumerate([2, 5, 3]):
            model(torch.arange(n)[None], cache, rows=[slot])
        logits = model.decode_rows(torch.tensor([1, 2, 3]), cache, [0, 1, 2])
    assert cache.compiled is None and logits.shape == (3, VOCAB)


def test_refusals(tmp_path, monkeypatch):
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    with pytest.raises(ConfigError, match="--compile-decode and --decode-weights int8"):
        model.set_decode_weights("int8")
    assert not LSTMLM.declare(LSTMConfig(vocab_size=VOCAB)).compiled_decode  # the run refuses --compile-decode for it
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("GLMLAB_CACHE_DIR", str(blocked))
    with pytest.raises(GlmlabError, match="GLMLAB_CACHE_DIR to a writable directory"):
        greedy(model, torch.tensor([[1, 2]]), 1)
    monkeypatch.setenv("GLMLAB_CACHE_DIR", str(tmp_path / "cache"))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

    from torch import _inductor
    monkeypatch.setattr(_inductor, "aoti_compile_and_package", no_compiler)
    with pytest.raises(GlmlabError, match="needs a C\\+\\+ compiler") as caught:
        greedy(model, torch.tensor([[1, 2]]), 1)
    assert "No working C++ compiler" in str(caught.value)
    assert list((tmp_path / "cache" / "decode-steps").iterdir()) == []  # no partial library left behind


def test_generate_compile_decode_from_the_cli(capsys, trained_run, cache_root):
    """``glmlab generate --compile-decode`` writes what the scripted step writes, and builds its library once."""
    from glmlab.cli import main

    args = ["generate", str(trained_run), "--prompt", "First", "--max-new-tokens", "20", "--temperature", "0",
            "--num-samples", "2"]
    assert main(args) == 0
    scripted = capsys.readouterr().out
    before = set((cache_root / "decode-steps").glob("gpt-*.pt2"))
    assert main([*args, "--compile-decode"]) == 0
    out, err = capsys.readouterr()
    assert out == scripted and "Traceback" not in err
    assert len(set((cache_root / "decode-steps").glob("gpt-*.pt2")) - before) == 1


def test_a_family_without_the_step_refuses_compile_decode():
    import types

    from glmlab.runs import LoadedRun

    lstm = LSTMLM(LSTMConfig(vocab_size=VOCAB))
    run = types.SimpleNamespace(model=lstm, config=types.SimpleNamespace(model=types.SimpleNamespace(family="lstm")))
    with pytest.raises(GlmlabError, match="--compile-decode is not available for this run's family, lstm"):
        LoadedRun.use_compiled_decode(run)
