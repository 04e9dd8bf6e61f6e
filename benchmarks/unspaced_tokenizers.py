"""Tokenizers for text without spaces (issue 21): char, byte-level BPE and unigram on the Song ci corpus, the same
gpt shape trained for the same wall-clock time each, compared on what is comparable across tokenizers.

Data: ../shared/data/songci/songci.jsonl (21,050 Song-dynasty ci, 1.8 M characters; the poem text only), split
by whole poems (seed 1337, 90/5/5), so every tokenizer sees the same poems in each split. Tokenizers at their
defaults for this script (char: every character of the training split; bpe and unigram: four times the distinct
characters, see glmlab/data/tokenizer.py) or --vocab-size.

Model: gpt, 4 layers x 4 heads x 256, context 128 tokens, batches of 32, AdamW lr 1e-3 cosine over --minutes of
training, seed 1337, dropout 0.1; --threads threads.

Reported per tokenizer: parameters, steps trained, test **bits per character** (the total NLL of the test split
divided by its characters: the number that compares across tokenizers), characters per token and the unknown
rate on test, and of 200 sampled lines (temperature 1, from an empty prompt, cut at the first line break)
Self-BLEU-2 and distinct-1/2 counted per character (sacreBLEU's zh units); two samples shown.

    python benchmarks/unspaced_tokenizers.py --minutes 8
    python benchmarks/unspaced_tokenizers.py --minutes 1 --samples 20     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.evaluation.compare import generate_samples
from glmlab.evaluation.report import evaluate_run
from glmlab.evaluation.sample_metrics import distinct, self_bleu
from glmlab.runs import load_run
from glmlab.training.trainer import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KINDS = ("char", "bpe", "unigram")
SHAPE = ["model.family=gpt", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=128",
         "model.dropout=0.1", "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=100",
         "train.max_steps=1000000", "train.eval_interval=200", "train.eval_tokens=16384", "train.sample_tokens=0",
         "train.seed=1337"]


def poems(work: Path, shared: Path) -> Path:
    """The poems' text as JSONL documents (title and author dropped)."""
    out = work / "songci-text.jsonl"
    if not out.is_file():
        rows = [json.loads(line) for line in (shared / "songci" / "songci.jsonl").read_text().splitlines() if line]
        out.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows))
    return out


def measured(work: Path, corpus: Path, kind: str, minutes: float, threads: int, samples: int,
             vocab_size: int | None) -> dict:
    saved = work / f"figures-{kind}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    data, run_dir = work / f"data-{kind}", work / f"run-{kind}"
    if not (data / "meta.json").is_file():
        prepare([corpus], data, tokenizer=kind, vocab_size=None if kind == "char" else vocab_size)
    meta = json.loads((data / "meta.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    result = train(resolve_config({}, [*SHAPE, f"train.max_time={minutes * 60}", f"train.threads={threads}"]), data,
                   run_dir, show_progress=False)
    report, _ = evaluate_run(run_dir, split="test", device="cpu")
    run = load_run(run_dir)
    lines = generate_samples(run, samples, seed=0)
    test = meta["splits"]["test"]
    figures = {"kind": kind, "vocab": meta["vocab_size"], "parameters": run.model.num_parameters(),
               "steps": result.step, "bits_per_char": report.bits_per_char,
               "chars_per_token": test["characters"] / test["tokens"], "unk_rate": test["unk_tokens"] / test["tokens"],
               "self_bleu_2": self_bleu(lines, orders=(2,), unit="zh").get(2, 0.0),
               **{f"distinct_{n}": v for n, v in distinct(lines, unit="zh").items()},
               "examples": [s for s in lines if s][:2]}
    saved.write_text(json.dumps(figures, ensure_ascii=False))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/glmlab-unspaced"))
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder holding songci/")
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall clock per tokenizer")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--vocab-size", type=int, default=None, help="bpe and unigram (default: the script's)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = poems(args.work, args.shared)
    rows = [measured(args.work, corpus, kind, args.minutes, args.threads, args.samples, args.vocab_size)
            for kind in args.kinds.split(",")]
    print(f"\nSong ci, gpt 4x4x256 context 128 tokens, {args.minutes:g} min of training each, {args.threads} threads\n")
    print("| tokenizer | vocab | parameters | steps | test bits/char | chars/token | unk rate | Self-BLEU-2 (char) "
          "| distinct-1 / 2 (char) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['vocab']:,} | {r['parameters']:,} | {r['steps']:,} | {r['bits_per_char']:.4f} | "
              f"{r['chars_per_token']:.3f} | {r['unk_rate']:.3%} | {r['self_bleu_2']:.3f} | "
              f"{r['distinct_1']:.3f} / {r['distinct_2']:.3f} |")
    print()
    for r in rows:
        print(f"{r['kind']} samples: " + " / ".join(r["examples"]))


if __name__ == "__main__":
    main()
