"""The autoencoding half side by side with gpt (issue 19): gpt, gpt + FIM, glm and bert on the same data, tokenizer,
shape and CPU time, measured on infilling, left-to-right NLL, SST-2 and fill-mask.

Pre-training: WikiText-2 (lower-cased, as SST-2 is), byte-level BPE with 8,192 tokens, 4 layers x 4 heads x 256,
context 128, batches of 32, AdamW lr 1e-3, cosine over a wall-clock budget (--minutes per model, default 30) and
the same --seed. Rows: gpt; gpt with train.fim_rate=0.5 (PSM and SPM); glm (span 0.5 / document 0.5); bert.

Measures (test split of WikiText-2, --windows windows of 128 tokens, fixed seed):
- infilling: one Poisson-3 span (at least one token) blanked per window; NLL per blanked token given both sides
  (gpt: its left context only; gpt + FIM: the PSM and the SPM prompts; glm: Part A with [MASK], the piece scored
  without its end token). bert is left out: it needs the span's length given.
- left-to-right: test NLL per token in windows (glmlab eval's accounting) for gpt, gpt + FIM and glm ([gMASK]).
- SST-2 dev accuracy after --sst2-steps steps of fine-tuning (validation: 2,000 held-out training phrases): gpt
  (head, last token), bert (head, mean pooling), glm (head; and cloze "{text} It was [MASK]." with good / bad).
- fill-mask top-1: 15% of each window's tokens replaced by [MASK] (bert) or, one at a time, by a blank whose
  one-token piece glm writes first; accuracy of the top candidate.

    python benchmarks/autoencoding.py --minutes 30 --seeds 1337         # ~2 h 10 min of pre-training + measures
    python benchmarks/autoencoding.py --minutes 2 --windows 100 --sst2-steps 100   # a smoke run
    python benchmarks/autoencoding.py --steps 4000 --minutes 3 --threads 16         # equal steps (e.g. on a GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from glmlab import atomic
from glmlab.config import resolve_config
from glmlab.data.dataset import open_data_dir
from glmlab.data.fim import fim_prompt
from glmlab.data.prepare import prepare
from glmlab.data.tokenizer import FIRST_TEXT_ID, MASK_ID
from glmlab.evaluation.likelihood import sum_nll
from glmlab.finetune.run import FinetuneOptions, finetune
from glmlab.models.glm import piece_layout
from glmlab.runs import load_run
from glmlab.training.trainer import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # --shared replaces it
SHAPE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=128", "model.dropout=0.1",
         "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=200", "train.max_steps=1000000",
         "train.eval_interval=500", "train.eval_tokens=16384", "train.sample_tokens=0",
         "train.checkpoint_interval=100"]  # a run stopped part-way loses at most 100 steps
ROWS = {"gpt": ["model.family=gpt"], "gpt+fim": ["model.family=gpt", "train.fim_rate=0.5"],
        "glm": ["model.family=glm"], "bert": ["model.family=bert"]}


def prepared(work: Path, shared: Path) -> Path:
    data = work / "data"
    if not (data / "meta.json").is_file():
        lower = work / "lower"
        lower.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid", "test"):
            (lower / f"{split}.txt").write_text((shared / "wikitext-2" / f"{split}.txt").read_text().lower())
        prepare([lower / "train.txt"], data, tokenizer="bpe", vocab_size=8192, val_file=lower / "valid.txt",
                test_file=lower / "test.txt")
    return data


def pretrained(work: Path, data: Path, row: str, minutes: float, steps: int, seed: int, threads: int) -> Path:
    """The row's pre-trained run: a wall-clock budget (the cosine spans it), or --steps (the cosine spans the steps;
    --minutes then only caps the time). A run interrupted part-way (killed, or stopped by Ctrl-C / SIGTERM, which
    save a checkpoint and end the script) resumes from its last checkpoint."""
    out, budget = work / f"{row}-{seed}", [f"train.max_steps={steps}"] if steps else []
    done = out / "pretrained.done"  # written once train() returns: a killed run has checkpoints but no marker
    if not done.is_file():
        checkpoints = out / "checkpoints"
        resume = checkpoints.is_dir() and any(checkpoints.iterdir())
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        result = train(resolve_config({}, [*SHAPE, *ROWS[row], *budget, f"train.max_time={minutes * 60}",
                                           f"train.seed={seed}", f"train.threads={threads}"]),
                       data, out, resume=resume, show_progress=False)
        if result.stopped_by == "interrupted":  # Ctrl-C / SIGTERM: checkpoint saved, the run is not finished
            sys.exit(f"{out} interrupted at step {steps_done(out)}: the same command continues it")
        done.write_text(f"{steps_done(out)}\n")
    return out


def steps_done(run_dir: Path) -> int:
    """The last step the run recorded (its metrics.jsonl)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)


