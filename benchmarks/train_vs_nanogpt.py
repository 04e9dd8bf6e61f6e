"""glmlab against nanoGPT itself, end to end, on nanoGPT's CPU recipe for Tiny Shakespeare (issue 23).

nanoGPT runs from ``../shared/peers/nanoGPT`` as it is (its ``train.py``, ``model.py`` and
``configurator.py``; nothing of it is copied into glmlab): a work folder gets its data in nanoGPT's own format
(``data/shakespeare_char/{train,val}.bin`` and ``meta.pkl``: the characters of the bundled Tiny Shakespeare,
sorted, the first 90% for training, the rest for validation) and a link to its ``configurator.py``, which
``train.py`` reads from the current folder. glmlab gets the same two texts through ``glmlab prepare`` (char
tokenizer). Both train the recipe of nanoGPT's README — 4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000
iterations, lr 1e-3 with 100 warm-up steps and a cosine to 1e-4, AdamW (0.9, 0.99), weight decay 0.1, clipping
at 1.0, no dropout, no biases, an evaluation of 20 batches every 250 steps — each in a process of its own, the
two alternating for ``--rounds`` rounds. Printed per run: wall time of the whole process (start-up, data,
evaluations and checkpoints included), tokens per second over it (iterations x batch x block / wall time), and
the final model's validation loss, measured the same way for both by this script (mean cross-entropy over
every non-overlapping window of 64 characters of the validation text, each model with its own ids); then the
median ratio. glmlab runs the recipe with nanoGPT's exact (erf) GELU, ``model.activation=gelu``: the same model.

Then the loop: glmlab's bare training step at the recipe's shape (``LossModule`` forward, backward, clipping,
fused AdamW, as ``benchmarks/train_throughput.py`` times it), timed in this process, against the glmlab runs'
tokens/s over their training steps (the median of their logged windows, evaluations excluded) and over the
whole run (evaluations included); and, in this one process, ``--loop-rounds`` alternations of a ``train()`` of the
recipe (``--loop-steps`` steps) and the bare step, so that the figure does not also compare two processes' speeds.

Then glmlab's best configuration (``--best``, default ``configs/shakespeare-char-83s.yaml``) against the
recipe: its validation loss when its whole process gets nanoGPT's median wall time (``train.max_time`` = that
wall time less glmlab's measured start-up and final evaluation), and the shortest run whose validation loss
reaches nanoGPT's median (a bisection on ``train.max_time``, ``--probes`` runs).

    python benchmarks/train_vs_nanogpt.py                  # 3 rounds of the full recipe, the loop, the best config
    python benchmarks/train_vs_nanogpt.py --iters 250 --rounds 1 --probes 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peers" / "nanoGPT"
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
BATCH, EVAL_ITERS = 12, 20


def nanogpt_data(folder: Path, text: str) -> tuple[np.ndarray, dict]:
    """nanoGPT's shakespeare_char data (as its prepare.py writes it); the validation ids and the vocabulary."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    cut = int(len(text) * 0.9)
    data = folder / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    train = np.array([stoi[c] for c in text[:cut]], dtype=np.uint16)
    val = np.array([stoi[c] for c in text[cut:]], dtype=np.uint16)
    train.tofile(data / "train.bin")
    val.tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    (folder / "configurator.py").unlink(missing_ok=True)
    (folder / "configurator.py").symlink_to(PEER / "configurator.py")  # train.py reads it from the current folder
    return val.astype(np.int64), stoi


