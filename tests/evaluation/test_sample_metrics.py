"""Sample metrics in Texygen's conventions: BLEU against the whole reference set, Self-BLEU, distinct-n."""

from __future__ import annotations

import random

import nltk
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from glmlab.evaluation.sample_metrics import bleu, distinct, sample_report, self_bleu

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "red", "big"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def test_a_sentence_found_among_the_references_scores_one():
    refs = ["the cat sat on the mat", "a dog ran under a log"]
    assert bleu(["the cat sat on the mat"], refs) == pytest.approx({2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0})
    unrelated = bleu(["red big red big red"], refs, orders=(2,))
    assert unrelated[2] < 0.2


def test_self_bleu_of_identical_sentences_is_one_and_of_distinct_ones_lower():
    assert self_bleu(["the cat sat on the mat"] * 4) == pytest.approx({2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0})
    assert self_bleu(sentences(20, 0), orders=(3,))[3] < 0.9
    assert self_bleu(["only one sentence"]) == {}  # nothing to compare it with


def test_distinct_n_by_hand():
    assert distinct(["a a b"], orders=(1, 2, 3)) == pytest.approx({1: 2 / 3, 2: 1.0, 3: 1.0})
    assert distinct(["a b", "a b c"], orders=(1, 2)) == pytest.approx({1: 3 / 5, 2: 2 / 3})
    assert distinct(["a"], orders=(2,)) == {2: 0.0}


def test_bleu_is_the_average_of_nltk_sentence_bleu_against_every_reference():
    generated, refs = sentences(6, 1), sentences(8, 2)
    smoothing = SmoothingFunction().method1
    for n in (2, 3, 4):
        weights = tuple([1.0 / n] * n)
        direct = [sentence_bleu([r.split() for r in refs], g.split(), weights, smoothing_function=smoothing)
                  for g in generated]
        assert bleu(generated, refs, orders=(n,))[n] == pytest.approx(sum(direct) / len(direct), rel=1e-12)
    n = 3
    direct = []
    for i, g in enumerate(generated):
        others = [s.split() for j, s in enumerate(generated) if j != i]
        direct.append(sentence_bleu(others, g.split(), (1 / 3, 1 / 3, 1 / 3), smoothing_function=smoothing))
    assert self_bleu(generated, orders=(n,))[n] == pytest.approx(sum(direct) / len(direct), rel=1e-12)


def test_limits_are_respected_and_counted():
    generated, refs = sentences(7, 3), sentences(9, 4)
    limited = bleu(generated, refs, orders=(2,), reference_limit=3)
    assert limited == pytest.approx(bleu(generated, refs[:3], orders=(2,), reference_limit=None))
    assert limited != pytest.approx(bleu(generated, refs, orders=(2,), reference_limit=None))
    assert self_bleu(generated, orders=(2,), limit=4) == pytest.approx(self_bleu(generated[:4], orders=(2,),
                                                                                 limit=None))
    report = sample_report(generated, refs, orders=(2, 3), reference_limit=3, self_bleu_limit=4)
    assert (report.generated, report.references, report.self_bleu_sentences) == (7, 3, 4)
    assert report.bleu[2] == pytest.approx(limited[2]) and set(report.self_bleu) == {2, 3}
    everything = sample_report(generated, refs, orders=(2,), reference_limit=None, self_bleu_limit=None)
    assert (everything.references, everything.self_bleu_sentences) == (9, 7)
    lengths = [len(s.split()) for s in generated]
    assert report.mean_length == pytest.approx(sum(lengths) / len(lengths))
    assert sample_report(generated).bleu == {} and sample_report(generated).references == 0


def test_format_names_nltk_and_the_counts():
    generated, refs = sentences(7, 3), sentences(9, 4)
    report = sample_report(generated, refs, orders=(2, 3), reference_limit=5, self_bleu_limit=6)
    text = report.format()
    assert f"nltk {nltk.__version__}" in text and "smoothing method 1" in text
    assert "7 generated sentences" in text and "against 5 references" in text and "(6 sentences)" in text
    assert f"2: {report.bleu[2]:.3f}" in text and "distinct" in text
    assert report.to_dict()["nltk_version"] == nltk.__version__


def test_an_empty_generated_sentence_scores_zero_as_in_texygen():
    refs = ["a man rides a horse", "a dog runs"]
    assert bleu(["a man rides a horse", ""], refs, orders=(2,))[2] == pytest.approx(0.5)
    assert self_bleu(["a cat", "a cat", ""], orders=(2,))[2] == pytest.approx(2 / 3)


def test_fast_scores_equal_nltk_sentence_bleu_exactly_including_ties_and_left_out_lengths():
    rng = random.Random(3)
    vocab = ["a", "b", "c", "d", "e", "f", "g"]
    sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))) for _ in range(40)]
    refs, hyps = sentences[:25], sentences[25:] + [""]
    smoothing = SmoothingFunction().method1
    for n in (1, 2, 3, 4, 5):
        weights = tuple(1.0 / n for _ in range(n))
        expected = sum(sentence_bleu([r.split() for r in refs], h.split(), weights, smoothing_function=smoothing)
                       for h in hyps) / len(hyps)
        assert bleu(hyps, refs, orders=(n,), reference_limit=None)[n] == expected
        own = [s.split() for s in refs]
        expected_self = sum(sentence_bleu(own[:i] + own[i + 1:], own[i], weights, smoothing_function=smoothing)
                            for i in range(len(own))) / len(own)
        assert self_bleu(refs, orders=(n,))[n] == expected_self
