"""Which writing systems a text uses, as far as tokenizers and text metrics care: scripts written without spaces
between words (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar, Tibetan), where a whitespace word is a whole
clause and a character is the unit sacreBLEU's ``zh`` tokenizer scores."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# CJK ideographs (+ extension A, compatibility, extension B-F), kana, Thai, Lao, Khmer, Myanmar, Tibetan
UNSPACED_CHARS = ("\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002ebef\u3040-\u30ff\u31f0-\u31ff"
                  "\u0e00-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\u0f00-\u0fff")
UNSPACED = re.compile(f"[{UNSPACED_CHARS}]")
_RUNS = re.compile(f"[{UNSPACED_CHARS}]+")
_LETTERS = re.compile(r"\w")
UNSPACED_SHARE = 0.3  # above this share of its letters, a text is treated as unspaced
SAMPLE_CHARS = 2_000_000  # what the checks read of a corpus


@dataclass
class ScriptProfile:
    """How much of a text is in unspaced scripts, how long its unspaced runs between spaces are, and how many
    distinct unspaced characters it has."""

    share: float  # of the letters
    mean_run: float  # characters per run of unspaced characters (a pre-segmented text has short runs)
    distinct: int

    @property
    def unspaced(self) -> bool:
        return self.share > UNSPACED_SHARE


def profile(texts: Iterable[str], limit: int = SAMPLE_CHARS) -> ScriptProfile:
    """The script profile of (up to ``limit`` characters of) ``texts``."""
    letters = unspaced = runs = 0
    chars: set[str] = set()
    for text in texts:
        text = text[: max(0, limit)]
        limit -= len(text)
        letters += len(_LETTERS.findall(text))
        found = _RUNS.findall(text)
        runs += len(found)
        for run in found:
            unspaced += len(run)
            chars.update(run)
        if limit <= 0:
            break
    return ScriptProfile(unspaced / letters if letters else 0.0, unspaced / runs if runs else 0.0, len(chars))
