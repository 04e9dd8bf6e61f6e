"""Classification as a cloze (Schick & Schütze's PET; GLM's formulation): a pattern with a blank around each text
and one verbalizer word per label, e.g. "{text} It was [MASK]." with great / terrible. The class scores are the
model's logits of the verbalizer words at the blank, so a pre-trained infiller (bert, glm) classifies with no new
layer, and fine-tuning starts from what pre-training already knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmlab.data.tokenizer import BLANKS, MASK, MASK_ID, Tokenizer
from glmlab.errors import ConfigError, GlmlabError
from glmlab.finetune.classifier import BackboneClassifier
from glmlab.models.contract import LanguageModel

TEXT = "{text}"


@dataclass(frozen=True)
class Cloze:
    """A pattern (holding ``{text}`` and one ``[MASK]``) and a verbalizer (label -> word)."""

    pattern: str
    verbalizer: dict[str, str]

    @classmethod
    def parse(cls, pattern: str, verbalizer: str) -> Cloze:
        """From the command line: ``--pattern "{text} It was [MASK]."`` and ``--verbalizer "pos=great,neg=bad"``."""
        if pattern.count(TEXT) != 1:
            raise ConfigError(f"--pattern {pattern!r} must hold {TEXT} once: where each text goes",
                              'e.g. --pattern "{text} It was [MASK]."')
        if pattern.count(MASK) != 1:
            raise ConfigError(f"--pattern {pattern!r} must hold one {MASK}: the blank the label word fills",
                              'e.g. --pattern "{text} It was [MASK]."')
        words: dict[str, str] = {}
        for item in verbalizer.split(","):
            label, sep, word = item.partition("=")
            if not sep or not label.strip() or not word.strip():
                raise ConfigError(f"--verbalizer item {item!r} is not LABEL=WORD",
                                  'e.g. --verbalizer "positive=great,negative=terrible"')
            if label.strip() in words:
                raise ConfigError(f"--verbalizer names label {label.strip()!r} twice", "give each label one word")
            words[label.strip()] = word.strip()
        return cls(pattern, words)

    def word_ids(self, tokenizer: Tokenizer, labels: list[str]) -> list[int]:
        """Each label's word as one token id, in ``labels``' order; refused if a label has no word, a word is not
        one token of this tokenizer, or two labels share one."""
        missing = [label for label in labels if label not in self.verbalizer]
        extra = [label for label in self.verbalizer if label not in labels]
        if missing or extra:
            raise ConfigError(f"--verbalizer does not match the labels {labels}: "
                              + "; ".join(filter(None, [f"no word for {missing}" if missing else "",
                                                        f"unknown {extra}" if extra else ""])),
                              "give one LABEL=WORD per label of the training file")
        ids = []
        for label in labels:
            word = self.verbalizer[label]
            spaced = tokenizer.kind == "bpe" and f" {MASK}" in self.pattern  # the word follows a space there
            encoded = tokenizer.encode((" " if spaced else "") + word)
            if len(encoded) != 1 or encoded[0] == tokenizer.unk_id:
                raise ConfigError(f"the verbalizer word {word!r} (label {label!r}) is {len(encoded)} tokens of this "
                                  f"{tokenizer.kind} tokenizer, not one",
                                  "choose a word the tokenizer has as one token")
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise ConfigError("two labels have the same verbalizer word", "give each label its own word")
        return ids

    def encode(self, tokenizer: Tokenizer, texts: list[str], max_len: int, bos: bool) -> tuple[list[list[int]], int]:
        """Each text inside the pattern, as ids: [<bos>] before text after, the text cut at its end to fit
        ``max_len``. Returns the ids and how many texts were cut."""
        before, after = self.pattern.split(TEXT)
        if tokenizer.kind == "bpe":  # the word at the blank carries its space (see word_ids)
            before, after = before.replace(f" {MASK}", MASK), after.replace(f" {MASK}", MASK)
        head = ([tokenizer.bos_id] if bos else []) + (tokenizer.encode(before) if before else [])
        tail = tokenizer.encode(after) if after else []
        room = max_len - len(head) - len(tail)
        if room < 1:
            raise GlmlabError(f"the pattern takes {len(head) + len(tail)} tokens of a context of {max_len}",
                              "shorten the pattern")
        encoded, cut = [], 0
        for ids in tokenizer.encode_batch(texts):
            ids = [i for i in ids if i not in BLANKS]  # a text's own [MASK] would move the blank
            if len(ids) > room:
                ids, cut = ids[:room], cut + 1
            encoded.append(head + ids + tail)
        if not all(MASK_ID in e for e in encoded):
            raise GlmlabError("the pattern's [MASK] did not survive tokenization", "write [MASK] as it is")
        return encoded, cut


def check_backbone(model: LanguageModel) -> None:
    if model.traits.infilling not in ("mask_predict", "blank"):
        raise GlmlabError(f"a {model.traits.family} run cannot classify as a cloze: it does not fill a blank with text "
                          "on both sides", "use a bert or glm run, or drop --pattern/--verbalizer (a head)")


class ClozeClassifier(BackboneClassifier):
    """A backbone that fills blanks (``blank_logits``) read at its verbalizer words: class logits (B, labels).
    The trainer's protocol: ``loss(x, y)`` (weighted by ``class_weights``), ``nll(x, y)`` summed."""

    def __init__(self, backbone: LanguageModel, word_ids: list[int]) -> None:
        check_backbone(backbone)
        super().__init__(backbone, len(word_ids))
        self.register_buffer("word_ids", torch.tensor(word_ids), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.blank_logits(x)[:, self.word_ids]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).float(), y, weight=self.class_weights)
