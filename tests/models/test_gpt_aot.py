"""``--compile-decode``: the `gpt` decoding step compiled ahead of time (AOTInductor) against the module forward,
its on-disk cache (loaded, not rebuilt; rebuilt when the weights change), which steps it runs (checked with a
stand-in library that runs the scripted step and counts its calls, so no compiler is needed for those), and its
refusals. Each real compilation takes ~15 s: the module shares one cache directory between its tests."""

from __future__ import annotations

import copy
import os
import stat
import time
import types

import pytest
import torch

from glmlab.errors import ConfigError, GlmlabError
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models import gpt_aot
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.lstm import LSTMLM, LSTMConfig

pytestmark = pytest.mark.usefixtures("one_thread")

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


def count_calls(monkeypatch) -> list[int]:
    """Wrap every compiled step so that each call appends its rows' largest position to the returned list."""
    calls: list[int] = []
    real = gpt_aot.CompiledDecodeStep.__call__

    def counted(self, tokens, starts, kv_layers):
        calls.append(max(starts))
        return real(self, tokens, starts, kv_layers)

    monkeypatch.setattr(gpt_aot.CompiledDecodeStep, "__call__", counted)
    return calls


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


@pytest.mark.slow
@pytest.mark.parametrize(("activation", "batch"), [("gelu_tanh", 3), ("gelu", 1)])
def test_the_compiled_step_is_the_forward_pass(activation, batch, cache_root, monkeypatch):
    """Every position a generation meets, from the first decoded token to the full context (the last one steps
    aside to the scripted step): the same tokens, logits to rounding, the same keys and values in the cache;
    the logits are the module forward's over the whole row."""
    model = model_with(activation)
    prompts = torch.randint(0, VOCAB, (batch, 2), generator=torch.Generator().manual_seed(1))
    steps = BLOCK - prompts.size(1)
    tokens, logits, cache = greedy(model, prompts, steps)
    model.set_decode_compiled(True)
    calls = count_calls(monkeypatch)
    fast_tokens, fast_logits, fast_cache = greedy(model, prompts, steps)
    assert calls == list(range(2, BLOCK - 1))  # every position but the last of the context (scripted)
    assert fast_cache.compiled is not None and [s.batch for s in fast_cache.compiled.values()] == [batch]
    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logits, logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_cache.kv, cache.kv, atol=1e-6, rtol=1e-5)
    rows = torch.cat([prompts, fast_tokens], 1)
    with torch.no_grad():
        whole = model(rows[:, :-1])  # the forward without a cache: row t predicts t + 1
    torch.testing.assert_close(fast_logits[:-1], whole[:, prompts.size(1) - 1:].transpose(0, 1), atol=2e-5,
                               rtol=1e-4)
    libraries = list((cache_root / "decode-steps").glob("gpt-*.pt2"))
    umask = os.umask(0)
    os.umask(umask)
    assert libraries and all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in libraries)  # not private


@pytest.mark.slow
def test_a_compiled_step_is_loaded_from_the_cache_and_rebuilt_for_new_weights(cache_root, monkeypatch):
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    prompts = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    greedy(model, prompts, 1)  # built here unless an earlier test built it
    built = []
    real_compile = gpt_aot._compile
    monkeypatch.setattr(gpt_aot, "_compile", lambda *args: built.append(args[3]) or real_compile(*args))
    calls = count_calls(monkeypatch)
    fresh = copy.deepcopy(model)  # a copy leaves the loaded library behind, as another process starts
    assert model._compiled_steps and not fresh._compiled_steps and fresh.decode_compiled
    _, _, cache = greedy(fresh, prompts, 3)
    assert built == [] and calls == [4, 5, 6]  # loaded from disk, and run
    with torch.no_grad():
        fresh.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    _, moved_logits, moved_cache = greedy(fresh, prompts, 3)
    assert built == [3] and moved_cache.compiled[3] is not cache.compiled[3]  # a new library for the new weights
    fresh.set_decode_compiled(False)
    _, scripted_logits, _ = greedy(fresh, prompts, 3)
    torch.testing.assert_close(moved_logits, scripted_logits, atol=2e-5, rtol=1e-4)


def test_beams_and_ended_rows_reach_the_compiled_step_only_where_it_fits(stand_in):
    """Beam search reorders the cache (KVCache.select): the step follows the new rows; a one-token prompt's first
    step (position 0) is not compiled for; a batch whose last row ended runs the smallest step in memory that spans
    the others (here beam search's, of batch 2)."""
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    tokenizer = types.SimpleNamespace(eos_id=7, kind="bpe", encode=lambda text: [], decode=lambda ids, **kw: "")
    beams = GenerationSettings(max_new_tokens=6, num_beams=2, early_stopping="never", stop_at_eos=False)
    expected = generate_batch(model_with("gelu_tanh"), tokenizer, [[3]], beams)
    out = generate_batch(model, tokenizer, [[3]], beams)
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in expected[0]]
    assert stand_in.builds and all(b == 2 for b in stand_in.builds)
    assert stand_in.calls and all(pos >= 1 for _, pos in stand_in.calls)
    stand_in.builds.clear(), stand_in.calls.clear()
    cache = model.new_cache(3, CPU)
    with torch.no_grad():
        model(torch.tensor([[1, 2], [3, 4], [5, 6]]), cache)
        model.decode_rows(torch.tensor([1, 2, 3]), cache, [0, 1, 2])  # every row at position 2: the library
        model.decode_rows(torch.tensor([1, 2]), cache, [0, 1])  # row 2 has ended: slots 0-1, batch 2's step
    assert stand_in.calls == [(3, 2), (2, 3)] and stand_in.builds == [3]
    one = model.new_cache(1, CPU)
    with torch.no_grad():
        model.decode_rows(torch.tensor([1]), one, [0])  # position 0: nothing compiled for it
    assert stand_in.builds == [3]


