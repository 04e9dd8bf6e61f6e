"""Token datasets: a prepared data directory opened as memmaps, random training windows, eval windows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmlab.data.prepare import META_VERSION
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError

IGNORE_INDEX = -100


@dataclass
class DataDir:
    """A prepared data directory: its meta.json, its tokenizer and its token splits as memmaps."""

    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    checked: set[str] = field(default_factory=set)  # splits whose ids were found within the vocabulary

    def tokens(self, split: str) -> np.ndarray:
        """A split's ids as a memmap, checked once: its file's size against meta.json's count, and every id
        against the vocabulary (a vectorised max: a file holding ids past it crashed training mid-run, or went
        unnoticed)."""
        if split not in self.meta["splits"]:
            raise DataError(f"data directory {self.path} has no split '{split}'",
                            f"use one of: {', '.join(self.meta['splits'])}")
        count = self.meta["splits"][split]["tokens"]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        file = self.path / f"{split}.bin"
        expected = count * np.dtype(self.meta["dtype"]).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise DataError(f"{file} is missing or truncated (expected {expected:,} bytes)",
                            "re-run glmlab prepare for this data directory")
        ids = np.memmap(file, dtype=self.meta["dtype"], mode="r")
        if split not in self.checked:
            top = int(ids.max())
            if top >= self.tokenizer.vocab_size:
                raise DataError(f"{file} holds token id {top}, outside the vocabulary of {self.tokenizer.vocab_size} "
                                f"ids (tokenizer.json): it was not written with this tokenizer, or is damaged",
                                "re-run glmlab prepare for this data directory")
            self.checked.add(split)
        return ids

    def split_stats(self, split: str) -> dict[str, int]:
        return self.meta["splits"][split]


def open_data_dir(path: str | Path) -> DataDir:
    """Open a data directory written by ``glmlab prepare``, with clear errors if it is not one."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist", f"create it with: glmlab prepare INPUT --out {path}")
    if not meta_file.is_file():
        raise DataError(f"{path} is not a prepared data directory (no meta.json)",
                        f"create it with: glmlab prepare INPUT --out {path}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{meta_file} is corrupted", "re-run glmlab prepare") from None
    problem = meta_problem(meta)
    if problem is not None:
        raise DataError(f"{meta_file} is not what glmlab prepare writes: {problem}", "re-run glmlab prepare")
    if meta.get("version") != META_VERSION:
        raise DataError(f"{path} was prepared by another glmlab version (format {meta.get('version')})",
                        "re-run glmlab prepare")
    tokenizer = Tokenizer.from_file(path / "tokenizer.json", meta.get("special_token_roles"))
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"{meta_file} says the vocabulary has {meta['vocab_size']} ids, its tokenizer.json has "
                        f"{tokenizer.vocab_size}: they are not from the same prepare", "re-run glmlab prepare")
    return DataDir(path, meta, tokenizer)


def meta_problem(meta: Any) -> str | None:
    """What is wrong with the shape of a meta.json's content (None: nothing)."""
    if not isinstance(meta, dict):
        return f"a {type(meta).__name__}, not an object"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits or not all(
            isinstance(s, dict) and isinstance(s.get("tokens"), int) and s["tokens"] >= 0 for s in splits.values()):
        return "its 'splits' are not {name: {\"tokens\": count, ...}}"
    vocab = meta.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        return f"vocab_size {vocab!r} is not a positive integer"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {meta.get('dtype')!r} is not uint16 or uint32"
    if meta["dtype"] == "uint16" and vocab > 65536:
        return f"dtype uint16 cannot hold the ids of a {vocab}-token vocabulary"
    return None


class RandomWindows:
    """Random (x, y) windows of ``block_size`` tokens from a token stream, reproducible from a seed.

    The sampler's position in the data is its generator state, saved with every checkpoint. In a
    distributed run every process draws the same global batch (``batch_size * world_size`` windows)
    and keeps its own slice, so N processes read exactly what one process with N times the batch reads.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"model.block_size={block_size} needs at least {block_size + 1} tokens per split, "
                            f"but the training split has {len(tokens):,}",
                            "lower model.block_size or prepare more text")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._span = np.arange(block_size + 1)
        self.rank, self.world_size = rank, world_size
        self.last_tokens = batch_size * block_size  # targets per batch, this process's share

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size * self.world_size,),
                               generator=self.generator)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = torch.from_numpy(self.tokens[starts.numpy()[:, None] + self._span].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(tokens: np.ndarray, block_size: int, stride: int | None, batch_size: int,
                 start_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (x, y) that score every token of ``tokens`` exactly once.

    The stream is prefixed with ``start_id`` (``<eos>``, the document separator) so the first token
    is scored too. Windows advance by ``stride`` (default: ``block_size``, no overlap); with a
    smaller stride each window re-reads ``block_size - stride`` tokens of context and scores only
    the new ones. Unscored and padded targets are ``IGNORE_INDEX``.
    """
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise DataError(f"--stride {stride} must be between 1 and the block size {block_size}")
    stream = np.concatenate([np.array([start_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])
    n_targets = len(stream) - 1
    xs, ys = [], []
    scored_until = 0  # targets [0, scored_until) are done
    begin = 0
    while scored_until < n_targets:
        end = min(begin + block_size, n_targets)
        x = np.zeros(block_size, dtype=np.int64)
        y = np.full(block_size, IGNORE_INDEX, dtype=np.int64)
        x[: end - begin] = stream[begin:end]
        y[: end - begin] = stream[begin + 1:end + 1]
        y[: scored_until - begin] = IGNORE_INDEX
        xs.append(x)
        ys.append(y)
        scored_until = end
        begin = max(end - block_size + stride, begin + stride) if end < n_targets else end
        if len(xs) == batch_size:
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            xs, ys = [], []
    if xs:
        yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
