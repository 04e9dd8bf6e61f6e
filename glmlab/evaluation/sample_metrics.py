"""Quality and diversity of generated sentences, for every family: BLEU, Self-BLEU, distinct-n, length.

The conventions are Texygen's (Zhu et al. 2018), so figures compare with the text-GAN literature:

- **BLEU-n** of each generated sentence against the whole reference set (every reference sentence
  is a reference), as nltk's ``sentence_bleu`` computes it (uniform weights over 1..n-grams, smoothing
  method 1), averaged over the generated sentences. The reference counts are computed once per set
  (tests check the scores equal nltk's), so scoring against all 10,000 references takes seconds.
  Texygen's default ("fast") mode scores against the first 500 reference sentences; so does this
  module unless told otherwise (``reference_limit=None``: all of them).
- **Self-BLEU-n** of each of the first 500 generated sentences against the other 499: high means
  the samples repeat each other (low diversity).
- Tokens are whitespace-separated words (the benchmark sets are already tokenized and lower-cased;
  Texygen's ``nltk.word_tokenize`` would need a downloaded model, which glmlab never fetches), or the
  units ``unit`` names (:mod:`glmlab.evaluation.text_units`: characters of Chinese, as sacreBLEU's ``zh``).
- An empty generated sentence scores 0 (as Texygen scores an empty line), so emitting ``<eos>`` at
  once is never rewarded.
- **distinct-n**: distinct n-grams / all n-grams over all generated sentences (Li et al. 2016).

nltk's BLEU changed across releases, so its version is pinned in constraints.txt and printed with
the scores.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import nltk
from nltk.util import ngrams

from glmlab.evaluation.text_units import resolve, units

TEXYGEN_SAMPLE_SIZE = 500
SMOOTHING_EPSILON = 0.1  # nltk's SmoothingFunction().method1: add 0.1 to a zero n-gram match count


@dataclass
class SampleReport:
    bleu: dict[int, float] = field(default_factory=dict)  # n -> BLEU-n against the references
    self_bleu: dict[int, float] = field(default_factory=dict)
    distinct: dict[int, float] = field(default_factory=dict)
    mean_length: float = 0.0
    generated: int = 0  # sentences scored as hypotheses
    references: int = 0  # reference sentences used
    self_bleu_sentences: int = 0
    units: str = "whitespace"  # what the n-grams are made of (text_units: whitespace, zh, char)
    nltk_version: str = nltk.__version__

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def row(name: str, values: dict[int, float]) -> str:
            return f"  {name:<11}" + " ".join(f"{n}: {v:.3f}" for n, v in sorted(values.items()))

        unit = "words" if self.units == "whitespace" else f"{self.units} units"
        lines = [f"{self.generated} generated sentences, mean length {self.mean_length:.1f} {unit} "
                 f"(nltk {self.nltk_version}, smoothing method 1, {self.units} tokens)"]
        if self.bleu:
            lines.append(row("BLEU", self.bleu) + f"   (against {self.references} references)")
        if self.self_bleu:
            lines.append(row("Self-BLEU", self.self_bleu) + f"   ({self.self_bleu_sentences} sentences)")
        lines.append(row("distinct", self.distinct))
        return "\n".join(lines)


def words(sentences: Sequence[str], unit: str = "whitespace") -> list[list[str]]:
    return [units(s, unit) for s in sentences]


class _References:
    """A reference set's n-gram counts, kept so that each hypothesis is scored in O(its length) instead of
    recounting every reference per hypothesis as ``sentence_bleu`` does; the arithmetic is nltk's.

    For each n-gram: the largest count over the references, which reference holds it, and the second
    largest, so that "all the others" (Self-BLEU) leave one sentence out without recounting."""

    def __init__(self, references: list[list[str]], max_n: int) -> None:
        self.best: list[dict[tuple, tuple[int, int, int]]] = []  # n-1 -> ngram -> (max, argmax, second)
        for n in range(1, max_n + 1):
            table: dict[tuple, tuple[int, int, int]] = {}
            for index, ref in enumerate(references):
                for gram, count in Counter(ngrams(ref, n)).items() if len(ref) >= n else ():
                    top, where, second = table.get(gram, (0, -1, 0))
                    table[gram] = (count, index, top) if count > top else (top, where, max(second, count))
            self.best.append(table)
        self.lengths = Counter(len(r) for r in references)
        self.sorted_lengths = sorted(self.lengths)

    def _max_count(self, n: int, gram: tuple, without: int) -> int:
        top, where, second = self.best[n - 1].get(gram, (0, -1, 0))
        return second if where == without else top

    def _closest_length(self, hyp_len: int, without_length: int | None) -> int:
        """nltk's ``closest_ref_length``: the nearest reference length, the shorter on a tie."""
        i = bisect.bisect_left(self.sorted_lengths, hyp_len)
        candidates = [length for length in self.sorted_lengths[max(0, i - 2):i + 2]
                      if length != without_length or self.lengths[length] > 1]
        if not candidates:  # the left-out sentence held the only nearby lengths: look at all of them
            candidates = [length for length in self.sorted_lengths
                          if length != without_length or self.lengths[length] > 1]
        return min(candidates, key=lambda length: (abs(length - hyp_len), length))

    def sentence_bleu(self, hypothesis: list[str], weights: tuple[float, ...], without: int = -1,
                      without_length: int | None = None) -> float:
        """``nltk.translate.bleu_score.sentence_bleu(references, hypothesis, weights, smoothing_function=
        SmoothingFunction().method1)`` (leaving out reference ``without``, of length ``without_length``)."""
        precisions = []
        for n in range(1, len(weights) + 1):
            counts = Counter(ngrams(hypothesis, n)) if len(hypothesis) >= n else Counter()
            matched = sum(min(c, self._max_count(n, g, without)) for g, c in counts.items())
            precisions.append((matched, max(1, sum(counts.values()))))
        if precisions[0][0] == 0:
            return 0.0
        hyp_len = len(hypothesis)
        ref_len = self._closest_length(hyp_len, without_length)
        penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
        logs = (w * math.log((m if m else SMOOTHING_EPSILON) / d)
                for w, (m, d) in zip(weights, precisions, strict=True))
        return penalty * math.exp(math.fsum(logs))


