"""A sequence classifier on a pre-trained generative model: the backbone's hidden states, pooled (the last
real token, or the mean over real tokens), then dropout and a linear head."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.errors import GlmlabError
from glmlab.models.contract import LanguageModel, TrainingHook

if TYPE_CHECKING:
    from glmlab.data.tokenizer import Tokenizer

POOLINGS = ("last", "mean")
MODES = ("full", "probe", "lora")


def check_backbone(model: LanguageModel) -> None:
    """Refuse a model that has no per-token features to classify from (``traits.feature_width`` 0: e.g. a VAE,
    whose decoder needs z)."""
    if not model.traits.feature_width:
        raise GlmlabError(f"a {model.traits.family} run cannot be fine-tuned as a classifier: only models of running "
                          "text with per-token features can (gpt, lstm, bert, glm)",
                          "pass --init a gpt, lstm, bert or glm run, or --init none to train from scratch")


class BackboneClassifier(nn.Module):
    """What every classifier on a backbone shares with the trainer's protocol: the backbone's context and step,
    no hooks, ``nll(x, y)`` — the summed cross-entropy of the class logits ``forward(x)`` gives — and
    ``class_weights`` for ``loss``."""

    def __init__(self, backbone: LanguageModel, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stats: dict[str, torch.Tensor] = {}
        self.register_buffer("class_weights", torch.ones(n_classes), persistent=False)

    @property
    def block_size(self) -> int:
        return self.backbone.block_size

    def set_step(self, step: int) -> None:
        self.backbone.set_step(step)

    def training_hooks(self) -> list[TrainingHook]:
        return []

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).float(), y, reduction="sum")


def padding_of(tokenizer: Tokenizer) -> tuple[int, bool]:
    """The id classification rows are right-padded with, and whether it is also the end-of-text token every
    encoded text ends with (a tokenizer without a pad token, GPT-2's: rows are padded with ``<|endoftext|>``)."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id, False
    return tokenizer.eos_id, True


class SequenceClassifier(BackboneClassifier):
    """``backbone`` (a family model with features: ``features(idx) -> (B, T, traits.feature_width)``) + pooling +
    linear head.

    Inputs are right-padded with ``pad_id``; ``pad_ends_texts``: the pad id is also the token each text ends with
    (see :func:`padding_of`), so a row's last real token is the first of its trailing run of pad ids. The protocol
    is the trainer's: ``loss(x, y)`` with class ids ``y`` (weighted by ``class_weights`` if given),
    ``nll(x, y)`` summed and unweighted.
    """

    def __init__(self, backbone: LanguageModel, n_classes: int, pooling: str, pad_id: int, dropout: float = 0.1,
                 frozen: bool = False, lm_weight: float = 0.0, pad_ends_texts: bool = False) -> None:
        if pooling not in POOLINGS:
            raise GlmlabError(f"unknown pooling {pooling!r}", f"use one of: {', '.join(POOLINGS)}")
        check_backbone(backbone)
        if lm_weight > 0 and not backbone.traits.left_to_right:
            raise GlmlabError(f"--lm-weight adds a left-to-right language-modelling loss, which a "
                              f"{backbone.traits.family} model does not have", "drop --lm-weight")
        super().__init__(backbone, n_classes)
        self.pooling, self.pad_id, self.frozen, self.lm_weight = pooling, pad_id, frozen, lm_weight
        self.pad_ends_texts = pad_ends_texts
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.traits.feature_width, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> SequenceClassifier:
        super().train(mode)
        if self.frozen:  # a frozen backbone is a fixed feature extractor: no dropout in it
            self.backbone.eval()
        return self

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.frozen else nullcontext():
            return self.backbone.features(x)

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) True at each row's real tokens (a prefix: rows are right-padded)."""
        positions = torch.arange(x.size(1), device=x.device)
        length = torch.where(x != self.pad_id, positions, -1).amax(1) + 1  # one past the last non-pad id
        if self.pad_ends_texts:  # ... which is the text's own end token, padded with its like
            length = (length + 1).clamp(max=x.size(1))
        return positions[None, :] < length[:, None]

    def pooled(self, x: torch.Tensor, h: torch.Tensor | None = None, real: torch.Tensor | None = None
               ) -> torch.Tensor:
        """One vector (B, C) per right-padded row of token ids (``h``: their hidden states, ``real``: their
        :meth:`real_tokens`, if computed)."""
        real = self.real_tokens(x) if real is None else real
        h = self.hidden(x) if h is None else h
        if self.pooling == "last":
            last = real.sum(1).clamp(min=1) - 1
            return h[torch.arange(x.size(0), device=x.device), last]
        mask = real.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        return self.head(self.drop(self.pooled(x)))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the classes, plus ``lm_weight`` x the language-modelling loss of the texts
        (GPT-1's auxiliary objective, which keeps the features a language model's)."""
        h, real = self.hidden(x), self.real_tokens(x)
        loss = F.cross_entropy(self.head(self.drop(self.pooled(x, h, real))).float(), y, weight=self.class_weights)
        if self.lm_weight > 0:
            logits = self.backbone.features_to_logits(h)
            targets = x[:, 1:].masked_fill(~real[:, 1:], -100)
            loss = loss + self.lm_weight * F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                           targets.reshape(-1), ignore_index=-100)
        return loss
