"""Batched inverse-CDF sampling and the per-row uniform streams the engine samples with; exact categorical
sampling of whole batches (sample_rows)."""

import math
import types

import pytest
import torch

from glmlab.generation.engine import Controls, Row, next_tokens
from glmlab.generation.sampling import UniformStream, inverse_cdf, sample_rows
from glmlab.generation.settings import GenerationSettings


def test_inverse_cdf_maps_uniforms_to_tokens_and_never_picks_a_filtered_token():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]]))  # -inf where p = 0
    # row 0's CDF is 0.5, 0.5, 0.75, 1.0: u -> 1 - u is the point searched for
    for u, want in [(0.0, 3), (0.2, 3), (0.3, 2), (0.49, 2), (0.51, 0), (0.9, 0), (1 - 1e-9, 0)]:
        assert inverse_cdf(logits, torch.tensor([u, u], dtype=torch.float64)).tolist() == [want, 2], u
    assert inverse_cdf(logits, torch.tensor([1.0, 1.0])).tolist() == [0, 2]  # even u = 1 finds probability mass


def test_inverse_cdf_draws_from_the_softmax():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = inverse_cdf(probs.log().expand(len(u), 4), u)
    freq = torch.bincount(tokens, minlength=4).double() / len(u)
    assert torch.allclose(freq, probs.double(), atol=0.005) and freq[1] == 0


def test_uniform_stream_depends_only_on_the_seed_not_on_the_block_size():
    a = UniformStream(torch.Generator().manual_seed(7), block=3)
    b = UniformStream(torch.Generator().manual_seed(7), block=256)
    first = [a.next() for _ in range(10)]
    assert first == [b.next() for _ in range(10)]
    assert all(0.0 <= x < 1.0 for x in first) and len(set(first)) == 10


def test_a_rows_tokens_do_not_depend_on_the_rest_of_the_batch():
    tokenizer = types.SimpleNamespace(eos_id=0)

    def rows(seeds, temperature=1.0):
        return [Row([1], GenerationSettings(temperature=temperature, seed=s), 0, tokenizer, torch.device("cpu"))
                for s in seeds]

    def pick(logits, batch, row):
        return next_tokens(logits.expand(len(batch), 50), batch, tokenizer, Controls.of(batch))[1][row]

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    alone = rows([3])
    together = rows([3, 4, 5])
    picks_alone = [pick(logits, alone, 0) for _ in range(20)]
    picks_together = [pick(logits, together, 0) for _ in range(20)]
    assert picks_alone == picks_together and len(set(picks_alone)) > 3
    mixed = rows([3]) + rows([0], temperature=0.0)  # a greedy row next to a sampling one takes the argmax
    assert [pick(logits, mixed, 1) for _ in range(5)] == [int(logits.argmax())] * 5


def test_sample_rows_draws_from_the_softmax():
    probs = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
    n = 20_000
    logits = (probs.log() + 1.7).expand(n, -1)  # a shift must not matter
    counts = torch.bincount(sample_rows(logits, torch.Generator().manual_seed(0)), minlength=6).double()
    expected = n * probs.double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.sum() == n and chi2 < 20.5  # 5 degrees of freedom: p = 0.001


def test_sample_rows_is_reproducible_with_a_generator_and_per_row():
    logits = torch.randn(300, 9)
    a = sample_rows(logits, torch.Generator().manual_seed(5))
    b = sample_rows(logits, torch.Generator().manual_seed(5))
    c = sample_rows(logits, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    one_hot = torch.full((4, 5), -1e4)
    one_hot[torch.arange(4), torch.tensor([4, 0, 2, 3])] = 0.0  # each row its own (certain) token
    assert sample_rows(one_hot).tolist() == [4, 0, 2, 3]


@pytest.mark.parametrize("uniform", [0.0, 1.0 - 2.0 ** -24])  # the extremes torch.rand can return
def test_sample_rows_never_draws_a_zero_probability_token(monkeypatch, uniform):
    logits = torch.tensor([[-math.inf, 0.3, 0.1, -math.inf, -math.inf], [-math.inf, -math.inf, 2.0, 0.0, -math.inf]])
    monkeypatch.setattr(torch, "rand", lambda size, **kw: torch.full(size, uniform))
    drawn = sample_rows(logits).tolist()
    assert drawn[0] in (1, 2) and drawn[1] in (2, 3)