def windows(data: Path, n: int, length: int, seed: int) -> list[list[int]]:
    tokens = open_data_dir(data).tokens("test")
    rng = random.Random(seed)
    return [tokens[s:s + length].tolist() for s in (rng.randrange(len(tokens) - length) for _ in range(n))]


@torch.no_grad()
def infilling_nll(run, row: str, texts: list[list[int]], seed: int, order: str = "psm") -> float:
    """NLL per token of one blanked span per window, given what the row can read of both sides (gpt + FIM in
    ``order``, PSM or SPM)."""
    model, rng, total, count = run.model, random.Random(seed), 0.0, 0
    for text in texts:
        length = max(1, min(len(text) - 2, int(torch.poisson(torch.tensor(3.0), generator=torch.Generator()
                                                                         .manual_seed(rng.randrange(1 << 30))))))
        start = rng.randrange(1, len(text) - length)
        prefix, span, suffix = text[:start], text[start:start + length], text[start + length:]
        if row == "glm":
            layout = piece_layout([*prefix, MASK_ID, *suffix], [(len(prefix), span)])
            logits, targets = model.layout_logits([layout])
            logp = F.log_softmax(logits[0].float(), -1)
            scored = [(i, t) for i, t in enumerate(targets[0].tolist()) if t != -100][:-1]  # not <|endofpiece|>
            total -= sum(float(logp[i, t]) for i, t in scored)
        else:
            if row == "gpt+fim":  # the prefix gives way first: the sentinels and the suffix must fit
                prefix = prefix[max(0, len(prefix) + len(suffix) + 3 + len(span) - model.block_size):]
            ids = fim_prompt(prefix, suffix, order) if row == "gpt+fim" else prefix
            ids = [*ids, *span][-model.block_size:]
            logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
            first = len(ids) - len(span)
            total -= sum(float(logp[first - 1 + j, t]) for j, t in enumerate(span))
        count += len(span)
    return total / count


@torch.no_grad()
def fill_mask_top1(run, row: str, texts: list[list[int]], seed: int) -> float:
    model, rng, right, count = run.model, random.Random(seed), 0, 0
    for text in texts:
        chosen = [i for i in range(len(text)) if rng.random() < 0.15 and text[i] >= FIRST_TEXT_ID]
        if not chosen:
            continue
        if row == "bert":
            masked = [MASK_ID if i in chosen else t for i, t in enumerate(text)]
            predicted = model(torch.tensor([masked]))[0].argmax(-1).tolist()
            right += sum(predicted[i] == text[i] for i in chosen)
        else:  # glm: each blank alone, its one-token piece's first token
            rows = [piece_layout(text[:i] + [MASK_ID] + text[i + 1:], [(i, [])]) for i in chosen]
            logits, _ = model.layout_logits(rows)
            at = torch.tensor([r.part_a for r in rows])
            predicted = logits[torch.arange(len(rows)), at].argmax(-1).tolist()
            right += sum(p == text[i] for p, i in zip(predicted, chosen, strict=True))
        count += len(chosen)
    return right / max(count, 1)


