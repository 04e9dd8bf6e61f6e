import math

import numpy as np
import pytest
import torch

from glmlab.evaluation.likelihood import likelihood_report, sum_nll
from glmlab.models.gpt import GPT, GPTConfig


def test_report_arithmetic():
    report = likelihood_report(nll_sum=100 * math.log(2), tokens=50, characters=100, num_bytes=200)
    assert report.bits_per_char == pytest.approx(1.0) and report.bits_per_byte == pytest.approx(0.5)
    assert report.nll == pytest.approx(2 * math.log(2)) and report.perplexity == pytest.approx(4.0)


@pytest.mark.parametrize("stride", [None, 3, 8])
def test_uniform_model_scores_log_vocab_per_token_whatever_the_stride(stride):
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied head -> all logits 0 -> uniform
    tokens = np.arange(4, 31, dtype=np.uint16)
    nll, count = sum_nll(model, tokens, start_id=3, stride=stride, batch_size=3)
    assert count == len(tokens)
    assert nll == pytest.approx(len(tokens) * math.log(40), rel=1e-5)


def test_windowed_score_equals_one_pass_when_it_fits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(4, 30, size=20).astype(np.uint16)
    nll, count = sum_nll(model, tokens, start_id=3)
    stream = torch.tensor([[3, *tokens.tolist()]])
    with torch.no_grad():
        logp = model(stream[:, :-1]).log_softmax(-1)
    expected = -logp[0].gather(-1, stream[0, 1:, None]).sum().item()
    assert count == 20 and nll == pytest.approx(expected, rel=1e-5)
