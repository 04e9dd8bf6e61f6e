"""Attention in fp32 under bf16 autocast, where the trainer measures it faster (a CPU's bf16 flash-attention
kernel can be several times slower than its fp32 one at short sequences)."""

import math

import pytest
import torch
import torch.nn.functional as F

import glmlab.models.transformer as transformer
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.lstm import LSTMLM, LSTMConfig
from glmlab.models.transformer import (
    SLOW_BF16_ATTENTION,
    BlockShape,
    SelfAttention,
    attend_in_fp32,
    bf16_attention_slowdown,
    measured_attention_slowdown,
)
from glmlab.training.tasks import LanguageModelingTask
from glmlab.training.trainer import Trainer
from tests.conftest import tiny_config


def _attend_recording_dtypes(monkeypatch) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):  # what attention computed in: autocast casts below this call, so the output
        out = real(q, k, v, **kwargs)
        seen.extend({q.dtype, k.dtype, v.dtype, out.dtype})
        return out

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", recording)
    return seen


@pytest.mark.parametrize("masked", [False, True])
def test_a_layer_set_to_fp32_attends_in_fp32_under_bf16_autocast(monkeypatch, masked):
    torch.manual_seed(0)
    layer = SelfAttention(BlockShape(n_embd=32, n_head=4, causal=not masked), layer_index=0)
    x = torch.randn(3, 10, 32)
    mask = (torch.rand(3, 1, 10, 10) < 0.5) | torch.eye(10, dtype=torch.bool) if masked else None
    reference = layer(x, mask=mask)  # all fp32
    seen = _attend_recording_dtypes(monkeypatch)
    outputs = {}
    for in_fp32 in (False, True):
        layer.attend_in_fp32 = in_fp32
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[in_fp32] = layer(x, mask=mask)
        outputs[in_fp32].float().square().sum().backward()
        assert seen == [torch.float32 if in_fp32 else torch.bfloat16]
        assert layer.c_attn.weight.grad is not None and bool(layer.c_attn.weight.grad.isfinite().all())
        layer.zero_grad()
    for in_fp32, out in outputs.items():  # the projections in bf16 either way: bf16's rounding, no more
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2, msg=f"in fp32: {in_fp32}")


def test_the_slowdown_is_measured_at_each_layer_shape_and_dropout(monkeypatch):
    asked = []

    def measured(batch, heads, length, head_size, dropout):
        asked.append((batch, heads, length, head_size, dropout))
        return 2.5

    monkeypatch.setattr(transformer, "bf16_attention_slowdown", measured)
    model = GPT(GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=4, n_embd=32, dropout=0.1))
    assert measured_attention_slowdown(model, batch=6, length=24) == 2.5
    assert asked == [(6, 4, 24, 8, 0.1)]  # the run's batch and length; the layers' heads, head size and dropout
    attend_in_fp32(model, True)
    assert [block.attn.attend_in_fp32 for block in model.transformer.h] == [True] * 3
    attend_in_fp32(model, False)
    assert not any(block.attn.attend_in_fp32 for block in model.transformer.h)


def test_a_model_without_self_attention_measures_nothing(monkeypatch):
    monkeypatch.setattr(transformer, "bf16_attention_slowdown", lambda *shape: pytest.fail("measured"))
    assert measured_attention_slowdown(LSTMLM(LSTMConfig(vocab_size=20)), batch=4, length=16) is None


def test_the_measurement_is_a_ratio_taken_once_per_shape_and_leaves_the_random_stream_alone():
    """A run's dropout masks (and a resumed run's) must not depend on whether this process measured before."""
    transformer._bf16_attention_slowdown.cache_clear()
    torch.manual_seed(7)
    first = bf16_attention_slowdown(2, 2, 16, 8, dropout=0.1)
    after_measuring = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after_measuring)
    assert math.isfinite(first) and first > 0
    assert bf16_attention_slowdown(2, 2, 16, 8, dropout=0.1) == first
    assert transformer._bf16_attention_slowdown.cache_info().misses == 1
    with torch.inference_mode():  # a caller in inference mode still gets its measurement (it needs a backward)
        assert bf16_attention_slowdown(2, 2, 12, 8) > 0


@pytest.mark.parametrize("precision, slowdown, note", [
    ("bf16", 3.0, ", attention in fp32 (3.0x faster than bf16 here)"),
    ("bf16", 1.0, ""),  # measured no slower: bf16 attention stays
    ("fp32", 3.0, ""),  # no autocast, nothing to measure
])
def test_the_trainer_measures_attention_where_it_trains_in_bf16_on_a_cpu(char_data, tmp_path, monkeypatch,
                                                                         precision, slowdown, note):
    asked = []
    monkeypatch.setattr(transformer, "bf16_attention_slowdown", lambda *shape: asked.append(shape) or slowdown)
    config = tiny_config("train.max_steps=2", f"train.precision={precision}", "train.batch_size=5",
                         "train.attention_precision=auto")
    with Trainer(config, LanguageModelingTask(char_data), tmp_path / "run", show_progress=False) as trainer:
        assert trainer.attention_note == note
        assert asked == ([(5, 2, 32, 16, 0.0)] if precision == "bf16" else [])  # tiny_config: 2 x 16, block 32
        in_fp32 = precision == "bf16" and slowdown >= SLOW_BF16_ATTENTION
        assert [block.attn.attend_in_fp32 for block in trainer.model.transformer.h] == [in_fp32]
        assert trainer.state["attention"] == ({"bf16": "fp32" if in_fp32 else "bf16"}.get(precision))


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_attention_precision_by_name_is_not_timed(char_data, tmp_path, monkeypatch, asked):
    """train.attention_precision=fp32|bf16: two runs of one config attend alike, whatever a timing would say."""
    monkeypatch.setattr(transformer, "bf16_attention_slowdown", lambda *shape: pytest.fail("timed"))
    config = tiny_config("train.max_steps=2", "train.precision=bf16", f"train.attention_precision={asked}")
    with Trainer(config, LanguageModelingTask(char_data), tmp_path / "run", show_progress=False) as trainer:
        assert trainer.model.transformer.h[0].attn.attend_in_fp32 == (asked == "fp32")
        assert trainer.attention_note == (", attention in fp32 (train.attention_precision=fp32)"
                                          if asked == "fp32" else "")
        assert trainer.state["attention"] == asked


def test_a_resumed_run_attends_as_it_began(char_data, tmp_path, monkeypatch):
    """The choice is timed once per run, not per process: a resumed run whose machine now measures otherwise keeps
    its checkpoints' attention, as train.precision=auto keeps their precision."""
    import glmlab.training.trainer as trainer_module
    from glmlab.training.trainer import train

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda name, device: torch.bfloat16)
    monkeypatch.setattr(transformer, "bf16_attention_slowdown", lambda *shape: 3.0)
    common = ("train.eval_interval=2", "train.sample_tokens=0", "train.attention_precision=auto")
    train(tiny_config("train.max_steps=2", *common), char_data, tmp_path / "run", show_progress=False)
    monkeypatch.setattr(transformer, "bf16_attention_slowdown", lambda *shape: pytest.fail("measured again"))
    with Trainer(tiny_config("train.max_steps=4", *common), LanguageModelingTask(char_data), tmp_path / "run",
                 resume=True, show_progress=False) as trainer:
        assert trainer.state["attention"] == "fp32" and trainer.model.transformer.h[0].attn.attend_in_fp32
        assert trainer.attention_note == ", attention in fp32 (as the run began)"
