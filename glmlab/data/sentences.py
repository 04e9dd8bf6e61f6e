"""Sentence-mode data: one example per ``<eos>``-terminated segment of a token stream.

``glmlab prepare --sentences`` writes one line per document, so each sentence of the data directory
ends with ``<eos>``. A batch is ``x = <bos> w1 .. wn`` and ``y = w1 .. wn <eos>``, right-padded
(``<pad>`` in x, IGNORE_INDEX in y: padding never counts). Training batches are length-bucketed:
each epoch shuffles the sentences, sorts pools of 50 batches by length and cuts them into batches,
whose order is shuffled too, so a batch wastes little on padding yet the data order stays random.
The last pool's remainder (fewer sentences than a batch) is left out of the epoch, chosen at random.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.errors import DataError

POOL_BATCHES = 50


@dataclass
class Sentences:
    """Start offsets and lengths (words + ``<eos>``) of every sentence of a token stream, cut to ``max_len``."""

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    truncated: int  # sentences longer than max_len (cut)

    def __len__(self) -> int:
        return len(self.starts)


def find_sentences(tokens: np.ndarray, eos_id: int, max_len: int) -> Sentences:
    """Sentences of ``tokens`` (each ends at an ``<eos>``; a trailing piece without one counts too).
    ``max_len`` counts the ``<bos>`` the model reads first, so a sentence keeps max_len - 1 targets."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    if len(tokens) and (len(ends) == 0 or ends[-1] != len(tokens) - 1):
        ends = np.append(ends, len(tokens) - 1)
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, dtype=np.int64)
    lengths = ends - starts + 1
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    limit = max_len - 1
    truncated = int((lengths > limit).sum())
    return Sentences(tokens, starts.astype(np.int64), np.minimum(lengths, limit).astype(np.int64), truncated)


def collate(sentences: Sentences, index: np.ndarray, bos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for the sentences at ``index``: x = <bos> + words, y = words + <eos>, right-padded."""
    lengths = sentences.lengths[index]
    width = int(lengths.max())
    x = np.full((len(index), width), pad_id, dtype=np.int64)
    y = np.full((len(index), width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(index):
        start, n = sentences.starts[i], sentences.lengths[i]
        seq = np.asarray(sentences.tokens[start:start + n], dtype=np.int64)
        y[row, :n] = seq
        x[row, 0] = bos_id
        x[row, 1:n] = seq[:-1]
    return torch.from_numpy(x), torch.from_numpy(y)


class SentenceBatches:
    """Length-bucketed random batches of whole sentences, reproducible from a seed and resumable.

    Like :class:`~glmlab.data.dataset.RandomWindows`, every process of a distributed run draws the
    same global batch and keeps its slice. ``last_tokens`` is the number of targets in the latest batch.
    """

    def __init__(self, sentences: Sentences, batch_size: int, seed: int, bos_id: int, pad_id: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(sentences) == 0:
            raise DataError("the training split holds no sentences", "prepare the data with glmlab prepare --sentences")
        self.sentences, self.batch_size = sentences, batch_size
        self.bos_id, self.pad_id = bos_id, pad_id
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_state = self.generator.get_state()
        self.position = 0
        self.epoch = 0
        self.last_tokens = 0
        self._batches = self._plan()

    def _plan(self) -> list[np.ndarray]:
        """This epoch's batches (global batch size), drawn from the generator state at the epoch's start."""
        self.generator.set_state(self.epoch_state)
        n, size = len(self.sentences), self.batch_size * self.world_size
        order = torch.randperm(n, generator=self.generator).numpy()
        batches: list[np.ndarray] = []
        pool = size * POOL_BATCHES
        for begin in range(0, n, pool):
            chunk = order[begin:begin + pool]
            if n >= size:  # drop the partial batch's worth at random, before sorting (after, it would always
                chunk = chunk[: len(chunk) // size * size]  # be the pool's longest sentences)
            chunk = chunk[np.argsort(self.sentences.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + size] for i in range(0, len(chunk), size))
        if not batches:
            batches = [order]
        shuffle = torch.randperm(len(batches), generator=self.generator).numpy()
        return [batches[i] for i in shuffle]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.epoch_state = self.generator.get_state()
            self.position = 0
            self._batches = self._plan()
        batch = self._batches[self.position]
        self.position += 1
        mine = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if len(mine) == 0:
            mine = batch[:1]
        self.last_tokens = int(self.sentences.lengths[mine].sum())
        return self._collate(mine)

    def _collate(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(self.sentences, rows, self.bos_id, self.pad_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"epoch_generator": self.epoch_state, "position": torch.tensor(self.position),
                "epoch": torch.tensor(self.epoch)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.epoch_state = state["epoch_generator"]
        self.position, self.epoch = int(state["position"]), int(state["epoch"])
        self._batches = self._plan()


def sentence_batches(sentences: Sentences, batch_size: int, bos_id: int, pad_id: int, limit: int | None = None,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sentence once (the first ``limit`` when given), in batches of similar length, deterministically."""
    count = len(sentences) if limit is None else min(limit, len(sentences))
    order = np.argsort(sentences.lengths[:count], kind="stable")
    for begin in range(0, count, batch_size):
        yield collate(sentences, order[begin:begin + batch_size], bos_id, pad_id)