def glmlab_data(folder: Path, text: str) -> Path:
    cut = int(len(text) * 0.9)
    (folder / "train.txt").write_text(text[:cut], encoding="utf-8")
    (folder / "val.txt").write_text(text[cut:], encoding="utf-8")
    out = folder / "data"
    subprocess.run([sys.executable, "-m", "glmlab", "prepare", str(folder / "train.txt"), "--val",
                    str(folder / "val.txt"), "--split", "1,0,0", "--tokenizer", "char", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def run_nanogpt(folder: Path, iters: int, threads: int) -> tuple[float, Path]:
    out = folder / f"out-{time.time_ns()}"
    argv = [sys.executable, str(PEER / "train.py"), str(PEER / "config" / "train_shakespeare_char.py"),
            "--device=cpu", "--compile=False", f"--eval_iters={EVAL_ITERS}", "--log_interval=1",
            f"--block_size={SHAPE['block_size']}", f"--batch_size={BATCH}", f"--n_layer={SHAPE['n_layer']}",
            f"--n_head={SHAPE['n_head']}", f"--n_embd={SHAPE['n_embd']}", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--dropout=0.0", f"--out_dir={out}", "--always_save_checkpoint=True"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    subprocess.run(argv, cwd=folder, check=True, capture_output=True, env=env)
    return time.perf_counter() - started, out / "ckpt.pt"


def recipe_overrides(iters: int, threads: int, extra: list[str]) -> list[str]:
    """nanoGPT's recipe as glmlab config overrides."""
    return [*(f"model.{k}={v}" for k, v in SHAPE.items()), "model.dropout=0.0", "model.bias=false",
            "model.activation=gelu",
            f"train.batch_size={BATCH}", f"train.max_steps={iters}", "train.lr=1e-3", "train.min_lr=1e-4",
            "train.warmup_steps=100", "train.beta2=0.99", "train.weight_decay=0.1", "train.grad_clip=1.0",
            "train.eval_interval=250", f"train.eval_tokens={EVAL_ITERS * BATCH * SHAPE['block_size']}",
            f"train.threads={threads}", *extra]


def run_glmlab(data: Path, out: Path, iters: int, threads: int, extra: list[str]) -> float:
    argv = [sys.executable, "-m", "glmlab", "train", "--data", str(data), "--out", str(out),
            *recipe_overrides(iters, threads, extra)]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


@torch.no_grad()
def window_loss(forward, ids: np.ndarray, block: int) -> float:
    """Mean cross-entropy over every non-overlapping window of ``block`` targets (each predicted from the
    window's earlier tokens): the same accounting for both models."""
    windows = (len(ids) - 1) // block
    x = torch.from_numpy(ids[:windows * block].reshape(windows, block))
    y = torch.from_numpy(ids[1:windows * block + 1].reshape(windows, block))
    total = 0.0
    for begin in range(0, windows, 64):
        logits = forward(x[begin:begin + 64])
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                         y[begin:begin + 64].reshape(-1), reduction="sum"))
    return total / (windows * block)


def nanogpt_val_loss(checkpoint: Path, val: np.ndarray) -> float:
    sys.path.insert(0, str(PEER))
    try:
        from model import GPT, GPTConfig  # nanoGPT's own model class, where it is
    finally:
        sys.path.remove(str(PEER))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    return window_loss(lambda x: model(x, x)[0], val, SHAPE["block_size"])  # targets given: logits at every position


def run_best(data: Path, out: Path, config: Path, seconds: float, threads: int) -> float:
    """Wall time of a ``glmlab train --config CONFIG`` process given ``seconds`` of training (its evaluations
    score as many tokens as the recipe's: this script measures the final loss itself)."""
    argv = [sys.executable, "-m", "glmlab", "train", "--data", str(data), "--out", str(out), "--config", str(config),
            f"train.max_time={seconds:.2f}", f"train.threads={threads}",
            f"train.eval_tokens={EVAL_ITERS * BATCH * SHAPE['block_size']}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def run_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loop_rates(run_dir: Path, tokens: int) -> tuple[float, float]:
    """A glmlab run's tokens/s over its training steps (median of its logged windows, which leave evaluations
    out) and over the whole run (training tokens / the run's final elapsed time, evaluations in)."""
    records = run_records(run_dir)
    windows = [r["tokens_per_sec"] for r in records if r.get("split") == "train"]
    return statistics.median(windows), tokens / records[-1]["elapsed"]


def bare_step_rate(threads: int, steps: int, dtype: torch.dtype | None) -> float:
    """Tokens/s of glmlab's bare training step at the recipe's shape and autocast ``dtype`` (the runs' precision),
    timed as ``train_throughput.py`` times it (its ``make_step`` and ``measure``): the median of 5 timings of
    ``steps``."""
    from train_throughput import make_step, measure  # this folder is on the path of a script run from it

    from glmlab.models.gpt import GPT, GPTConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, dropout=0.0, bias=False, activation="gelu", **SHAPE)).train()
    step = make_step(model, hf=False, dtype=dtype, batch_size=BATCH)
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, 65, (2, BATCH, SHAPE["block_size"]), generator=gen)) for _ in range(8)]
    measure(step, batches, 3)  # warm-up
    return steps * BATCH * SHAPE["block_size"] / statistics.median(measure(step, batches, steps) for _ in range(5))