def _weights(n: int) -> tuple[float, ...]:
    return tuple(1.0 / n for _ in range(n))


def bleu(generated: Sequence[str], references: Sequence[str], orders: Sequence[int] = (2, 3, 4, 5),
         reference_limit: int | None = TEXYGEN_SAMPLE_SIZE, unit: str = "whitespace") -> dict[int, float]:
    """BLEU-n of each generated sentence against the (first ``reference_limit``) references, averaged."""
    refs = words(references[:reference_limit] if reference_limit else references, unit)
    hyps = words(generated, unit)  # an empty sentence scores 0, as in Texygen
    if not hyps or not refs:
        return {n: 0.0 for n in orders}
    table = _References(refs, max(orders))
    return {n: sum(table.sentence_bleu(h, _weights(n)) for h in hyps) / len(hyps) for n in orders}


def self_bleu(generated: Sequence[str], orders: Sequence[int] = (2, 3, 4, 5),
              limit: int | None = TEXYGEN_SAMPLE_SIZE, unit: str = "whitespace") -> dict[int, float]:
    """Self-BLEU-n: each of the first ``limit`` sentences against all the others among them."""
    sample = words(generated[:limit] if limit else generated, unit)
    if len(sample) < 2:
        return {}
    table = _References(sample, max(orders))
    return {n: sum(table.sentence_bleu(h, _weights(n), without=i, without_length=len(h))
                   for i, h in enumerate(sample)) / len(sample) for n in orders}


def distinct(generated: Sequence[str], orders: Sequence[int] = (1, 2), unit: str = "whitespace") -> dict[int, float]:
    """Distinct n-grams over all n-grams of the generated sentences."""
    out = {}
    tokenized = words(generated, unit)
    for n in orders:
        grams = [tuple(s[i:i + n]) for s in tokenized for i in range(len(s) - n + 1)]
        out[n] = len(set(grams)) / len(grams) if grams else 0.0
    return out


def sample_report(generated: Sequence[str], references: Sequence[str] | None = None,
                  orders: Sequence[int] = (2, 3, 4, 5), reference_limit: int | None = TEXYGEN_SAMPLE_SIZE,
                  self_bleu_limit: int | None = TEXYGEN_SAMPLE_SIZE, unit: str = "auto") -> SampleReport:
    """Every sample metric of ``generated`` (BLEU only when ``references`` are given), counted in ``unit``s
    (``auto``: characters for unspaced text, else whitespace words; the report says which)."""
    unit = resolve(unit, references or generated)
    tokenized = words(generated, unit)
    report = SampleReport(distinct=distinct(generated, unit=unit), generated=len(generated),
                          mean_length=sum(map(len, tokenized)) / max(1, len(tokenized)), units=unit)
    if references:
        report.bleu = bleu(generated, references, orders, reference_limit, unit)
        report.references = min(len(references), reference_limit or len(references))
    report.self_bleu = self_bleu(generated, orders, self_bleu_limit, unit)
    report.self_bleu_sentences = min(len(generated), self_bleu_limit or len(generated))
    return report
