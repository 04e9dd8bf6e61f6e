"""SST-2: a gpt pre-trained on WikiText-2 on this CPU, then fine-tuned for sentiment; before/after on SST-2 dev.

Pre-training: WikiText-2 (train / valid / test files), lower-cased (SST-2 is lower-case), byte-level BPE
with 8,192 tokens; a gpt of 4 layers x 4 heads x 256 (5.3M parameters), context 128, batches of 32
windows, AdamW lr 1e-3 with cosine decay over a wall-clock budget (--pretrain-time, default 30 minutes).
`--tokenizer word` (with its own --work) pre-trains on whole words instead (--vocab-size most frequent).

Fine-tuning: SST-2 train.tsv minus 2,000 phrases held out for validation (early stopping, checkpoint
selection); SST-2 dev.tsv (872 sentences) is the test set, touched once per run at the end. Seven runs
with the same architecture and tokenizer: from scratch, linear probe, full fine-tune (also with GPT-1's
auxiliary LM loss, weight 0.5), LoRA (rank 8), and a full fine-tune of the LM first fine-tuned on
SST-2's training sentences without labels (ULMFiT's second stage: 2,000 steps, as `glmlab finetune sft`
with empty prompts), also with the auxiliary loss; on request (--only), full + auxiliary loss for up to
12,000 steps (full-lm-long) and from scratch for as long (scratch-long), and both validated on 700
held-out whole sentences instead of phrases, up to 8,000 steps (full-lm-sent, scratch-sent); scratch and
full-lm with another seed (scratch-seed2, full-lm-seed2); full fine-tuning with mean pooling
(full-mean) and at lr 3e-5 (full-lr3e-5). Finished stages in --work are reused, so a second call only prints the table.

    python benchmarks/sst2.py --threads 2                  # 30 min pre-training + ~50 min fine-tuning
    python benchmarks/sst2.py --only full,probe --steps 500
    python benchmarks/sst2.py --threads 1 --only scratch-sent,full-lm-sent
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from glmlab.config import resolve_config
from glmlab.data.dataset import open_data_dir
from glmlab.data.prepare import prepare
from glmlab.errors import GlmlabError
from glmlab.finetune.report import write_report
from glmlab.finetune.run import FinetuneOptions, finetune
from glmlab.runs import METRICS, read_metrics
from glmlab.training.trainer import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAIN = ["model.family=gpt", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=128",
            "model.dropout=0.1", "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=200",
            "train.max_steps=100000", "train.eval_interval=500", "train.eval_tokens=65536", "train.sample_tokens=0",
            "train.weight_decay=0.1"]


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the table."""

    mode: str  # full | probe | lora
    pretrained: bool  # from the pre-trained weights; else the same architecture and tokenizer, fresh
    lr: str
    lm_loss: bool = False  # GPT-1's auxiliary LM loss, weight 0.5
    adapted: bool = False  # from the LM first fine-tuned on SST-2's training sentences (ULMFiT)
    steps: int | None = None  # at most this many steps instead of --steps
    by_sentence: bool = False  # validated on held-out sentences (split_by_sentence), not random phrases
    seed: int | None = None  # train.seed, if not the default
    pooling: str = "last"  # the classification head's input: the last token's state, or the mean over tokens

    def overrides(self, steps: int, threads: int) -> list[str]:
        seed = [f"train.seed={self.seed}"] if self.seed is not None else []
        return [*FINETUNE, f"train.lr={self.lr}", *seed, f"train.max_steps={self.steps or steps}",
                f"train.threads={threads}"]


