"""Drawing tokens from next-token distributions by inverting each row's CDF with one uniform number.

One batched softmax, cumulative sum and search for every row of a batch, instead of one
``torch.multinomial`` call per row: exact, and on a CPU far cheaper both for a server's batch of rows
with their own generators (each row supplies its own uniform numbers, so its tokens do not depend on
what else is in the batch) and for thousands of rows of a large vocabulary.
"""

from __future__ import annotations

import torch


def inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) drawn from softmax(logits) (B, V), row i by the uniform number u[i] in [0, 1)."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    # a point in (0, total]: the first CDF entry >= it never has probability 0 (0 would pick index 0)
    # (1 - u in u's own precision: a float64 u just below 1 would round to 1 in float32)
    point = ((1 - u).to(cdf.device, cdf.dtype).view(-1, 1) * cdf[:, -1:]).clamp_min(torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, point)[:, 0].clamp_max(cdf.size(-1) - 1)


def sample_rows(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V), the uniform numbers drawn from ``generator``."""
    return inverse_cdf(logits, torch.rand((logits.size(0),), generator=generator, device=logits.device))


class UniformStream:
    """A generator's uniform numbers in [0, 1), handed out one at a time and drawn in blocks (one
    PyTorch call per ``block`` numbers); the sequence depends only on the generator's seed."""

    __slots__ = ("generator", "block", "_buffer", "_next")

    def __init__(self, generator: torch.Generator, block: int = 256) -> None:
        self.generator, self.block = generator, block
        self._buffer: list[float] = []
        self._next = 0

    def next(self) -> float:
        if self._next == len(self._buffer):
            self._buffer = torch.rand((self.block,), generator=self.generator, dtype=torch.float64,
                                      device=self.generator.device).tolist()
            self._next = 0
        self._next += 1
        return self._buffer[self._next - 1]
