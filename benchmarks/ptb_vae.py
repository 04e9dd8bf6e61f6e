"""PTB: an LSTM language model against sentence VAEs with and without the defences against posterior collapse.

Every model has the same decoder (word embedding 128, one LSTM layer of 256, softmax tied to the
embedding through a projection) and the same budget (train.max_steps sentence batches of 32). VAEs
add a bidirectional LSTM encoder (128 per direction) and a 32-dimensional z (8 or 16 where the
configuration says so). Test-set figures:
NLL per sentence (nats, <eos> included) — exact for the LSTM-LM, the importance-weighted bound with
--iw-samples samples for VAEs — PPL = exp(total NLL / total tokens), KL, mutual information (q(z)
over the test set), active units, and training time.

    python benchmarks/ptb_vae.py                      # the main table (~1 hour on 2 CPU cores)
    python benchmarks/ptb_vae.py --only lm,vae-fb --max-steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from glmlab.config import resolve_config
from glmlab.data.dataset import IGNORE_INDEX, open_data_dir
from glmlab.data.prepare import prepare
from glmlab.data.sentences import find_sentences, sentence_batches
from glmlab.evaluation.latent import importance_weighted_nll, latent_report
from glmlab.runs import load_run
from glmlab.training.trainer import train

PTB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb"
DECODER = ["model.n_embd=128", "model.n_hidden=256", "model.dropout=0.3"]
VAE = ["model.family=vae", "model.encoder_hidden=128", "model.latent_dim=32", *DECODER]
LM = ["model.family=lstm", "train.batching=sentences", *DECODER]
ANNEAL = ["model.beta_schedule=linear", "model.anneal_steps={half}"]


def mixture_recipe(latent_dim: int, free_bits: float) -> list[str]:
    """Free bits per dimension + linear annealing + a learned mixture prior (128 components)."""
    return [*VAE, f"model.latent_dim={latent_dim}", f"model.free_bits={free_bits}", *ANNEAL, "model.prior=mixture",
            "model.prior_components=128"]


CONFIGS = {  # name: (label, overrides); a "-seedN" name repeats its row with train.seed=N
    "lm": ("LSTM-LM", LM),
    "vae": ("VAE (no defence)", VAE),
    "vae-anneal-wd": ("VAE + linear KL annealing + word dropout 0.25", [*VAE, *ANNEAL, "model.word_dropout=0.25"]),
    "vae-cyclical": ("VAE + cyclical KL (4 cycles)",
                     [*VAE, "model.beta_schedule=cyclical", "model.anneal_steps={quarter}"]),
    "vae-fb": ("VAE + free bits 0.15/dim + linear annealing", [*VAE, "model.free_bits=0.15", *ANNEAL]),
    "vae-fb-total": ("VAE + free bits 4 nats in total + linear annealing",
                     [*VAE, "model.free_bits=4", "model.free_bits_mode=total", *ANNEAL]),
    "vae-fb-elbo": ("VAE + free bits 0.15/dim for 3/4 of the run, then the plain ELBO",
                    [*VAE, "model.free_bits=0.15", "model.free_bits_until={three_quarters}", *ANNEAL]),
    "vae-fb-mix": ("VAE + free bits 0.15/dim + linear annealing + a learned mixture prior (128 components)",
                   mixture_recipe(32, 0.15)),
    "vae-fb-z16": ("VAE + free bits 0.3/dim + linear annealing, 16-dimensional z",
                   [*VAE, "model.latent_dim=16", "model.free_bits=0.3", *ANNEAL]),
    "vae-fb-z16-mix": ("VAE + free bits 0.3/dim + linear annealing, 16-dimensional z, mixture prior",
                       mixture_recipe(16, 0.3)),
    "vae-fb-z8-mix": ("VAE + free bits 0.5/dim + linear annealing, 8-dimensional z, mixture prior",
                      mixture_recipe(8, 0.5)),
    "vae-fb04-z8-mix": ("VAE + free bits 0.4/dim + linear annealing, 8-dimensional z, mixture prior (128 components)",
                        mixture_recipe(8, 0.4)),
    "vae-bn": ("BN-VAE, gamma 0.5 (Zhu et al. 2020)", [*VAE, "model.bn_gamma=0.5"]),
    "vae-aggressive": ("VAE + aggressive encoder (He et al. 2019)", [*VAE, "model.aggressive=true"]),
}
for _name, _seeds in {"lm": (2, 3), "vae-fb-z16-mix": (2,), "vae-fb-z8-mix": (2,), "vae-fb04-z8-mix": (2, 3)}.items():
    for _seed in _seeds:
        _label, _overrides = CONFIGS[_name]
        CONFIGS[f"{_name}-seed{_seed}"] = (f"{_label}, seed {_seed}", [*_overrides, f"train.seed={_seed}"])
MAIN_TABLE = ["lm", "vae", "vae-anneal-wd", "vae-cyclical", "vae-fb", "vae-fb-total", "vae-fb04-z8-mix"]
TRAIN = ["train.batch_size=32", "train.lr=2e-3", "train.warmup_steps=100", "train.weight_decay=0.0",
         "train.eval_interval={quarter}", "train.eval_tokens=20000", "train.sample_tokens=0", "train.log_interval=50",
         "model.block_size=96"]


@torch.no_grad()
def test_figures(run_dir: Path, data_dir: Path, iw_samples: int, batch_size: int = 32) -> dict[str, float]:
    run = load_run(run_dir, checkpoint="best")
    model, tok = run.model, run.tokenizer
    data = open_data_dir(data_dir)
    sentences = find_sentences(data.tokens("test"), tok.eos_id, model.block_size)
    total, tokens = 0.0, 0
    generator = torch.Generator().manual_seed(0)
    is_vae = hasattr(model, "latent_dim")
    started = time.perf_counter()
    for x, y in sentence_batches(sentences, batch_size, tok.bos_id, tok.pad_id):
        tokens += int((y != IGNORE_INDEX).sum())
        if is_vae:
            iw, _ = importance_weighted_nll(model, x, y, samples=iw_samples, chunk=min(iw_samples, 25),
                                            generator=generator)
            total += float(iw.sum())
        else:
            total += float(model.nll(x, y))
    out = {"sentences": len(sentences), "tokens": tokens, "nll": total / len(sentences),
           "ppl": math.exp(total / tokens), "eval_seconds": time.perf_counter() - started}
    if is_vae:
        report = latent_report(model, sentence_batches(sentences, batch_size, tok.bos_id, tok.pad_id))
        out.update(kl=report.kl, mi=report.mutual_info, au=report.active_units, latent_dim=report.latent_dim)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/ptb", help="where data and runs go")
    parser.add_argument("--only", default=",".join(MAIN_TABLE), help=f"configurations, of: {', '.join(CONFIGS)}")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--iw-samples", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0 = default)")
    args = parser.parse_args()
    unknown = [n for n in args.only.split(",") if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}: use {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    data_dir = work / "data"
    if not (data_dir / "meta.json").is_file():
        prepare([PTB / "ptb.train.txt"], data_dir, tokenizer="word", val_file=PTB / "ptb.valid.txt",
                test_file=PTB / "ptb.test.txt", sentences=True)
    steps = args.max_steps
    fill = {"half": steps // 2, "quarter": max(1, steps // 4), "three_quarters": 3 * steps // 4}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} steps of 32 sentences per model; "
          f"IW samples {args.iw_samples}", flush=True)
    rows = []
    for name in args.only.split(","):
        label, overrides = CONFIGS[name]
        items = [o.format(**fill) for o in [*overrides, *TRAIN]] + [f"train.max_steps={steps}",
                                                                   f"train.threads={args.threads}"]
        config = resolve_config({}, items)
        run_dir = work / name
        if not (run_dir / "results.done").is_file():  # (re)train unless a finished run is there
            shutil.rmtree(run_dir, ignore_errors=True)
            result = train(config, data_dir, run_dir, show_progress=False)
            (run_dir / "results.done").write_text(str(result.elapsed))
            seconds = result.elapsed
        else:
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            seconds = max(r["elapsed"] for r in records)
        cached = run_dir / f"figures-iw{args.iw_samples}.json"
        if cached.is_file():
            figures = json.loads(cached.read_text())
        else:
            figures = test_figures(run_dir, data_dir, args.iw_samples)
            figures.update(name=name, label=label, train_seconds=seconds,
                           parameters=sum(p.numel() for p in load_run(run_dir).model.parameters()))
            cached.write_text(json.dumps(figures))
        rows.append(figures)
        print(json.dumps(figures), flush=True)
    print("\n| model | test NLL (nats/sentence) | PPL | KL | MI | AU | params | train time |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = "exact" if "kl" not in r else f"IW k={args.iw_samples}"
        latent = (f"{r['kl']:.2f} | {r['mi']:.2f} | {r['au']}/{r.get('latent_dim', 32)}" if "kl" in r else "— | — | —")
        print(f"| {r['label']} | {r['nll']:.2f} ({kind}) | {r['ppl']:.1f} | {latent} | {r['parameters'] / 1e6:.2f}M | "
              f"{r['train_seconds'] / 60:.1f} min |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