def loop_in_one_process(data: Path, folder: Path, args: argparse.Namespace, dtype: torch.dtype | None) -> None:
    """The loop against the bare step timed in this one process, alternating ``--loop-rounds`` times: ``train()``
    of the recipe for ``--loop-steps`` steps (the median of its logged windows' tokens/s, which leave evaluations
    out) and the bare step at the same shape and precision. Across processes the two figures also carry each
    process's own speed on a VM whose speed moves."""
    from glmlab.config import resolve_config
    from glmlab.training.trainer import train

    overrides = recipe_overrides(args.loop_steps, args.threads, args.glmlab_extra.split())
    print("\nthe loop timed in one process, alternating (tokens/s):\n\n| round | the run's steps | bare step | "
          "run / bare |\n|---|---|---|---|")
    ratios = []
    for r in range(args.loop_rounds):
        out = folder / f"loop-{r}"
        train(resolve_config({}, overrides), data, out, show_progress=False)
        windows = [x["tokens_per_sec"] for x in run_records(out) if x.get("split") == "train"][1:]  # after warm-up
        run_rate = statistics.median(windows)
        bare = bare_step_rate(args.threads, args.bare_steps, dtype)
        ratios.append(run_rate / bare)
        print(f"| {r + 1} | {run_rate:,.0f} | {bare:,.0f} | {run_rate / bare:.1%} |", flush=True)
    print(f"\nmedian: the run's steps at {statistics.median(ratios):.1%} of the bare step's speed")


def glmlab_val_loss(run_dir: Path, text_val: str) -> float:
    from glmlab.runs import load_run

    run = load_run(run_dir, checkpoint="last")
    ids = np.array(run.tokenizer.encode(text_val), dtype=np.int64)
    return window_loss(run.model, ids, SHAPE["block_size"])


