import pytest
import torch

from glmlab.generation.sampling import filter_top_k, filter_top_p, sample_next


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    out = filter_top_k(logits, 2)
    assert torch.isinf(out[0, [0, 2]]).all() and out[0, 1] == 5.0 and out[0, 3] == 4.0
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = ~torch.isinf(filter_top_p(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = ~torch.isinf(filter_top_p(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert (~torch.isinf(filter_top_p(logits, 0.1))).sum() == 1  # always at least one


def test_matches_transformers_warpers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    hf_top_k = transformers.TopKLogitsWarper(top_k=7)(None, logits.clone())
    hf_top_p = transformers.TopPLogitsWarper(top_p=0.9)(None, logits.clone())
    assert torch.equal(torch.isinf(filter_top_k(logits, 7)), torch.isinf(hf_top_k))
    assert torch.equal(torch.isinf(filter_top_p(logits, 0.9)), torch.isinf(hf_top_p))


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.1, 2.0, 0.5], [3.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    draws = [sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5)).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    assert sample_next(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(1)).tolist() == [1, 0]