RUNS = {
    "scratch": Run("full", False, "5e-4"),
    "probe": Run("probe", True, "3e-3"),
    "full": Run("full", True, "1e-4"),
    "full-lm": Run("full", True, "1e-4", lm_loss=True),
    "lora": Run("lora", True, "1e-3"),
    "adapted": Run("full", True, "1e-4", adapted=True),
    "adapted-lm": Run("full", True, "1e-4", lm_loss=True, adapted=True),
    "scratch-long": Run("full", False, "5e-4", steps=12000),
    "full-lm-long": Run("full", True, "1e-4", lm_loss=True, steps=12000),
    "scratch-seed2": Run("full", False, "5e-4", seed=2),
    "full-lm-seed2": Run("full", True, "1e-4", lm_loss=True, seed=2),
    "scratch-sent": Run("full", False, "5e-4", steps=8000, by_sentence=True),
    "full-lm-sent": Run("full", True, "1e-4", lm_loss=True, steps=8000, by_sentence=True),
    "full-mean": Run("full", True, "1e-4", pooling="mean"),
    "full-lr3e-5": Run("full", True, "3e-5"),
}
DEFAULT_RUNS = ("scratch", "probe", "full", "full-lm", "lora", "adapted", "adapted-lm")
ADAPT = ["train.batch_size=32", "train.max_steps=2000", "train.lr=3e-4", "train.eval_interval=500",
         "train.warmup_steps=100", "train.patience=0", "train.weight_decay=0.01", "train.log_interval=50"]
FINETUNE = ["train.batch_size=32", "train.eval_interval=250", "train.patience=6", "train.warmup_steps=100",
            "train.weight_decay=0.01", "train.log_interval=50"]


def lowercase_copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        target.write_text(source.read_text(encoding="utf-8").lower(), encoding="utf-8")
    return target


def split_train(work: Path, held_out: int) -> tuple[Path, Path]:
    """SST-2 train.tsv minus ``held_out`` random phrases (seed 0), and those phrases as a validation file."""
    train_file, val_file = work / "sst2-train.tsv", work / "sst2-val.tsv"
    if not val_file.is_file():
        header, *rows = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        held = set(order[:held_out])
        train_file.write_text("\n".join([header, *(r for i, r in enumerate(rows) if i not in held)]) + "\n")
        val_file.write_text("\n".join([header, *(rows[i] for i in sorted(held))]) + "\n")
    return train_file, val_file


def sentence_roots(phrases: list[str]) -> list[int]:
    """Indices of the phrases that are no other phrase's part: SST-2's train file holds every sentence's
    phrases, the sentences (their parse trees' roots) among them, so these are the sentences."""
    order = sorted(range(len(phrases)), key=lambda i: -len(phrases[i]))
    roots: list[int] = []
    joined, recent = "", []  # the roots so far, as one searchable string (plus the newest few)
    for i in order:
        p = f" {phrases[i]} "
        if p in joined or any(p in r for r in recent):
            continue
        roots.append(i)
        recent.append(p)
        if len(recent) >= 200:
            joined += "\n" + "\n".join(recent)
            recent = []
    return roots


def split_by_sentence(work: Path, held_out: int) -> tuple[Path, Path]:
    """A validation split without leaks: ``held_out`` random sentences (seed 0) of SST-2 train.tsv, and for
    training every phrase that is not part of one of them (word boundaries). Validation then looks like
    dev (whole sentences, median 19 words) and shares no phrase with training, unlike ``split_train``'s
    random phrases, whose sentences stay in training."""
    train_file, val_file = work / "sst2-sent-train.tsv", work / "sst2-sent-val.tsv"
    if not val_file.is_file():
        header, *rows = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
        phrases = [r.split("\t")[0].strip() for r in rows]
        roots = sentence_roots(phrases)
        random.Random(0).shuffle(roots)
        held = sorted(roots[:held_out])
        val_text = "\n".join(f" {phrases[i]} " for i in held)
        train_rows = [r for r, p in zip(rows, phrases, strict=True) if f" {p} " not in val_text]
        train_file.write_text("\n".join([header, *train_rows]) + "\n")
        val_file.write_text("\n".join([header, *(rows[i] for i in held)]) + "\n")
    return train_file, val_file


def texts_as_pairs(tsv: Path, out: Path) -> Path:
    """The sentences of an SST-2 file as {"prompt": "", "completion": sentence} pairs: an sft run on them
    is language-model fine-tuning on the task's text (labels unused)."""
    if not out.is_file():
        rows = tsv.read_text(encoding="utf-8").splitlines()[1:]
        out.write_text("".join(json.dumps({"prompt": "", "completion": r.split("\t")[0].strip()}) + "\n"
                               for r in rows if r.split("\t")[0].strip()), encoding="utf-8")
    return out


