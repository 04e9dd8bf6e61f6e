"""SeqGAN's synthetic-oracle experiment on a CPU: MLE, SeqGAN, and SeqGAN with a mean reward baseline.

The same procedure as ``glmlab bench oracle`` (glmlab/bench/oracle.py), printed next to
the published anchors: the SeqGAN authors' log shows MLE ~9.07 and SeqGAN ~8.68 NLL-oracle, LeakGAN's
~7.0. Targets here: MLE within 9.07 +- 0.15, SeqGAN <= 8.75, all in <= 30 minutes.

    python benchmarks/oracle.py                       # the CPU preset
    python benchmarks/oracle.py --mle-steps 500 --rounds 5 --out /tmp/oracle-smoke
    python benchmarks/oracle.py --mle-steps best --variants seqgan --out benchmarks/work/oracle27  # early-stopped MLE
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glmlab.bench.cli import parse_mle_steps
from glmlab.bench.oracle import format_stages, oracle_benchmark
from glmlab.bench.preset import DEFAULT_VARIANTS
from glmlab.errors import GlmlabError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seqgan-oracle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/work/oracle")
    parser.add_argument("--mle-steps", type=parse_mle_steps, default=None,
                        help="MLE steps, or best: early stopping on the validation samples")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="adversarial config overrides, e.g. model.rollout_num=8")
    args = parser.parse_args()
    try:
        stages = oracle_benchmark(DATA / "oracle_params.npz", DATA / "real_data.txt", args.out, args.mle_steps,
                                  args.rounds, args.variants.split(","), args.overrides, args.threads)
    except GlmlabError as exc:  # a user mistake: its message and fix, not a traceback
        parser.exit(1, f"oracle.py: {exc}\n")
    print(format_stages(stages))
    total = sum(s.seconds for s in stages)
    print(f"\nanchors: MLE 9.07, SeqGAN 8.68 (SeqGAN authors' log), LeakGAN 7.0; total training {total / 60:.1f} min")


if __name__ == "__main__":
    main()
