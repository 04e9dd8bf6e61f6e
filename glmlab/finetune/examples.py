"""Fine-tuning data: labelled texts (TSV / CSV / JSONL) and prompt/completion pairs (JSONL), encoded with
truncation to the model's context, batched by length and resumably (the trainer's sampler protocol)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.sentences import SentenceBatches
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError

TEXT_COLUMNS = ("text", "sentence")  # the default text column: the first of these a file has
FORMATS = (".tsv", ".csv", ".jsonl")


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The columns and the (line number, row) pairs of a .tsv, .csv or .jsonl file."""
    if not path.is_file():
        raise DataError(f"{path} does not exist" if not path.exists() else f"{path} is not a file",
                        "check the path")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path} is not a .tsv, .csv or .jsonl file", "convert it to one of those formats")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})",
                        "convert the file to UTF-8") from None
    if suffix == ".jsonl":
        rows, columns = [], {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not JSON ({exc.msg})",
                                "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object",
                                "write one JSON object per line, e.g. {\"text\": ..., \"label\": ...}")
            columns.update(dict.fromkeys(row))
            rows.append((number, row))
        return list(columns), rows
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
    try:
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    except csv.Error as exc:
        raise DataError(f"{path}: malformed {suffix[1:].upper()} ({exc})", "check the file's quoting") from None
    return [c for c in (reader.fieldnames or []) if c is not None], rows


def _label_text(value: Any) -> str:
    """Labels as strings: 1, 1.0 and "1" are one label; text labels are stripped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def sort_labels(labels: set[str] | list[str]) -> list[str]:
    """The label set in a stable order: numerically when every label is an integer, else alphabetically."""
    labels = set(labels)
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


@dataclass
class LabelledTexts:
    """Texts and their labels (as strings) read from one file; ``skipped`` rows had an empty text."""

    path: Path
    texts: list[str]
    labels: list[str] | None
    skipped: int = 0


def read_labelled(path: str | Path, text_column: str | None = None, label_column: str = "label",
                  labels_required: bool = True) -> LabelledTexts:
    """Read texts and labels; the text column defaults to ``text``, else ``sentence``."""
    path = Path(path)
    columns, rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows", "give a file with a header and at least one example")
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise DataError(f"{path} has no text column (looked for {' or '.join(TEXT_COLUMNS)}; it has: "
                            f"{', '.join(columns) or 'none'})", "name the column with --text-column")
    elif text_column not in columns:
        raise DataError(f"{path} has no column {text_column!r} (it has: {', '.join(columns) or 'none'})",
                        "name the text column with --text-column")
    has_labels = label_column in columns
    if labels_required and not has_labels:
        raise DataError(f"{path} has no label column {label_column!r} (it has: {', '.join(columns) or 'none'})",
                        "name the label column with --label-column")
    texts: list[str] = []
    labels: list[str] = []
    skipped = 0
    for number, row in rows:
        text = row.get(text_column)
        text = "" if text is None else str(text).strip()
        if not text:
            skipped += 1
            continue
        if has_labels:
            label = row.get(label_column)
            if label is None or _label_text(label) == "":
                raise DataError(f"{path}, line {number}: the label is missing",
                                f"give every row a value in column {label_column!r}")
            labels.append(_label_text(label))
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: every text in column {text_column!r} is empty", "check --text-column")
    return LabelledTexts(path, texts, labels if has_labels else None, skipped)


@dataclass
class Pair:
    prompt: str
    completion: str


def read_jsonl_objects(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The (line number, object) pairs of a JSONL file of supervised fine-tuning data."""
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path} is not a .jsonl file", 'write one {"prompt": ..., "completion": ...} or '
                        '{"messages": [...]} object per line')
    return _read_rows(path)[1]


def read_pairs(path: str | Path, prompt_key: str = "prompt", completion_key: str = "completion") -> list[Pair]:
    """Prompt/completion pairs from a JSONL file (one object per line)."""
    path = Path(path)
    rows = read_jsonl_objects(path)
    pairs = []
    for number, row in rows:
        missing = [k for k in (prompt_key, completion_key) if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}, line {number}: no string field {missing[0]!r} (fields: {', '.join(row)})",
                            'write one {"prompt": ..., "completion": ...} object per line')
        if not row[completion_key].strip():
            raise DataError(f"{path}, line {number}: the completion is empty", "give every pair a completion")
        pairs.append(Pair(row[prompt_key], row[completion_key]))
    if not pairs:
        raise DataError(f"{path} holds no pairs", 'write one {"prompt": ..., "completion": ...} per line')
    return pairs


