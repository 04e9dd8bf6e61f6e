"""Fill-in-the-middle training data (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle"): training windows whose documents are rearranged so that a left-to-right model learns to infill.

Context-level FIM, as the paper trains: a window (its ``block_size + 1`` tokens) is split into documents at
``<eos>``; each document, with probability ``train.fim_rate``, is cut at two uniformly random token positions
into prefix / middle / suffix and rearranged as

* PSM: ``<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <eos>``, or, with probability
  ``train.fim_spm_rate``,
* SPM (the paper's variant): ``<|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle <eos>``,

the ``<eos>`` being the document's own (absent for a document the window cuts off). The pieces are joined and
cut back to the window's length, and the loss covers every position. At inference :func:`fim_prompt` builds
the prompt and the model generates the middle until ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from glmlab.data.dataset import RandomWindows
from glmlab.data.tokenizer import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID
from glmlab.errors import GlmlabError

ORDERS = ("psm", "spm")
FIM_ROLES = ("fim_prefix", "fim_middle", "fim_suffix")  # the tokenizer roles FIM needs, at glmlab's ids
_PRE, _MID, _SUF, _EOS = (np.array([i], dtype=np.int64) for i in (FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID,
                                                                  EOS_ID))
_PRE_SUF = np.array([FIM_PREFIX_ID, FIM_SUFFIX_ID], dtype=np.int64)
_STREAM = 0x46494D  # "FIM": keeps the FIM draws apart from the window draws made from the same train.seed


def fim_transform(tokens: Sequence[int] | np.ndarray | torch.Tensor, fim_rate: float, spm_rate: float,
                  generator: torch.Generator) -> np.ndarray:
    """One training sequence (a window's T+1 tokens) with each of its documents rearranged for FIM with
    probability ``fim_rate`` (SPM order with probability ``spm_rate``, else PSM), cut back to its length.

    Draws four uniform numbers per document from ``generator`` (whether to rearrange, the order, the two
    cuts), whatever is rearranged, so the draws depend only on the document count. An empty document (an
    ``<eos>`` right after another) has nothing to infill and stays as it is."""
    seq = np.asarray(tokens, dtype=np.int64)
    n = len(seq)
    ends = (np.flatnonzero(seq == EOS_ID) + 1).tolist()  # each document keeps the <eos> that ends it
    if not ends or ends[-1] != n:
        ends.append(n)  # the last document, cut off by the window
    draws = torch.rand((len(ends), 4), generator=generator, dtype=torch.float64).tolist()
    pieces: list[np.ndarray] = []
    start = length = 0
    for stop, (u_fim, u_spm, u_a, u_b) in zip(ends, draws, strict=True):
        if length >= n:
            break
        has_eos = bool(seq[stop - 1] == EOS_ID)
        end = stop - 1 if has_eos else stop  # the document's text, without its <eos>
        size = end - start
        if u_fim >= fim_rate or size == 0:
            pieces.append(seq[start:stop])
            length += stop - start
        else:
            i, j = sorted((int(u_a * (size + 1)), int(u_b * (size + 1))))  # cuts in 0..size, inclusive
            prefix, middle, suffix = seq[start:start + i], seq[start + i:start + j], seq[start + j:end]
            if u_spm < spm_rate:
                pieces += [_PRE_SUF, suffix, _MID, prefix, middle]
            else:
                pieces += [_PRE, prefix, _SUF, suffix, _MID, middle]
            if has_eos:
                pieces.append(_EOS)
            length += stop - start + 3
        start = stop
    return np.concatenate(pieces)[:n] if pieces else seq.copy()


def fim_prompt(prefix_ids: list[int], suffix_ids: list[int], order: str = "psm") -> list[int]:
    """What a FIM-trained model reads to generate the middle between ``prefix_ids`` and ``suffix_ids`` (it
    then generates the middle until ``<eos>``): PSM ``<|fim_prefix|> prefix <|fim_suffix|> suffix
    <|fim_middle|>``, SPM ``<|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix``."""
    if order == "psm":
        return [FIM_PREFIX_ID, *prefix_ids, FIM_SUFFIX_ID, *suffix_ids, FIM_MIDDLE_ID]
    if order == "spm":
        return [FIM_PREFIX_ID, FIM_SUFFIX_ID, *suffix_ids, FIM_MIDDLE_ID, *prefix_ids]
    raise GlmlabError(f"fill-in-the-middle order {order!r} is not one glmlab trains", "use psm or spm")


class FimWindows:
    """:class:`RandomWindows` whose rows are rearranged by :func:`fim_transform`: a training sampler
    (``next_batch``, ``last_tokens``, ``state_dict``) that a resumed run continues bit for bit.

    Each row of the global batch (``batch_size * world_size`` rows, as the windows draw them) gets its own
    seed, drawn from one generator seeded from ``seed`` (``train.seed``); a process transforms its own slice
    of the rows, so its rows differ from every other process's and N processes train on exactly what one
    process with N times the batch does. The generator's state is saved beside the windows' own.
    """

    def __init__(self, windows: RandomWindows, fim_rate: float, spm_rate: float, seed: int) -> None:
        self.windows = windows
        self.fim_rate, self.spm_rate = fim_rate, spm_rate
        self.generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, _STREAM])
                                                           .generate_state(1, np.uint64)[0]))
        self._row = torch.Generator()  # reseeded for every row

    @property
    def last_tokens(self) -> int:
        return self.windows.last_tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.windows.next_batch()
        w = self.windows
        seeds = torch.randint(2**63 - 1, (w.batch_size * w.world_size,), generator=self.generator)
        seeds = seeds[w.rank * w.batch_size:(w.rank + 1) * w.batch_size].tolist()
        rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
        out = np.stack([fim_transform(row, self.fim_rate, self.spm_rate, self._row.manual_seed(s))
                        for row, s in zip(rows, seeds, strict=True)])
        batch = torch.from_numpy(out)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """The windows' state (the keys :class:`RandomWindows` reads) plus the FIM generator's."""
        return {**self.windows.state_dict(), "fim_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; one saved without FIM (a run that turns train.fim_rate on when resumed)
        restores the windows and starts the FIM draws afresh."""
        self.windows.load_state_dict(state)
        if "fim_generator" in state:
            self.generator.set_state(state["fim_generator"])
