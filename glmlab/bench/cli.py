"""``glmlab bench oracle``: argument parsing and printing only (the experiment: :mod:`glmlab.bench.oracle`)."""

from __future__ import annotations

import argparse

from glmlab.bench.preset import CPU_MLE_STEPS, CPU_ROUNDS, DEFAULT_VARIANTS, variants_help
from glmlab.errors import GlmlabError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="built-in benchmarks (oracle: SeqGAN's synthetic-data experiment)")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="{oracle}")
    o = bench.add_parser("oracle", help="MLE then SeqGAN on the synthetic oracle; NLL-oracle and NLL-test",
                         description="Train a seqgan generator by MLE on the oracle's samples, then each "
                                     "adversarial variant chosen with --variants, each from the same MLE "
                                     "run; score 10,000 generated sequences by the oracle (NLL-oracle) and "
                                     "held-out oracle samples by the generator (NLL-test). Finished stages in "
                                     "--out are reused. KEY=VALUE overrides apply to the adversarial stages.")
    o.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="adversarial config overrides (model.*)")
    o.add_argument("--out", required=True, metavar="DIR", help="work directory (data, runs, results.json)")
    o.add_argument("--oracle", default="../shared/data/seqgan-oracle/oracle_params.npz", metavar="NPZ")
    o.add_argument("--real", default="../shared/data/seqgan-oracle/real_data.txt", metavar="TXT",
                   help="the oracle's training samples")
    o.add_argument("--mle-steps", type=parse_mle_steps, default=None, metavar="N|best",
                   help=f"MLE steps of 64 sequences (default: the CPU preset, {CPU_MLE_STEPS:,}), or best: early "
                        "stopping, the step count with the lowest validation NLL, found by a first run evaluated "
                        "every 100 steps")
    o.add_argument("--rounds", type=int, default=None,
                   help=f"adversarial rounds (default: the CPU preset, {CPU_ROUNDS})")
    o.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=variants_help())
    o.add_argument("--threads", type=int, default=0, help="PyTorch threads (0 = default)")
    o.add_argument("--oracle-samples", type=int, default=10000, help="generated sequences scored by the oracle")
    o.add_argument("--seed", type=int, default=None,
                   help="training seed of the MLE stage and the variants continuing it (default: train.seed's); "
                        "the data, held-out samples and scoring stay seeded as they are")
    o.add_argument("--temperatures", default=None, metavar="T,T,...",
                   help="also score the MLE generator and each variant sampled at these temperatures "
                        "(quality-diversity curves: MLE's is the sharpening-only frontier an adversarial variant "
                        "should beat at equal NLL-test), e.g. 0.9,0.85,0.8")
    o.set_defaults(handler=cmd_bench_oracle)


def _temperatures(text: str | None) -> list[float]:
    try:
        values = [float(t) for t in (text or "").split(",") if t.strip()]
    except ValueError:
        raise GlmlabError(f"--temperatures {text!r} is not a list of numbers", "e.g. --temperatures 0.9,0.8") from None
    if any(t <= 0 for t in values):
        raise GlmlabError(f"--temperatures {text!r}: temperatures must be above 0", "e.g. --temperatures 0.9,0.8")
    return values


def parse_mle_steps(text: str) -> int | str:
    """``--mle-steps``: a positive step count, or ``best`` (early stopping); argparse's ``type``."""
    if text == "best":
        return text
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number of steps nor 'best' "
                                         "(e.g. --mle-steps 1000, or --mle-steps best for early stopping)")
    return steps


def cmd_bench_oracle(args: argparse.Namespace) -> int:
    from glmlab.bench.oracle import format_stages, oracle_benchmark

    stages = oracle_benchmark(args.oracle, args.real, args.out, mle_steps=args.mle_steps, rounds=args.rounds,
                              variants=[v for v in args.variants.split(",") if v], overrides=args.overrides,
                              threads=args.threads, oracle_samples=args.oracle_samples, seed=args.seed,
                              temperatures=_temperatures(args.temperatures))
    print(format_stages(stages))
    return 0
