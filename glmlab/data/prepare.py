"""`glmlab prepare`: text -> corpus -> splits -> tokenizer -> token files + meta.json in a data directory.

A data directory holds ``tokenizer.json``, ``{train,val,test}.bin`` (token ids, ``np.memmap``-able,
uint16 below 65,536 ids, else uint32; each document followed by ``<eos>``) and ``meta.json``
(counts per split, vocab size, dtype, source file hashes, and the options that made it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glmlab import atomic
from glmlab.data.corpus import SPLIT_NAMES, Corpus, default_corpus_path, parse_split, read_corpus, split_documents
from glmlab.data.tokenizer import CHAT_TOKENS, Tokenizer, iter_lines, train_tokenizer
from glmlab.errors import DataError

META_VERSION = 1


@dataclass
class ExistingTokenizer:
    """A tokenizer that was not trained on the corpus (``glmlab prepare --tokenizer-from``) and where it is from."""

    tokenizer: Tokenizer
    source: str


@dataclass
class SplitStats:
    documents: int
    characters: int
    bytes: int
    tokens: int
    unk_tokens: int

    @property
    def unk_rate(self) -> float:
        return self.unk_tokens / self.tokens if self.tokens else 0.0


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


BATCH_CHARS = 1 << 20  # characters encoded at once: the tokenizer's per-token records of one batch stay small


def encoded_batches(tokenizer: Tokenizer, documents: Iterable[str]) -> Iterator[np.ndarray]:
    """The documents' ids, each document followed by ``<eos>``, in arrays of about :data:`BATCH_CHARS`
    characters' worth: memory stays bounded whatever the corpus's size or its lines' lengths (a whole 20 MB line
    encoded at once held 7.6 GB of the tokenizer's per-token records)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    chunks: list[str] = []
    ends: list[bool] = []  # whether each chunk ends its document
    size = 0

    def flush() -> np.ndarray:
        parts: list[np.ndarray] = []
        for ids, last in zip(tokenizer.encode_batch(chunks), ends, strict=True):
            parts.append(np.asarray(ids, dtype=dtype))
            if last:
                parts.append(eos)
        chunks.clear()
        ends.clear()
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    for doc in documents:
        pieces = list(iter_lines([doc])) or [""]
        for i, piece in enumerate(pieces):
            chunks.append(piece)
            ends.append(i == len(pieces) - 1)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield flush()
                size = 0
    if chunks:
        yield flush()


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    """All documents as one id stream, each document followed by ``<eos>``."""
    batches = list(encoded_batches(tokenizer, documents))
    return np.concatenate(batches) if batches else np.zeros(0, dtype=token_dtype(tokenizer.vocab_size))