def scripted_twin(model: GPT) -> GPT:
    twin = copy.deepcopy(model)
    twin.set_decode_compiled(False)
    return twin


def test_rows_that_skip_slots_ride_along_in_the_smallest_step_that_spans_them(stand_in):
    """Rows 0 and 2 of a 4-slot cache (slot 1 holding a row that does not decode, slot 3 empty) run the whole
    cache's step, batch 4, the only one ready; logits and the decoding rows' keys and values are the scripted
    step's, and the slot that rides along keeps its length and every position it holds. Once a 4-slot batch's sizes
    are prepared, row 0 runs batch 1's step, rows 0-1 batch 2's, rows 0 and 2 batch 4's (the smallest spanning
    slot 2)."""
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    twin = scripted_twin(model)

    def filled(m: GPT):
        cache = m.new_cache(4, CPU)
        with torch.no_grad():
            for slot, n in [(0, 3), (1, 5), (2, 2)]:  # slot 3 stays empty
                m(torch.arange(1, n + 1)[None], cache, rows=[slot])
        return cache

    fast, slow = filled(model), filled(twin)
    held = fast.kv[:, 1, :, :, :5].clone()
    with torch.no_grad():
        for tokens, rows in [([4, 6], [0, 2]), ([5, 7], [0, 2]), ([9], [2])]:
            got = model.decode_rows(torch.tensor(tokens), fast, rows)
            want = twin.decode_rows(torch.tensor(tokens), slow, rows)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert stand_in.builds == [4] and [batch for batch, _ in stand_in.calls] == [4, 4, 4]
    assert fast.lengths == slow.lengths == [5, 5, 5, 0]
    torch.testing.assert_close(fast.kv[:, 1, :, :, :5], held)  # the slot that rode along: untouched
    for slot in (0, 2):
        torch.testing.assert_close(fast.kv[:, slot, :, :, :5], slow.kv[:, slot, :, :, :5], atol=1e-6, rtol=1e-6)
    stand_in.calls.clear()
    assert model.prepare_compiled_decode(4) == [1, 2, 4] and stand_in.builds == [4, 1, 2]
    cache = filled(model)
    with torch.no_grad():
        model.decode_rows(torch.tensor([1]), cache, [0])
        model.decode_rows(torch.tensor([1, 2]), cache, [0, 1])
        model.decode_rows(torch.tensor([1, 2]), cache, [0, 2])
    assert [batch for batch, _ in stand_in.calls] == [1, 2, 4]


def test_a_cache_never_runs_a_step_wider_than_itself(stand_in):
    """Steps of a larger batch in memory (a bigger generation before, or a server's prepared sizes) are not for a
    smaller cache: a 3-slot batch after a 4-slot one runs its own size, with the same tokens as the scripted step."""
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    tokenizer = types.SimpleNamespace(eos_id=7, kind="bpe", encode=lambda text: [], decode=lambda ids, **kw: "")
    greedy_settings = GenerationSettings(max_new_tokens=5, temperature=0, stop_at_eos=False)
    generate_batch(model, tokenizer, [[1, 2]] * 4, greedy_settings)
    out = generate_batch(model, tokenizer, [[1, 2], [3], [4, 5, 6]], greedy_settings)
    expected = generate_batch(scripted_twin(model), tokenizer, [[1, 2], [3], [4, 5, 6]], greedy_settings)
    assert [c[0].token_ids for c in out] == [c[0].token_ids for c in expected]
    assert stand_in.builds == [4, 3] and {batch for batch, _ in stand_in.calls} == {4, 3}


def test_prepared_sizes_and_their_refusals(stand_in):
    model = model_with("gelu_tanh")
    with pytest.raises(ConfigError, match="set_decode_compiled"):
        model.prepare_compiled_decode(8)
    model.set_decode_compiled(True)
    with pytest.raises(ConfigError, match="slots"):
        model.prepare_compiled_decode(0)
    assert gpt_aot.compiled_batch_sizes(1) == [1]
    assert gpt_aot.compiled_batch_sizes(12) == [1, 2, 4, 8, 12]
    assert model.prepare_compiled_decode(8) == [1, 2, 4, 8] and stand_in.builds == [1, 2, 4, 8]
    model.prepare_compiled_decode(8)
    assert stand_in.builds == [1, 2, 4, 8]  # kept in memory: nothing built twice


