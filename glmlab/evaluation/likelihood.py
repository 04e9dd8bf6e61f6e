"""Likelihood metrics that compare across tokenizers: NLL per token, perplexity, bits per char and byte.

Perplexity depends on the tokenizer (a char model and a BPE model predict different units);
bits per character and per UTF-8 byte divide the same total NLL by a tokenizer-independent count,
so runs with different tokenizers sit in one table.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from glmlab.data.dataset import IGNORE_INDEX, eval_windows

PSEUDO_NOTE = "pseudo-log-likelihood: each token given all the others; not comparable with an NLL"


@dataclass
class LikelihoodReport:
    """What ``glmlab eval`` reports of windows. ``kind`` is "nll", or "pll" for a masked LM, whose ``nll`` field
    then holds the pseudo-NLL (Salazar et al., 2020) and ``perplexity`` the pseudo-perplexity."""

    nll: float  # mean negative log-likelihood per token, nats
    perplexity: float
    bits_per_char: float
    bits_per_byte: float
    tokens: int  # tokens scored
    characters: int
    bytes: int
    kind: str = "nll"

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def format(self) -> str:
        if self.kind == "pll":
            return (f"PLL {self.nll:.4f} nats/token | pseudo-ppl {self.perplexity:.3f} | "
                    f"{self.bits_per_char:.4f} pseudo-bits/char | {self.bits_per_byte:.4f} pseudo-bits/byte | "
                    f"{self.tokens:,} tokens, {self.characters:,} chars ({PSEUDO_NOTE})")
        return (f"nll {self.nll:.4f} nats/token | ppl {self.perplexity:.3f} | {self.bits_per_char:.4f} bits/char | "
                f"{self.bits_per_byte:.4f} bits/byte | {self.tokens:,} tokens, {self.characters:,} chars")


def likelihood_report(nll_sum: float, tokens: int, characters: int, num_bytes: int,
                      kind: str = "nll") -> LikelihoodReport:
    """Metrics from a summed NLL (nats) over ``tokens`` tokens that spell ``characters`` chars / ``num_bytes`` bytes
    (``kind="pll"``: a summed pseudo-NLL)."""
    mean = nll_sum / max(tokens, 1)
    bits = nll_sum / math.log(2)
    return LikelihoodReport(nll=mean, perplexity=math.exp(min(mean, 700.0)),
                            bits_per_char=bits / max(characters, 1), bits_per_byte=bits / max(num_bytes, 1),
                            tokens=tokens, characters=characters, bytes=num_bytes, kind=kind)


@torch.no_grad()
def sum_nll(model: nn.Module, tokens: np.ndarray, start_id: int, stride: int | None = None, batch_size: int = 16,
            device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
            shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """Summed NLL (nats) and count of every token in ``tokens``, scored in windows of the model's context.

    ``shard=(i, n)`` scores only every n-th batch starting at i, so n processes can share the work
    and add up their sums.
    """
    windows = eval_windows(tokens, model.block_size, stride, batch_size, start_id)
    return sum_nll_batches(model, windows, device, autocast, shard)


@torch.no_grad()
def sum_nll_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
                    shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """Summed NLL (nats; for a latent-variable model its ``nll`` bound) and count of the scored targets of
    (x, y) batches — windows, or sentences with ``<eos>`` included and padding excluded; ``shard`` as in
    :func:`sum_nll`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for index, (x, y) in enumerate(batches):
            if index % shard[1] != shard[0]:
                continue
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                total += float(model.nll(x, y))
            count += int((y != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total, count
