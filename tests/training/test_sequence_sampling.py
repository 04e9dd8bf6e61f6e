"""SeqGAN's own sampler (the adversarial phase's rollouts and the oracle bench's samples): sequences end at
their first <eos> and are padded after it, follow the temperature, keep a prefix and its state, and never draw
a banned token."""

from __future__ import annotations

import pytest
import torch

from glmlab.models.seqgan import EOS_ID, PAD_ID, sequence_mask
from glmlab.training.adversarial import sample_sequences
from tests.models.test_seqgan import BOS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_pads_after_the_first_eos():
    model = tiny()
    with torch.no_grad():
        model.net.head.bias[EOS_ID] = 2.5  # sequences end early and often
    out = sample_sequences(model.net, 200, 9, BOS, generator=torch.Generator().manual_seed(0))
    assert out.shape == (200, 9)
    ended = out == EOS_ID
    first = torch.where(ended.any(1), ended.float().argmax(1), torch.full((200,), 9))
    positions = torch.arange(9)[None]
    assert bool(ended.any(1).float().mean() > 0.9) and bool((first < 8).any())
    after = positions > first[:, None]
    assert bool((out[after] == PAD_ID).all())
    assert torch.equal(sequence_mask(out), ~after & (out != PAD_ID))


@torch.no_grad()
def test_sample_at_a_temperature_sharpens_towards_greedy():
    model = tiny()
    cold = sample_sequences(model.net, 50, 6, BOS, generator=torch.Generator().manual_seed(0), temperature=1e-4)
    assert bool((cold == cold[0]).all())  # every row the greedy sequence
    warm = sample_sequences(model.net, 400, 6, BOS, generator=torch.Generator().manual_seed(0), temperature=1.0)
    hot = sample_sequences(model.net, 400, 6, BOS, generator=torch.Generator().manual_seed(0), temperature=3.0)
    assert len(set(map(tuple, hot.tolist()))) > len(set(map(tuple, warm.tolist()))) > 1


def test_sample_keeps_the_prefix_and_never_draws_banned_tokens():
    model = tiny()
    prefix = torch.tensor([[5, 6, 7]] * 40 + [[5, EOS_ID, PAD_ID]] * 10)
    out = sample_sequences(model.net, 50, 8, BOS, prefix=prefix, generator=torch.Generator().manual_seed(1))
    assert out.shape == (50, 8) and torch.equal(out[:, :3], prefix)
    assert bool((out[40:, 2:] == PAD_ID).all())  # an ended prefix is only padded
    assert bool((out[:40, 3:] != PAD_ID).any())
    banned = [0, 1, 2, 3, 9]
    free = sample_sequences(model.net, 300, 8, BOS, generator=torch.Generator().manual_seed(2), banned=banned)
    assert not bool(torch.isin(free, torch.tensor(banned)).any())
    again = sample_sequences(model.net, 300, 8, BOS, generator=torch.Generator().manual_seed(2), banned=banned)
    assert torch.equal(free, again)


def test_sample_from_a_prefix_continues_the_prefix_state():
    """The tokens after a prefix are drawn from p(. | <bos> prefix): with a certain next token, it is that token."""
    model = tiny()
    with torch.no_grad():
        model.net.head.bias[8] = 50.0
    out = sample_sequences(model.net, 4, 5, BOS, prefix=torch.tensor([[4, 5]] * 4),
                           generator=torch.Generator().manual_seed(0))
    assert out[:, 2:].eq(8).all()
