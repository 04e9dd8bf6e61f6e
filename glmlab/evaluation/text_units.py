"""The units text metrics count (``--metric-tokenizer``): BLEU, Self-BLEU, distinct-n, ROUGE-L and exact match
compare sequences of these. Whitespace words suit spaced scripts; for text written without spaces (Chinese,
Japanese, Thai) a whitespace "word" is a whole clause, so the metrics would be near zero and meaningless —
``zh`` counts each unspaced-script character as a unit and splits the rest at whitespace, as sacreBLEU's ``zh``
tokenizer does for Chinese; ``char`` counts every non-space character. ``auto`` picks ``zh`` for unspaced text
and ``whitespace`` otherwise; reports record the choice."""

from __future__ import annotations

from collections.abc import Iterable

from glmlab.data.scripts import UNSPACED, profile
from glmlab.errors import GlmlabError

METRIC_TOKENIZERS = ("auto", "whitespace", "zh", "char")


def resolve(kind: str, texts: Iterable[str]) -> str:
    """``kind``, with ``auto`` made concrete from the texts it will score."""
    if kind not in METRIC_TOKENIZERS:
        raise GlmlabError(f"unknown metric tokenizer {kind!r}", f"use one of: {', '.join(METRIC_TOKENIZERS)}")
    if kind != "auto":
        return kind
    return "zh" if profile(texts).unspaced else "whitespace"


def units(text: str, kind: str = "whitespace") -> list[str]:
    """``text`` as the units a metric counts (``kind`` resolved: whitespace, zh or char)."""
    if kind == "whitespace":
        return text.split()
    if kind == "char":
        return [c for c in text if not c.isspace()]
    if kind == "zh":
        return UNSPACED.sub(lambda m: f" {m.group(0)} ", text).split()
    raise GlmlabError(f"metric tokenizer {kind!r} is not resolved", "resolve 'auto' with resolve() first")