def test_a_continuous_batch_decodes_the_scripted_tokens_through_prepared_steps(stand_in):
    """Rows that join and leave a server-sized batch at their own times: the same tokens as the scripted steps,
    and every step after the first prefill runs a compiled step."""
    from glmlab.generation.continuous import ContinuousBatch

    tokenizer = types.SimpleNamespace(eos_id=7, kind="bpe", encode=lambda text: [], decode=lambda ids, **kw: "")

    def serve(model: GPT) -> dict:
        batch = ContinuousBatch(model, tokenizer, 8, deltas=False)
        done, queue = {}, [(i, [1 + i, 2, 3][: 1 + i % 3], 2 + 2 * i) for i in range(6)]  # (within the context)
        for step in range(40):
            if step % 2 == 0 and step // 2 < len(queue):  # a row joins every other step
                key, prompt, n = queue[step // 2]
                batch.add(key, prompt, GenerationSettings(max_new_tokens=n, temperature=0, stop_at_eos=False))
            for event in batch.step():
                if event.completion is not None:
                    done[event.key] = event.completion.token_ids
        return done

    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    model.prepare_compiled_decode(8)
    expected = serve(scripted_twin(model))
    scripted = []
    real = model._decode_scripted
    model._decode_scripted = lambda *a: scripted.append(a[2]) or real(*a)
    assert serve(model) == expected and all(len(v) == 2 + 2 * k for k, v in expected.items())
    assert stand_in.builds == [1, 2, 4, 8] and len(stand_in.calls) > 10 and scripted == []
    sizes = [batch for batch, _ in stand_in.calls]
    # the batch grows and shrinks; rows move down into freed slots, so at most 4 rows live: never the 8 slots' step
    assert sizes[0] == 1 and set(sizes) == {1, 2, 4} and sizes[-1] < 4


@pytest.mark.slow
def test_rows_at_different_positions_run_the_library(cache_root, monkeypatch):
    """Prompts of different lengths (a batch whose rows sit at different positions) decode through the same
    library: each row attends to its own positions; logits and cache as the scripted step's."""
    model = model_with("gelu_tanh")  # (the weights, batch and cache length compiled above: loaded, not rebuilt)

    def run(compiled: bool) -> tuple[torch.Tensor, object]:
        model.set_decode_compiled(compiled)
        cache = model.new_cache(3, CPU)
        with torch.no_grad():
            for slot, n in enumerate([2, 5, 3]):
                model(torch.arange(1, n + 1)[None], cache, rows=[slot])
            tokens, every = torch.tensor([7, 8, 9]), []
            for _ in range(6):
                every.append(model.decode_rows(tokens, cache, [0, 1, 2]))
                tokens = every[-1].argmax(-1)
        return torch.stack(every), cache

    scripted, scripted_cache = run(False)
    calls = count_calls(monkeypatch)
    fast, fast_cache = run(True)
    assert calls == [5, 6, 7, 8, 9, 10]
    torch.testing.assert_close(fast, scripted, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_cache.kv, scripted_cache.kv, atol=1e-6, rtol=1e-5)
    assert fast_cache.lengths == [8, 11, 9]


def test_refusals(tmp_path, monkeypatch):
    model = model_with("gelu_tanh")
    model.set_decode_compiled(True)
    with pytest.raises(ConfigError, match="--compile-decode and --decode-weights int8"):
        model.set_decode_weights("int8")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("GLMLAB_CACHE_DIR", str(blocked))
    with pytest.raises(GlmlabError, match="GLMLAB_CACHE_DIR to a writable directory"):
        greedy(model, torch.tensor([[1, 2]]), 1)
    monkeypatch.setenv("GLMLAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "decode-steps"
    folder.mkdir(parents=True)
    killed, running = folder / ".partial-killed.pt2", folder / ".partial-running.pt2"  # left by other processes
    killed.write_text(""), running.write_text("")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))

    from torch import _inductor
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler(*args, **kwargs):
        raise InvalidCxxCompiler()

    monkeypatch.setattr(_inductor, "aoti_compile_and_package", no_compiler)
    with pytest.raises(GlmlabError, match="needs a working C\\+\\+ compiler") as caught:
        greedy(model, torch.tensor([[1, 2]]), 1)
    assert "No working C++ compiler" in str(caught.value)

    def lowering_bug(*args, **kwargs):
        raise AssertionError("a bug inside inductor")

    monkeypatch.setattr(_inductor, "aoti_compile_and_package", lowering_bug)
    with pytest.raises(GlmlabError, match="a bug inside inductor") as caught:
        greedy(model, torch.tensor([[1, 2]]), 1)
    assert "drop --compile-decode (the scripted step gives the same tokens)" in str(caught.value)
    assert "compiler" not in str(caught.value)
    assert list(folder.iterdir()) == [running]  # no partial library of ours left, a killed one's removed


@pytest.mark.slow
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