def best_config_table(args: argparse.Namespace, folder: Path, data: Path, text_val: str, budget: float,
                      target: float, overhead: float) -> None:
    """glmlab's best configuration at nanoGPT's wall time, and the shortest run reaching nanoGPT's val loss."""
    print(f"\nglmlab's best configuration ({args.best.name}) against the recipe's median wall time {budget:.1f} s "
          f"and val loss {target:.4f} (glmlab's start-up and final evaluation: {overhead:.1f} s)\n")
    print("| run | train.max_time s | wall s | val loss | wall / nanoGPT's |\n|---|---|---|---|---|")
    runs = 0

    def probe(seconds: float, what: str) -> tuple[float, float]:
        nonlocal runs
        runs += 1
        out = folder / f"best-{runs}"
        wall = run_best(data, out, args.best, seconds, args.threads)
        loss = glmlab_val_loss(out, text_val)
        print(f"| {what} | {seconds:.1f} | {wall:.1f} | {loss:.4f} | {wall / budget:.2f} |", flush=True)
        return wall, loss

    probe(budget - overhead, "equal wall time")
    low, high, reached = 1.0, budget - overhead, None
    for _ in range(args.probes):  # the shortest max_time whose run ends at or below nanoGPT's val loss
        middle = (low + high) / 2
        wall, loss = probe(middle, "bisection")
        if loss <= target:
            high, reached = middle, (wall, loss)
        else:
            low = middle
    if reached:
        print(f"\ntime to nanoGPT's val loss {target:.4f}: {reached[0]:.1f} s, {reached[0] / budget:.2f} of "
              f"nanoGPT's {budget:.1f} s ({budget / reached[0]:.2f}x)")
    else:
        print(f"\nno probe reached nanoGPT's val loss {target:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: PyTorch's default)")
    parser.add_argument("--glmlab-extra", default="", help="more glmlab config overrides, space-separated")
    parser.add_argument("--bare-steps", type=int, default=200, help="steps per timing of the bare step (0: skip)")
    parser.add_argument("--loop-rounds", type=int, default=2,
                        help="alternations of a glmlab run and the bare step in this process (0: skip)")
    parser.add_argument("--loop-steps", type=int, default=400, help="steps of each glmlab run of --loop-rounds")
    parser.add_argument("--best", type=Path, default=ROOT / "configs" / "shakespeare-char-83s.yaml",
                        help="glmlab's best configuration for the second table")
    parser.add_argument("--probes", type=int, default=4, help="bisection runs for the time to nanoGPT's val loss "
                                                              "(0: skip the second table)")
    args = parser.parse_args()
    if args.loop_rounds and args.loop_steps < 30:  # its logged windows (every 10 steps) after the first
        parser.error(f"--loop-steps {args.loop_steps}: give at least 30 (or --loop-rounds 0)")
    if args.probes and not args.best.is_file():
        parser.error(f"--best {args.best}: no such config file (give a glmlab YAML config, or --probes 0)")
    from glmlab.data.corpus import default_corpus_path
    from glmlab.runtime import precision_name, resolve_precision

    text = default_corpus_path().read_text(encoding="utf-8")
    text_val = text[int(len(text) * 0.9):]
    rows = {"nanoGPT": [], "glmlab": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        val_ids, _ = nanogpt_data(folder, text)
        data = glmlab_data(folder, text)
        tokens = args.iters * BATCH * SHAPE["block_size"]
        auto_dtype = resolve_precision("auto", torch.device("cpu"))  # what the glmlab runs train in
        auto = precision_name(auto_dtype)
        print(f"nanoGPT's recipe, {args.iters} iterations x {BATCH} x {SHAPE['block_size']} tokens; "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads or 'default'}; glmlab's "
              f"automatic precision here: {auto} (nanoGPT trains in fp32 on a CPU)\n")
        print("| round | run | wall s | tokens/s | val loss |\n|---|---|---|---|---|")
        overheads, loops = [], []
        for r in range(args.rounds):
            wall, checkpoint = run_nanogpt(folder, args.iters, args.threads)
            loss = nanogpt_val_loss(checkpoint, val_ids)
            rows["nanoGPT"].append((wall, loss))
            print(f"| {r + 1} | nanoGPT | {wall:.1f} | {tokens / wall:,.0f} | {loss:.4f} |", flush=True)
            out = folder / f"glmlab-{r}"
            wall = run_glmlab(data, out, args.iters, args.threads, args.glmlab_extra.split())
            loss = glmlab_val_loss(out, text_val)
            rows["glmlab"].append((wall, loss))
            overheads.append(wall - run_records(out)[-1]["elapsed"])
            loops.append(loop_rates(out, tokens))
            print(f"| {r + 1} | glmlab | {wall:.1f} | {tokens / wall:,.0f} | {loss:.4f} |", flush=True)
        ratio = statistics.median(n[0] / g[0] for n, g in zip(rows["nanoGPT"], rows["glmlab"], strict=True))
        losses = {name: statistics.median(v for _, v in runs) for name, runs in rows.items()}
        print(f"\nmedian wall-time ratio nanoGPT / glmlab: {ratio:.3f}x; median val loss nanoGPT "
              f"{losses['nanoGPT']:.4f}, glmlab {losses['glmlab']:.4f}")
        print(json.dumps({k: [{"wall": w, "val_loss": v} for w, v in runs] for k, runs in rows.items()}))
        if args.bare_steps:
            bare = bare_step_rate(args.threads, args.bare_steps, auto_dtype)
            steps_rate = statistics.median(rate for rate, _ in loops)
            run_rate = statistics.median(rate for _, rate in loops)
            print(f"\nthe loop: bare step {bare:,.0f} tokens/s; glmlab runs over their steps {steps_rate:,.0f} "
                  f"({steps_rate / bare:.1%} of the bare step), over the whole run with its "
                  f"{args.iters // 250} evaluations {run_rate:,.0f} ({run_rate / bare:.1%})")
            if args.loop_rounds:
                loop_in_one_process(data, folder, args, auto_dtype)
        if args.probes:
            budget = statistics.median(w for w, _ in rows["nanoGPT"])
            best_config_table(args, folder, data, text_val, budget, losses["nanoGPT"], statistics.median(overheads))


if __name__ == "__main__":
    main()
