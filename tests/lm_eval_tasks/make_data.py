"""Build the example tasks' data from the bundled corpus (the first 40,000 characters, which the tests' tiny
models read): ``python tests/lm_eval_tasks/make_data.py`` rewrites the three .jsonl files, the same every time.

- cloze.jsonl: a line cut at a word; the true rest of it against three other lines' rests (multiple choice),
  after one to three lines of context, joined by spaces (some longer than a small model's window);
- passages.jsonl: runs of consecutive lines, scored whole (perplexity, in rolling windows);
- starts.jsonl: the first words of a line and the rest of it (generation, until the end of the line).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from glmlab.data.corpus import default_corpus_path

HERE = Path(__file__).resolve().parent


def lines() -> list[str]:
    text = default_corpus_path().read_text(encoding="utf-8")[:40_000]
    return [line.strip() for line in text.splitlines() if line.strip()]


def cut(line: str) -> tuple[str, str] | None:
    """The line split at the space nearest its middle (None when it has no space there)."""
    spaces = [i for i, c in enumerate(line) if c == " " and 4 <= i <= len(line) - 4]
    if not spaces:
        return None
    at = min(spaces, key=lambda i: abs(i - len(line) // 2))
    return line[:at], line[at + 1:]


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20)
    every = lines()
    usable = [i for i, line in enumerate(every) if len(line) >= 24 and cut(line) and i >= 3]
    rests = [cut(every[i])[1] for i in usable]
    cloze = []
    for n, i in enumerate(rng.sample(usable, 40)):
        head, rest = cut(every[i])
        context = " ".join(every[i - 1 - n % 3: i] + [head])
        wrong = rng.sample([r for r in rests if r != rest], 3)
        label = rng.randrange(4)
        choices = wrong[:label] + [rest] + wrong[label:]
        cloze.append({"context": context, "choices": choices, "label": label})
    write("cloze.jsonl", cloze)
    starts = []
    for i in rng.sample(usable, 16):
        words = every[i].split(" ")
        head = " ".join(words[:2])[:12].rstrip()
        starts.append({"context": head, "answer": every[i][len(head):]})
    write("starts.jsonl", starts)
    passages = []
    for i in rng.sample(range(len(every) - 6), 12):
        passages.append({"text": " ".join(every[i:i + 1 + i % 5])})
    write("passages.jsonl", passages)


if __name__ == "__main__":
    main()