def write_tokens(path: Path, batches: Iterable[np.ndarray]) -> None:
    """Write the ids of ``batches`` as one raw little-endian array that ``np.memmap(path, dtype)`` reads back,
    a batch at a time (atomically: a failure leaves no partial file)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for ids in batches:
                ids.astype(ids.dtype.newbyteorder("<"), copy=False).tofile(f)

    atomic.write_with(path, write)


def counted(batches: Iterable[np.ndarray], unk_id: int | None, into: dict[str, int]) -> Iterator[np.ndarray]:
    """``batches`` passed through, their tokens and ``unk_id``s added to ``into`` on the way."""
    for ids in batches:
        into["tokens"] += int(ids.size)
        into["unk"] += int((ids == unk_id).sum()) if unk_id is not None else 0
        yield ids


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: str = "char", vocab_size: int | None = None,
            split: str = "0.9,0.05,0.05", seed: int = 1337, text_field: str = "text", errors: str = "strict",
            val_file: str | Path | None = None, test_file: str | Path | None = None,
            sentences: bool = False, existing: ExistingTokenizer | None = None, chat: bool = False) -> dict[str, Any]:
    """Build a data directory at ``out``; returns the meta dict that is also saved as meta.json.
    With ``sentences``, each line is one example (document), ended by ``<eos>``. With ``existing``, the corpus
    is encoded with that tokenizer (a run's, a Hugging Face model's) instead of a new one trained on it."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory", "choose another --out")
    if (out / "config.json").is_file():  # its tokenizer.json would be replaced under its weights
        raise DataError(f"--out {out} holds a run (config.json), not a data directory",
                        "choose another --out for the data")
    fractions = dict(zip(SPLIT_NAMES, parse_split(split), strict=True))
    sources = list(inputs) or [default_corpus_path()]
    corpus = read_corpus(sources, text_field, errors, sentences)
    explicit = {"val": val_file, "test": test_file}
    carved = tuple(name for name in SPLIT_NAMES if not explicit.get(name))
    splits = split_documents(corpus.documents, tuple(fractions[n] for n in carved), carved, seed)
    all_sources = list(corpus.sources)
    for name, path in explicit.items():
        if path:
            extra: Corpus = read_corpus([path], text_field, errors, sentences)
            splits[name] = extra.documents
            all_sources.extend(extra.sources)
    if not splits["train"]:
        raise DataError("the training split is empty", "give more text, or a larger train fraction in --split")
    if not splits["val"]:
        raise DataError("the validation split is empty (training needs one to evaluate)",
                        "give more text, a larger val fraction in --split, or --val FILE")

    if existing is not None:
        tok = existing.tokenizer
        if tok.eos_id is None:
            raise DataError(f"the tokenizer of {existing.source} has no end-of-text token to end documents with",
                            "give a tokenizer whose eos token is named (tokenizer_config.json's eos_token)")
    else:
        tok = train_tokenizer(tokenizer, splits["train"], vocab_size)
    if chat:  # the chat template's role tokens, so a model trained on this data can be fine-tuned to chat
        tok = tok.with_special_tokens(CHAT_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    stats: dict[str, SplitStats] = {}
    for name in SPLIT_NAMES:
        docs = splits.get(name, [])
        count = {"tokens": 0, "unk": 0}
        write_tokens(out / f"{name}.bin", counted(encoded_batches(tok, docs), tok.unk_id, count))
        stats[name] = SplitStats(documents=len(docs), characters=sum(len(d) for d in docs),
                                 bytes=sum(len(d.encode("utf-8")) for d in docs), tokens=count["tokens"],
                                 unk_tokens=count["unk"])
    tok.save(out / "tokenizer.json")
    meta = {
        "version": META_VERSION,
        "tokenizer": tok.kind if existing is not None else tokenizer,
        **({"tokenizer_from": str(Path(existing.source).resolve())} if existing is not None else {}),
        **({"special_token_roles": tok.special_tokens} if not tok.default_roles else {}),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "special_tokens": {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id},
        "documents_end_with": "<eos>",
        "unit": "sentence" if sentences else "document",
        "splits": {name: dataclasses.asdict(s) for name, s in stats.items()},
        "sources": [dataclasses.asdict(s) for s in all_sources],
        "options": {"split": split, "seed": seed, "text_field": text_field, "errors": errors,
                    "vocab_size": vocab_size, "sentences": sentences, "chat": chat,
                    "val_file": str(val_file) if val_file else None,
                    "test_file": str(test_file) if test_file else None},
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic.write_json(out / "meta.json", meta)
    return meta


def format_summary(meta: dict[str, Any], out: str | Path) -> str:
    """The table `glmlab prepare` prints."""
    lines = [f"prepared {out}  ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']:,}, "
             f"{meta['dtype']}, {len(meta['sources'])} source file(s), {meta['seconds']:.1f}s)",
             f"  {'split':<6} {'documents':>10} {'characters':>12} {'tokens':>12} {'chars/token':>11} {'unk rate':>9}"]
    for name, s in meta["splits"].items():
        per = s["characters"] / s["tokens"] if s["tokens"] else 0.0
        unk = s["unk_tokens"] / s["tokens"] if s["tokens"] else 0.0
        lines.append(f"  {name:<6} {s['documents']:>10,} {s['characters']:>12,} {s['tokens']:>12,} {per:>11.2f} "
                     f"{unk:>9.3%}")
    return "\n".join(lines)
