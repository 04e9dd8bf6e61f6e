"""Downstream metrics: accuracy, macro-F1 and the confusion matrix for classification; exact match,
BLEU and ROUGE-L for generated completions."""

from __future__ import annotations

from typing import Any

import numpy as np

from glmlab.evaluation.text_units import resolve, units


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[i, j] = examples of class i predicted as class j."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(truth), np.asarray(predicted)), 1)
    return counts


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro-F1 (every class weighs the same; a class never predicted nor present counts 0 and is
    left out of the mean), per-class F1 and the confusion matrix."""
    counts = confusion_matrix(truth, predicted, n_classes)
    tp = np.diag(counts).astype(float)
    predicted_n, true_n = counts.sum(0), counts.sum(1)
    denominator = predicted_n + true_n
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    present = denominator > 0
    return {"accuracy": float(tp.sum() / max(counts.sum(), 1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "f1": f1.tolist(), "confusion": counts.tolist(), "examples": int(counts.sum())}


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            current = row[j]
            row[j] = previous + 1 if x == y else max(row[j], row[j - 1])
            previous = current
    return row[-1]


def rouge_l(candidate: str, reference: str, unit: str = "whitespace") -> float:
    """ROUGE-L F1 over whitespace tokens, or ``unit``s (Lin 2004, beta = 1)."""
    c, r = units(candidate, unit), units(reference, unit)
    if not c or not r:
        return float(c == r)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(candidates: list[str], references: list[str], unit: str = "auto") -> dict[str, Any]:
    """Exact match (the same units: whitespace normalised), corpus BLEU-4 (nltk, smoothing method 1) and mean
    ROUGE-L F1 of generated completions against their references, counted in ``unit``s (``auto``: characters of
    unspaced text, else whitespace words; recorded as ``metric_tokenizer``)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    unit = resolve(unit, references)
    exact = float(np.mean([units(c, unit) == units(r, unit) for c, r in zip(candidates, references, strict=True)]))
    bleu = corpus_bleu([[units(r, unit)] for r in references], [units(c, unit) for c in candidates],
                       smoothing_function=SmoothingFunction().method1)
    rouge = float(np.mean([rouge_l(c, r, unit) for c, r in zip(candidates, references, strict=True)]))
    return {"exact_match": exact, "bleu": float(bleu), "rouge_l": rouge, "examples": len(candidates),
            "metric_tokenizer": unit}
