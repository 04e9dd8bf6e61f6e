"""Quality and diversity of generated sentences, for every family: BLEU, Self-BLEU, distinct-n, length.

The conventions are Texygen's (Zhu et al. 2018), so figures compare with the text-GAN literature:

- **BLEU-n** of each generated sentence against the whole reference set (every reference sentence
  is a reference), with nltk's ``sentence_bleu``, uniform weights over 1..n-grams and smoothing
  method 1, averaged over the generated sentences. Texygen's default ("fast") mode scores against
  the first 500 reference sentences; so does this module unless told otherwise.
- **Self-BLEU-n** of each of the first 500 generated sentences against the other 499: high means
  the samples repeat each other (low diversity).
- Tokens are whitespace-separated words (the benchmark sets are already tokenized and lower-cased;
  Texygen's ``nltk.word_tokenize`` would need a downloaded model, which glmlab never fetches).
- **distinct-n**: distinct n-grams / all n-grams over all generated sentences (Li et al. 2016).

nltk's BLEU changed across releases, so its version is pinned in constraints.txt and printed with
the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import nltk
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

TEXYGEN_SAMPLE_SIZE = 500


@dataclass
class SampleReport:
    bleu: dict[int, float] = field(default_factory=dict)  # n -> BLEU-n against the references
    self_bleu: dict[int, float] = field(default_factory=dict)
    distinct: dict[int, float] = field(default_factory=dict)
    mean_length: float = 0.0
    generated: int = 0  # sentences scored as hypotheses
    references: int = 0  # reference sentences used
    self_bleu_sentences: int = 0
    nltk_version: str = nltk.__version__

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def row(name: str, values: dict[int, float]) -> str:
            return f"  {name:<11}" + " ".join(f"{n}: {v:.3f}" for n, v in sorted(values.items()))

        lines = [f"{self.generated} generated sentences, mean length {self.mean_length:.1f} words "
                 f"(nltk {self.nltk_version}, smoothing method 1, whitespace tokens)"]
        if self.bleu:
            lines.append(row("BLEU", self.bleu) + f"   (against {self.references} references)")
        if self.self_bleu:
            lines.append(row("Self-BLEU", self.self_bleu) + f"   ({self.self_bleu_sentences} sentences)")
        lines.append(row("distinct", self.distinct))
        return "\n".join(lines)


def words(sentences: Sequence[str]) -> list[list[str]]:
    return [s.split() for s in sentences]


def _bleu_average(hypotheses: list[list[str]], references: list[list[list[str]]], n: int) -> float:
    weights = tuple(1.0 / n for _ in range(n))
    smoothing = SmoothingFunction().method1
    scores = [sentence_bleu(refs, hyp, weights, smoothing_function=smoothing)
              for hyp, refs in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


def bleu(generated: Sequence[str], references: Sequence[str], orders: Sequence[int] = (2, 3, 4, 5),
         reference_limit: int | None = TEXYGEN_SAMPLE_SIZE) -> dict[int, float]:
    """BLEU-n of each generated sentence against the (first ``reference_limit``) references, averaged."""
    refs = words(references[:reference_limit] if reference_limit else references)
    hyps = [h for h in words(generated) if h]
    return {n: _bleu_average(hyps, [refs] * len(hyps), n) for n in orders}


def self_bleu(generated: Sequence[str], orders: Sequence[int] = (2, 3, 4, 5),
              limit: int | None = TEXYGEN_SAMPLE_SIZE) -> dict[int, float]:
    """Self-BLEU-n: each of the first ``limit`` sentences against all the others among them."""
    sample = [h for h in words(generated[:limit] if limit else generated) if h]
    others = [sample[:i] + sample[i + 1:] for i in range(len(sample))]
    return {n: _bleu_average(sample, others, n) for n in orders} if len(sample) > 1 else {}


def distinct(generated: Sequence[str], orders: Sequence[int] = (1, 2)) -> dict[int, float]:
    """Distinct n-grams over all n-grams of the generated sentences."""
    out = {}
    tokenized = words(generated)
    for n in orders:
        grams = [tuple(s[i:i + n]) for s in tokenized for i in range(len(s) - n + 1)]
        out[n] = len(set(grams)) / len(grams) if grams else 0.0
    return out


def sample_report(generated: Sequence[str], references: Sequence[str] | None = None,
                  orders: Sequence[int] = (2, 3, 4, 5), reference_limit: int | None = TEXYGEN_SAMPLE_SIZE,
                  self_bleu_limit: int | None = TEXYGEN_SAMPLE_SIZE) -> SampleReport:
    """Every sample metric of ``generated`` (BLEU only when ``references`` are given)."""
    tokenized = words(generated)
    report = SampleReport(distinct=distinct(generated), generated=len(generated),
                          mean_length=sum(map(len, tokenized)) / max(1, len(tokenized)))
    if references:
        report.bleu = bleu(generated, references, orders, reference_limit)
        report.references = min(len(references), reference_limit or len(references))
    report.self_bleu = self_bleu(generated, orders, self_bleu_limit)
    report.self_bleu_sentences = min(len(generated), self_bleu_limit or len(generated))
    return report
