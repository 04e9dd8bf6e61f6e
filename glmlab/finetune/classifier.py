"""A sequence classifier on a pre-trained generative model: the backbone's hidden states, pooled (the last
real token, or the mean over real tokens), then dropout and a linear head."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.errors import GlmlabError

POOLINGS = ("last", "mean")
MODES = ("full", "probe", "lora")


def check_backbone(model: nn.Module, family: str) -> None:
    """Refuse a model that has no per-token features to classify from (e.g. a VAE, whose decoder needs z)."""
    if not callable(getattr(model, "features", None)) or getattr(model, "latent_dim", None):
        raise GlmlabError(f"a {family} run cannot be fine-tuned as a classifier: only models of running text "
                          "with per-token features can (gpt, lstm)",
                          "pass --init a gpt or lstm run, or --init none to train from scratch")


class SequenceClassifier(nn.Module):
    """``backbone`` (a family model with ``features(idx) -> (B, T, C)``) + pooling + linear head.

    Inputs are right-padded with ``pad_id``; the protocol is the trainer's: ``loss(x, y)`` with class ids
    ``y`` (weighted by ``class_weights`` if given), ``nll(x, y)`` summed and unweighted.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: str, pad_id: int, width: int,
                 dropout: float = 0.1, frozen: bool = False) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise GlmlabError(f"unknown pooling {pooling!r}", f"use one of: {', '.join(POOLINGS)}")
        self.backbone, self.pooling, self.pad_id, self.frozen = backbone, pooling, pad_id, frozen
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("class_weights", torch.ones(n_classes), persistent=False)
        if frozen:
            self.backbone.requires_grad_(False)

    @property
    def block_size(self) -> int:
        return self.backbone.block_size

    def train(self, mode: bool = True) -> SequenceClassifier:
        super().train(mode)
        if self.frozen:  # a frozen backbone is a fixed feature extractor: no dropout in it
            self.backbone.eval()
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """One vector (B, C) per right-padded row of token ids."""
        real = x != self.pad_id
        with torch.no_grad() if self.frozen else nullcontext():
            h = self.backbone.features(x)
        if self.pooling == "last":
            last = real.sum(1).clamp(min=1) - 1
            return h[torch.arange(x.size(0), device=x.device), last]
        mask = real.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        return self.head(self.drop(self.pooled(x)))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).float(), y, weight=self.class_weights)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).float(), y, reduction="sum")


def feature_width(backbone: nn.Module) -> int:
    """The size of the backbone's feature vectors (n_embd for gpt, n_hidden for lstm)."""
    config = backbone.config
    return int(getattr(config, "n_hidden", None) or config.n_embd)