def adapt_lm(work: Path, pretrained: Path, train_file: Path, val_file: Path, threads: int) -> Path:
    """ULMFiT's second stage: the pre-trained LM fine-tuned on SST-2's training sentences (no labels)."""
    out = work / "lm-adapt"
    if not (out / "results.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        options = FinetuneOptions(task="sft", init=str(pretrained), eval_samples=0,
                                  train=str(texts_as_pairs(train_file, work / "sst2-train-text.jsonl")),
                                  val=str(texts_as_pairs(val_file, work / "sst2-val-text.jsonl")))
        finetune(options, out, overrides=[*ADAPT, f"train.threads={threads}"], show_progress=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/sst2", help="where data and runs go")
    parser.add_argument("--pretrain-time", default="30m", help="pre-training wall-clock budget (default 30m)")
    parser.add_argument("--tokenizer", default="bpe", choices=("bpe", "word"),
                        help="the pre-training tokenizer, trained on WikiText-2's train split (default bpe)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="its vocabulary size (default 8192)")
    parser.add_argument("--steps", type=int, default=4000, help="fine-tuning steps (batches of 32) at most")
    parser.add_argument("--only", default=",".join(DEFAULT_RUNS),
                        help=f"fine-tuning runs, comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0 = default)")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}: use {', '.join(RUNS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "wikitext-data"
    if (data / "meta.json").is_file():  # what the data was prepared with (asked for: a word vocabulary may be short)
        meta = open_data_dir(data).meta
        made = (meta["tokenizer"], meta["options"]["vocab_size"])
        if made != (args.tokenizer, args.vocab_size):
            parser.error(f"{data} was prepared with a {made[0]} tokenizer of {made[1]} tokens, not "
                         f"{args.tokenizer} / {args.vocab_size}: use another --work")
    else:
        lower = [lowercase_copy(SHARED / "wikitext-2" / f"{s}.txt", work / "wikitext-lower" / f"{s}.txt")
                 for s in ("train", "valid", "test")]
        try:
            prepare([lower[0]], data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_file=lower[1],
                    test_file=lower[2])
        except GlmlabError as exc:  # e.g. a --vocab-size the tokenizer cannot have
            parser.error(str(exc))
    pretrained = work / "pretrain"
    if not (pretrained / "best" / "model.safetensors").is_file():
        shutil.rmtree(pretrained, ignore_errors=True)
        budget = [f"train.max_time={args.pretrain_time}", f"train.threads={args.threads}"]
        config = resolve_config({}, [*PRETRAIN, *budget])
        train(config, data, pretrained, show_progress=True)
    val = [r for r in read_metrics(pretrained / METRICS) if r.get("split") == "val"]
    print(f"pre-trained: {val[-1]['step']} steps in {val[-1]['elapsed'] / 60:.1f} min, WikiText-2 val loss "
          f"{min(r['loss'] for r in val):.3f} nats/token", flush=True)
    runs = []
    for name in names:
        run, out = RUNS[name], work / name
        if not (out / "results.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            train_file, val_file = split_by_sentence(work, held_out=700) if run.by_sentence \
                else split_train(work, held_out=2000)
            init = adapt_lm(work, pretrained, *split_train(work, held_out=2000), args.threads) if run.adapted \
                else pretrained
            options = FinetuneOptions(task="classify", init=str(init) if run.pretrained else None,
                                      arch=None if run.pretrained else str(pretrained), train=str(train_file),
                                      val=str(val_file), test=str(SHARED / "sst2" / "dev.tsv"), mode=run.mode,
                                      lm_weight=0.5 if run.lm_loss else 0.0, pooling=run.pooling)
            finetune(options, out, overrides=run.overrides(args.steps, args.threads), show_progress=True)
        results = json.loads((out / "results.json").read_text())
        print(f"{name}: SST-2 dev accuracy {results['test']['accuracy']:.2%}", flush=True)
        runs.append(out)
    report = write_report(runs, work / "report", split="test",
                          title="SST-2 dev: a WikiText-2 gpt, from scratch vs probe vs full fine-tune vs LoRA")
    print(report.read_text())


if __name__ == "__main__":
    main()
