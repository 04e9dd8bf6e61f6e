"""Each decoding control against Hugging Face's own processor on the same logits, or a hand-worked case."""

import pytest
import torch

from glmlab.generation import processors as P

transformers = pytest.importorskip("transformers")


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 50) * 3


def _same_mask(a, b):
    return torch.equal(torch.isinf(a), torch.isinf(b))


def test_warpers_match_transformers(logits):
    ids = torch.zeros(3, 1, dtype=torch.long)
    cases = [
        (P.apply_top_k(logits, [5] * 3), transformers.TopKLogitsWarper(5)(ids, logits.clone())),
        (P.apply_top_p(logits, [0.7] * 3), transformers.TopPLogitsWarper(0.7)(ids, logits.clone())),
        (P.apply_min_p(logits, [0.1] * 3), transformers.MinPLogitsWarper(0.1)(ids, logits.clone())),
        (P.apply_typical_p(logits, [0.6] * 3), transformers.TypicalLogitsWarper(0.6)(ids, logits.clone())),
    ]
    for ours, theirs in cases:
        assert _same_mask(ours, theirs)
        assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert torch.allclose(P.apply_temperature(logits, [0.7] * 3),
                          transformers.TemperatureLogitsWarper(0.7)(ids, logits.clone()))


def test_per_row_settings_leave_other_rows_alone(logits):
    out = P.apply_top_k(logits, [0, 3, 0])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert (~torch.isinf(out[1])).sum() == 3
    out = P.apply_top_p(logits, [1.0, 0.5, 1.0])
    assert torch.equal(out[0], logits[0]) and (~torch.isinf(out[1])).sum() < 50


def test_repetition_penalty_matches_transformers(logits):
    history = [[1, 2, 2, 7], [], [49, 0]]
    ids = torch.tensor([[1, 2, 2, 7], [5, 5, 5, 5], [49, 0, 49, 0]])
    ours = P.apply_repetition_penalty(logits, history, [1.3, 1.0, 1.3])
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(ours[[0, 2]], theirs[[0, 2]]) and torch.equal(ours[1], logits[1])


def test_no_repeat_ngram_matches_transformers(logits):
    ids = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4], [1, 2, 1, 2, 1]])
    ours = P.apply_no_repeat_ngram(logits, ids.tolist(), [3, 2, 2])
    for row, n in enumerate([3, 2, 2]):
        theirs = transformers.NoRepeatNGramLogitsProcessor(n)(ids[row:row + 1], logits[row:row + 1].clone())
        assert _same_mask(ours[row:row + 1], theirs)
    assert torch.isinf(ours[0, 3])  # "1 2" was followed by 3 before


def test_bad_words_match_transformers(logits):
    ids = torch.tensor([[5, 6, 7], [1, 2, 3], [9, 9, 9]])
    bad = [[11], [6, 7, 8], [3, 4]]
    ours = P.apply_bad_words(logits, ids.tolist(), [bad] * 3)
    theirs = transformers.NoBadWordsLogitsProcessor(bad, eos_token_id=49)(ids, logits.clone())
    assert _same_mask(ours, theirs)
    assert torch.isinf(ours[0, 8]) and torch.isinf(ours[1, 4]) and not torch.isinf(ours[2, 4])


def test_bad_words_longer_than_history(logits):
    out = P.apply_bad_words(logits[:1], [[7]], [[[1, 2, 7, 9]]])
    assert not torch.isinf(out).any()


def test_min_new_tokens_suppresses_eos(logits):
    out = P.suppress_tokens(logits, [0, 2], 4)
    assert torch.isinf(out[0, 4]) and torch.isinf(out[2, 4]) and not torch.isinf(out[1, 4])


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.zeros(1, 5)
    out = P.apply_presence_frequency(logits, [[1, 1, 1, 3]], [0.5], [0.25])
    assert out.tolist() == [[0.0, -(0.5 + 0.75), 0.0, -(0.5 + 0.25), 0.0]]
