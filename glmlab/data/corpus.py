"""Read text corpora (.txt files, directories of .txt, .jsonl) into documents, and split them.

Text is decoded as strict UTF-8 (a bad byte is reported with its file and offset unless
``errors="replace"``), a BOM is dropped and CRLF / CR line ends become LF, so the same text gives
the same tokens on every platform.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from glmlab.errors import DataError

BINARY_SNIFF_BYTES = 8192
SPLIT_NAMES = ("train", "val", "test")
# Below this many documents a corpus is split inside each document (contiguous, at line breaks)
# rather than by assigning whole documents to splits.
MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT = 20


@dataclass
class Source:
    """One input file, recorded in meta.json so a data directory says where it came from."""

    path: str
    sha256: str
    bytes: int
    documents: int


@dataclass
class Corpus:
    documents: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    @property
    def characters(self) -> int:
        return sum(len(d) for d in self.documents)


def default_corpus_path() -> Path:
    """Tiny Shakespeare, shipped inside the package (public-domain text)."""
    return Path(str(resources.files("glmlab") / "resources" / "tinyshakespeare.txt"))


def decode_text(data: bytes, name: str, errors: str = "strict") -> str:
    """Bytes -> normalised text; binary data and invalid UTF-8 raise a DataError naming ``name``."""
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise DataError(f"{name} looks like a binary file (it contains NUL bytes), not text",
                        "give UTF-8 text files (.txt) or JSON lines (.jsonl)")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name} is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start}",
                        "convert the file to UTF-8, or pass --errors replace to substitute U+FFFD") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}", "check the path and its permissions") from None


def read_jsonl(path: Path, data: bytes, text_field: str, errors: str) -> list[str]:
    """Documents from a JSON-lines file: the ``text_field`` string of each non-empty line."""
    docs = []
    text = decode_text(data, str(path), errors)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg})",
                            "each line of a .jsonl file must be one JSON object") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}, line {lineno}: no field '{text_field}' (found: {keys})",
                            "name the text field with --text-field FIELD")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}, line {lineno}: field '{text_field}' is {type(value).__name__}, not a string")
        docs.append(value.replace("\r\n", "\n").replace("\r", "\n"))
    return docs


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Input paths -> files: directories expand to their .txt and .jsonl files, recursively, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
            if not found:
                raise DataError(f"directory {path} holds no .txt or .jsonl files",
                                "point to a directory of UTF-8 .txt files, or to the files themselves")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist", "check the path (or omit INPUT to use the "
                            "bundled Tiny Shakespeare)")
    return files


def read_corpus(inputs: list[str | Path], text_field: str = "text", errors: str = "strict",
                sentences: bool = False) -> Corpus:
    """Read every input into one corpus: a .txt file is one document, a .jsonl line is one document;
    with ``sentences``, every non-empty line (or JSONL text) is one document, stripped of surrounding space."""
    if errors not in ("strict", "replace"):
        raise DataError(f"--errors {errors!r} is not supported", "use --errors strict or --errors replace")
    corpus = Corpus()
    for path in expand_inputs(inputs):
        data = _read_bytes(path)
        if path.suffix.lower() == ".jsonl":
            docs = read_jsonl(path, data, text_field, errors)
        else:
            docs = [decode_text(data, str(path), errors)]
        if sentences:
            docs = [line.strip() for d in docs for line in d.splitlines()]
        docs = [d for d in docs if d.strip()]
        corpus.documents.extend(docs)
        corpus.sources.append(Source(str(path), _hash(data), len(data), len(docs)))
    if not corpus.documents:
        names = ", ".join(s.path for s in corpus.sources) or "the inputs"
        raise DataError(f"no text found in {names} (the input is empty or only whitespace)",
                        "give files that contain text")
    return corpus


def parse_split(spec: str) -> tuple[float, float, float]:
    """``"0.9,0.05,0.05"`` -> fractions for train, val, test (non-negative, summing to 1)."""
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 \
            or parts[0] <= 0:
        raise DataError(f"--split {spec!r} is not three fractions summing to 1 with train > 0",
                        "write e.g. --split 0.9,0.05,0.05")
    return parts  # type: ignore[return-value]


def _cut_at_line(text: str, position: int) -> int:
    """The first line start at or after ``position`` (or the end of the text)."""
    if position <= 0:
        return 0
    if position >= len(text):
        return len(text)
    newline = text.find("\n", position - 1)
    return len(text) if newline == -1 else newline + 1


def split_documents(documents: list[str], fractions: tuple[float, ...], names: tuple[str, ...],
                    seed: int) -> dict[str, list[str]]:
    """Deterministically divide documents among the named splits by character fractions.

    With many documents, whole documents are shuffled (seeded) and dealt out until each split
    holds its share of characters. With few (one book, say), each document is cut in contiguous
    pieces at line breaks, in order: the first share to the first split, and so on.
    """
    out: dict[str, list[str]] = {name: [] for name in names}
    total = sum(fractions)
    shares = [f / total for f in fractions]
    if len(documents) >= MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT:
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        chars = sum(len(d) for d in documents)
        bounds, acc = [], 0.0
        for share in shares:
            acc += share
            bounds.append(acc * chars)
        seen = 0
        split_index = 0
        for i in order:
            while split_index < len(names) - 1 and seen >= bounds[split_index]:
                split_index += 1
            out[names[split_index]].append(documents[i])
            seen += len(documents[i])
        return out
    for doc in documents:
        start, acc = 0, 0.0
        for name, share in zip(names, shares, strict=True):
            acc += share
            end = _cut_at_line(doc, round(acc * len(doc))) if name != names[-1] else len(doc)
            piece = doc[start:end]
            if piece.strip():
                out[name].append(piece)
            start = end
    return out
