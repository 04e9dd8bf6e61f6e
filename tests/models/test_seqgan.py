"""Family `seqgan`: sequences that end at <eos>, the CNN discriminator, the lstm protocol, and which config
changes a resumed run may make."""

from __future__ import annotations

import pytest
import torch

from glmlab.config import resolve_config
from glmlab.errors import ConfigError
from glmlab.models import build_model
from glmlab.models.seqgan import EOS_ID, PAD_ID, Discriminator, SeqGAN, SeqGANConfig, sequence_mask
from glmlab.training.trainer import config_changes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=12, block_size=10, n_embd=8, n_hidden=16, d_embd=8, d_filter_sizes="1,2,5",
            d_num_filters="4,6,4", d_dropout=0.0)
BOS = 2




def tiny(**changes) -> SeqGAN:
    torch.manual_seed(0)
    return build_model(SeqGANConfig(**{**TINY, **changes})).eval()


# --- sequence_mask ---------------------------------------------------------------------------------------

def test_sequence_mask_by_hand():
    tokens = torch.tensor([[5, 6, 3, 0, 0], [3, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 3, 7, 3, 0]])
    assert sequence_mask(tokens).int().tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1],
                                                   [1, 1, 0, 0, 0]]


# --- the discriminator ------------------------------------------------------------------------------------

def test_discriminator_pads_short_sequences_and_takes_long_ones():
    torch.manual_seed(0)
    d = Discriminator(SeqGANConfig(**TINY)).eval()
    short = torch.tensor([[4, 5, EOS_ID], [6, EOS_ID, PAD_ID]])  # narrower than the widest filter (5)
    with torch.no_grad():
        logits = d(short)
        assert logits.shape == (2,)
        padded = torch.cat([short, torch.full((2, 2), PAD_ID)], dim=1)
        assert torch.allclose(logits, d(padded), atol=1e-6)  # short = padded to the widest filter
        long = torch.randint(4, 12, (3, 14))
        assert d(long).shape == (3,) and torch.isfinite(d(long)).all()
        assert not torch.allclose(d(long)[0], d(long[:, :5])[0])  # it reads beyond the first widths


# --- the lstm protocol ------------------------------------------------------------------------------------

def test_the_generator_speaks_the_lstm_protocol():
    model = tiny()
    x = torch.randint(4, 12, (3, 9))
    y = torch.randint(4, 12, (3, 9))
    y[0, 5:] = -100
    with torch.no_grad():
        full = model(x)
        assert full.shape == (3, 9, 12)
        cache = model.new_cache(3, torch.device("cpu"))
        parts = torch.cat([model(x[:, :4], cache)] + [model(x[:, i:i + 1], cache) for i in range(4, 9)], dim=1)
        assert torch.allclose(parts, full, atol=1e-5) and cache.lengths == [9, 9, 9]
        nll = float(model.nll(x, y))
        direct = torch.nn.functional.cross_entropy(full.reshape(-1, 12), y.reshape(-1), ignore_index=-100,
                                                   reduction="sum")
        assert nll == pytest.approx(float(direct), rel=1e-5)
        assert float(model.loss(x, y)) == pytest.approx(nll / int((y != -100).sum()), rel=1e-5)
    assert model.traits.sentence_level and model.block_size == 10
    generator = {id(p) for p in model.generator_parameters()}
    assert generator == {id(p) for p in model.net.parameters()}
    assert not generator & {id(p) for p in model.discriminator.parameters()}


def test_rollout_copy_is_a_frozen_equal_copy():
    model = tiny()
    rollout = model.rollout_copy()
    assert not rollout.training and not any(p.requires_grad for p in rollout.parameters())
    for a, b in zip(rollout.parameters(), model.net.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


# --- config -----------------------------------------------------------------------------------------------

BASE = ["model.family=seqgan", "model.n_hidden=16", "model.d_filter_sizes=1,2", "model.d_num_filters=3,4"]


def test_a_resumed_run_may_change_the_adversarial_schedule_only():
    old = resolve_config({}, BASE)
    schedule = resolve_config({}, [*BASE, "model.adv_rounds=50", "model.g_lr=0.05", "model.baseline=mean",
                                   "model.rollout_num=4", "model.d_steps=2", "model.adv_eval_interval=3"])
    assert config_changes(old, schedule) == []
    assert "baseline" in SeqGANConfig.RESUMABLE and "adv_rounds" in SeqGANConfig.RESUMABLE
    shape = resolve_config({}, [*BASE, "model.n_hidden=32", "model.d_embd=16"])
    assert sorted(config_changes(old, shape)) == ["model.d_embd", "model.n_hidden"]


@pytest.mark.parametrize("sizes, counts, key", [("1,2,3", "4,4", "d_filter_sizes"), ("", "", "d_filter_sizes"),
                                               ("a,2", "4,4", "d_filter_sizes"), ("0,2", "4,4", "d_filter_sizes"),
                                               ("1,2", "4,0", "d_num_filters")])
def test_validate_refuses_filter_lists_that_do_not_pair(sizes, counts, key):
    with pytest.raises(ConfigError, match=key):
        resolve_config({}, ["model.family=seqgan", f"model.d_filter_sizes={sizes}", f"model.d_num_filters={counts}"])
    with pytest.raises(ConfigError):
        SeqGANConfig(vocab_size=10, d_filter_sizes=sizes, d_num_filters=counts).validate()
    SeqGANConfig(vocab_size=10, d_filter_sizes="1, 2", d_num_filters="4,4").validate()  # a valid pair passes