@dataclass
class Examples:
    """Encoded examples: token ids per example and either a class per example or per-token targets."""

    inputs: list[list[int]]
    labels: list[int] | None = None
    targets: list[list[int]] | None = None
    truncated: int = 0
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(x) for x in self.inputs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.inputs)

    def collate(self, rows: np.ndarray | list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded inputs (B, T) and labels (B,) or targets (B, T) padded with IGNORE_INDEX."""
        width = int(max(self.lengths[i] for i in rows))
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : self.lengths[i]] = torch.tensor(self.inputs[i])
        if self.labels is not None:
            return x, torch.tensor([self.labels[i] for i in rows], dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(rows):
            y[r, : self.lengths[i]] = torch.tensor(self.targets[i])
        return x, y

    def batches(self, batch_size: int, pad_id: int):
        """Every example once, in length order (fast evaluation); yields (row indices, x, y)."""
        return length_ordered(self, batch_size, pad_id)


def length_ordered(examples: Any, batch_size: int, pad_id: int):
    """Every example of ``examples`` (``lengths`` and ``collate(rows, pad_id)``) once, shortest first, as
    (row indices, x, y) batches."""
    order = np.argsort(examples.lengths, kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = order[begin:begin + batch_size]
        yield rows, *examples.collate(rows, pad_id)


class ExampleBatches(SentenceBatches):
    """Length-bucketed, seeded, resumable random batches of :class:`Examples` (as for sentences)."""

    def __init__(self, examples: Examples, batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if len(examples) == 0:
            raise DataError("no training examples", "give a training file with examples")
        super().__init__(examples, batch_size, seed, bos_id=-1, pad_id=pad_id, rank=rank, world_size=world_size)

    def _collate(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sentences.collate(rows, self.pad_id)


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_len: int, bos: bool) -> tuple[list[list[int]], int]:
    """Token ids of each text for classification: [<bos>] text <eos> (the model read <eos> after every
    document in pre-training, so its state there sums the text up); texts longer than ``max_len`` keep
    their beginning. Returns the ids and how many texts were cut."""
    head = [tokenizer.bos_id] if bos else []
    room = max_len - len(head) - 1
    encoded, cut = [], 0
    for ids in tokenizer.encode_batch(texts):
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        encoded.append(head + ids + [tokenizer.eos_id])
    return encoded, cut


def encode_pairs(tokenizer: Tokenizer, pairs: list[Pair], max_len: int, bos: bool,
                 end_id: int | None = None) -> Examples:
    """Inputs and targets for supervised fine-tuning: ``[<bos>] prompt completion <eos>``, the loss on the
    completion and ``<eos>`` only (prompt targets are IGNORE_INDEX; prompt and completion are encoded apart,
    as at generation time; ``end_id``: another token that closes the completion, a chat template's end of
    turn). Too long a pair loses the start of its prompt first, then the end of its completion."""
    prompts = tokenizer.encode_batch([p.prompt for p in pairs])
    completions = tokenizer.encode_batch([p.completion for p in pairs])
    inputs, targets, cut = [], [], 0
    for prompt, completion in zip(prompts, completions, strict=True):
        # as the engine prompts: <bos> first for a model of sentences; <eos> alone for an empty prompt of text
        head = [tokenizer.bos_id] if bos else ([] if prompt else [tokenizer.eos_id])
        completion = completion + [tokenizer.eos_id if end_id is None else end_id]
        room = max_len + 1 - len(head)  # x and y are one shorter than the sequence
        if len(prompt) + len(completion) > room:
            cut += 1
            completion = completion[: room - 1]
            prompt = prompt[len(prompt) - (room - len(completion)):] if room > len(completion) else []
        sequence = head + prompt + completion
        inputs.append(sequence[:-1])
        scored = len(completion)
        targets.append([IGNORE_INDEX] * (len(sequence) - 1 - scored) + sequence[-scored:])
    return Examples(inputs, targets=targets, truncated=cut)
