"""COCO captions (Texygen's real-data benchmark): MLE vs SeqGAN, BLEU and Self-BLEU next to Texygen's numbers.

Data: ../shared/data/coco-captions, train = image_coco.txt (5% carved off for validation), test and
BLEU references = test_coco.txt. Generator: SeqGAN's LSTM (embedding 32, hidden 32, as Texygen runs
it), trained by MLE, then adversarially from that MLE run. Each model generates --samples sentences
at temperature 1 (seeded); BLEU-n of each against the first 500 references and Self-BLEU among the
first 500 samples (Texygen's default "fast" mode), and BLEU against all 10,000 references (which is
where real captions land near Texygen's published MLE figures); nltk's sentence_bleu arithmetic,
smoothing method 1. Training captions are scored the same way as a reference point.

    python benchmarks/coco.py
    python benchmarks/coco.py --mle-steps 300 --rounds 2 --out /tmp/coco-smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from glmlab.bench.oracle import CPU_ADVERSARIAL, CPU_DISCRIMINATOR
from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.evaluation.sample_metrics import sample_report
from glmlab.runs import load_run
from glmlab.training.trainer import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-captions"
TEXYGEN = {  # BLEU-2..5 and Self-BLEU-2..5 on the test set (Texygen, Zhu et al. 2018)
    "MLE": ([0.731, 0.497, 0.305, 0.189], [0.916, 0.769, 0.583, 0.408]),
    "SeqGAN": ([0.745, 0.498, 0.294, 0.180], [0.950, 0.840, 0.670, 0.489]),
}
MODEL = ["model.family=seqgan", "model.block_size=40", "train.batch_size=64", "train.lr=1e-2", "train.warmup_steps=0",
         "train.lr_schedule=constant", "train.weight_decay=0", "train.grad_clip=5.0", "train.beta2=0.999",
         "train.sample_tokens=0", "train.eval_interval=500", *CPU_DISCRIMINATOR]


def samples_of(run_dir: Path, n: int, seed: int) -> list[str]:
    run = load_run(run_dir, checkpoint="last")
    tok = run.tokenizer
    ids = run.model.sample(n, run.model.block_size - 1, tok.bos_id, generator=torch.Generator().manual_seed(seed),
                           banned=[tok.pad_id, tok.unk_id, tok.bos_id])
    return [tok.decode([t for t in row if t not in (tok.eos_id, tok.pad_id)]) for row in ids.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/work/coco")
    parser.add_argument("--mle-steps", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="adversarial config overrides, e.g. model.rollout_num=8")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare([DATA / "image_coco.txt"], data, tokenizer="word", split="0.95,0.05,0",
                test_file=DATA / "test_coco.txt", sentences=True)
    references = (DATA / "test_coco.txt").read_text(encoding="utf-8").splitlines()
    base = [*MODEL, f"train.max_steps={args.mle_steps}", f"train.threads={args.threads}"]
    rows = []
    adversarial = [f"model.adv_rounds={args.rounds}", *CPU_ADVERSARIAL, "model.rollout_num=8", *args.overrides]
    for name, extra in (("MLE", []), ("SeqGAN", adversarial)):
        run_dir = out / name.lower()
        if not (run_dir / "done.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            if extra:  # from a copy of the MLE run
                shutil.copytree(out / "mle", run_dir, ignore=shutil.ignore_patterns("done.json", ".lock"))
            train(resolve_config({}, [*base, *extra]), data, run_dir, resume=bool(extra), show_progress=False)
            (run_dir / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
        samples = samples_of(run_dir, args.samples, args.seed)
        seconds = json.loads((run_dir / "done.json").read_text())["seconds"]
        rows.append((f"glmlab {name}", sample_report(samples, references),
                     sample_report(samples, references, reference_limit=None), seconds))
        print(f"{name}:\n{rows[-1][1].format()}", flush=True)
    real = (DATA / "image_coco.txt").read_text(encoding="utf-8").splitlines()[: args.samples]  # training captions
    rows.append(("real captions (train)", sample_report(real, references),
                 sample_report(real, references, reference_limit=None), 0.0))
    header = ("| model | BLEU-2 | BLEU-3 | BLEU-4 | BLEU-5 | Self-BLEU-2 | Self-BLEU-3 | Self-BLEU-4 | Self-BLEU-5 | "
              "time |\n|---|---|---|---|---|---|---|---|---|---|")
    for title, which in (("BLEU against the first 500 references (Texygen's fast mode)", 1),
                         (f"BLEU against all {len(references):,} references", 2)):
        print(f"\n{title}; Self-BLEU over the first 500 samples\n{header}")
        for row in rows:
            report = row[which]
            ours = [report.bleu[n] for n in (2, 3, 4, 5)] + [report.self_bleu[n] for n in (2, 3, 4, 5)]
            print(f"| {row[0]} | " + " | ".join(f"{v:.3f}" for v in ours) + f" | {row[3] / 60:.1f} min |")
        for name, (b, sb) in TEXYGEN.items():
            print(f"| Texygen {name} (published) | " + " | ".join(f"{v:.3f}" for v in b + sb) + " | |")


if __name__ == "__main__":
    main()