HELD_OUT = 2000  # SST-2 training phrases every fine-tune here holds out for validation


def sst2_rows(shared: Path) -> tuple[str, list[str]]:
    """SST-2's training TSV: its header and its rows in the fixed shuffled order whose first HELD_OUT rows are
    held out (what the SST-2 fine-tunes of every benchmark here validate on)."""
    lines = (shared / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(0).shuffle(rows)
    return header, rows


def write_sst2_split(work: Path, shared: Path) -> tuple[Path, Path]:
    """``work/sst2-train.tsv`` and ``work/sst2-val.tsv`` (the held-out rows), each written whole at once: two
    seeds may run in two processes on one ``--work``."""
    header, rows = sst2_rows(shared)
    train, val = work / "sst2-train.tsv", work / "sst2-val.tsv"
    atomic.write_text(train, "\n".join([header, *rows[HELD_OUT:]]) + "\n")
    atomic.write_text(val, "\n".join([header, *rows[:HELD_OUT]]) + "\n")
    return train, val


def sst2(work: Path, shared: Path, run_dir: Path, name: str, steps: int, seed: int, threads: int,
         **kw) -> float:
    out = work / f"sst2-{name}-{seed}"
    results = out / "results.json"
    if not results.is_file():
        shutil.rmtree(out, ignore_errors=True)
        train_tsv, val_tsv = write_sst2_split(work, shared)
        options = FinetuneOptions(task="classify", init=str(run_dir), train=str(train_tsv), val=str(val_tsv),
                                  test=str(shared / "sst2" / "dev.tsv"), **kw)
        finetune(options, out, overrides=[f"train.max_steps={steps}", "train.eval_interval=250", "train.lr=1e-4",
                                          "train.batch_size=32", f"train.seed={seed}", f"train.threads={threads}",
                                          "train.warmup_steps=50"], show_progress=False)
    return json.loads(results.read_text())["test"]["accuracy"]


def cell(figures: dict[str, list[float]], key: str, fmt: str = "{:.4f}") -> str:
    """Mean (± standard deviation over seeds) of one measure, or a dash."""
    values = figures.get(key)
    if not values:
        return "—"
    mean = sum(values) / len(values)
    spread = f" ± {math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)):.4f}" if len(values) > 1 \
        else ""
    return fmt.format(mean) + spread


def measured(args: argparse.Namespace, data: Path, row: str, seed: int) -> dict[str, float]:
    """One row's figures for one pre-training seed, kept in --work (figures-ROW-SEED.json) so that a later call,
    in another session or with other --rows, adds to the table instead of measuring again."""
    saved = args.work / f"figures-{row}-{seed}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    run_dir = pretrained(args.work, data, row, args.minutes, args.steps, seed, args.threads)
    run = load_run(run_dir)
    texts = windows(data, args.windows, 128, seed)
    figures = {"parameters": run.model.num_parameters(), "steps": steps_done(run_dir)}
    if row != "bert":
        figures["infill_nll"] = infilling_nll(run, row, texts, seed)
        if row == "gpt+fim":
            figures["infill_nll_spm"] = infilling_nll(run, row, texts, seed, order="spm")
        nll, count = sum_nll(run.model, open_data_dir(data).tokens("test")[: args.lm_tokens], run.tokenizer.eos_id,
                             batch_size=16)
        figures["lm_nll"] = nll / count
    if row in ("bert", "glm"):
        figures["fill_top1"] = fill_mask_top1(run, row, texts, seed)
    if row != "gpt+fim":
        figures["sst2_head"] = sst2(args.work, args.shared, run_dir, f"{row}-head", args.sst2_steps, seed,
                                    args.threads, pooling="mean" if row == "bert" else "last")
    if row == "glm":
        figures["sst2_cloze"] = sst2(args.work, args.shared, run_dir, "glm-cloze", args.sst2_steps, seed,
                                     args.threads, pattern="{text} It was [MASK].", verbalizer="1=good,0=bad")
    saved.write_text(json.dumps(figures))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/glmlab-autoencoding"))
    parser.add_argument("--minutes", type=float, default=30.0, help="pre-training wall clock per model")
    parser.add_argument("--steps", type=int, default=0,
                        help="pre-train every row for this many steps instead (same tokens; --minutes caps the time)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder holding wikitext-2/ and sst2/")
    parser.add_argument("--seeds", default="1337", help="comma-separated pre-training seeds")
    parser.add_argument("--windows", type=int, default=500, help="test windows for infilling and fill-mask")
    parser.add_argument("--lm-tokens", type=int, default=65536, help="test tokens for the left-to-right NLL")
    parser.add_argument("--sst2-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-seed-rows", default="", metavar="ROWS",
                        help="rows measured on the first seed only (the issue asks for three seeds where differences "
                             "are under half a nat: e.g. gpt+fim, whose infilling is more than half a nat from "
                             "glm's)")
    args = parser.parse_args()
    one_seed = set(filter(None, args.one_seed_rows.split(",")))
    unknown = (set(args.rows.split(",")) | one_seed) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {', '.join(sorted(unknown))}: choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepared(args.work, args.shared)
    table: dict[str, dict[str, list[float]]] = {}
    for n, seed in enumerate(int(s) for s in args.seeds.split(",")):
        for row in args.rows.split(","):
            if n and row in one_seed:
                continue
            figures = measured(args, data, row, seed)
            for key, value in figures.items():
                table.setdefault(row, {}).setdefault(key, []).append(value)
            print(json.dumps({row: figures, "seed": seed}), flush=True)
    budget = f"{args.steps} steps (at most {args.minutes:g} min)" if args.steps else f"{args.minutes:g} min"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\npre-training {budget} per model on {device}, seeds {args.seeds}"
          f"{f' ({args.one_seed_rows}: the first only)' if args.one_seed_rows else ''}; WikiText-2 test, BPE 8192; "
          "mean ± standard deviation over seeds\n")
    print("| row | parameters | steps | infill NLL/token | L2R NLL/token | SST-2 head | SST-2 cloze "
          "| fill-mask top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for row, f in table.items():
        print(f"| {row} | {int(f['parameters'][0]):,} | {cell(f, 'steps', '{:.0f}')} | {cell(f, 'infill_nll')} | "
              f"{cell(f, 'lm_nll')} | "
              f"{cell(f, 'sst2_head', '{:.3f}')} | {cell(f, 'sst2_cloze', '{:.3f}')} | "
              f"{cell(f, 'fill_top1', '{:.3f}')} |")
    if "gpt+fim" in table:
        print(f"\ngpt+fim infilling in SPM order: {cell(table['gpt+fim'], 'infill_nll_spm')} (the column: PSM)")
    if "glm" in table and "gpt+fim" in table:  # means: the rows may have run different numbers of seeds
        glm, fim = statistics.mean(table["glm"]["infill_nll"]), statistics.mean(min(p, s) for p, s in zip(
            table["gpt+fim"]["infill_nll"], table["gpt+fim"]["infill_nll_spm"], strict=True))
        change = 100 * (glm / fim - 1)
        print(f"glm's infill NLL against gpt+FIM's (its better order): {abs(change):.1f}% "
              f"{'lower' if change < 0 else 'higher'} (target: at least 10% lower)")
    if "glm" in table and "gpt" in table:
        ratio = statistics.mean(table["glm"]["lm_nll"]) / statistics.mean(table["gpt"]["lm_nll"])
        print(f"glm's L2R NLL against gpt's: {100 * (ratio - 1):+.1f}% (target: within 5%)")


if __name__ == "__main__":
    main()
