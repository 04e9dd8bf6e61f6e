"""Continued pre-training (issue 21): a gpt pre-trained on WikiText-2, continued on SST-2's text with
``glmlab train --init``, then fine-tuned on SST-2 — against the same model fine-tuned without the continuation.

--base: a gpt run pre-trained on lower-cased WikiText-2 (e.g. benchmarks/autoencoding.py's ``gpt-SEED`` run).
The continuation reads the text of SST-2's training phrases except the 2,000 the fine-tunes hold out for
validation (labels never), encoded with the base run's tokenizer (``prepare --tokenizer-from``), for --minutes
at lr 3e-4 (warm-up 50, cosine), batches of 32 windows of the base's context. Both fine-tunes are
benchmarks/autoencoding.py's: a head on the last token, --sst2-steps steps at lr 1e-4, batch 32, the same seed;
accuracy on SST-2 dev.

    python benchmarks/continued_pretraining.py --base /tmp/glmlab-autoencoding/gpt-1337 --minutes 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoencoding import HELD_OUT, SHARED, sst2, sst2_rows, steps_done  # noqa: E402 — the same fine-tune as the autoencoding table

from glmlab.data.prepare import prepare  # noqa: E402
from glmlab.interop.sources import initial_weights, tokenizer_from  # noqa: E402
from glmlab.training.initial import init_config  # noqa: E402
from glmlab.training.trainer import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a gpt run pre-trained on WikiText-2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/glmlab-continued"))
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder holding sst2/")
    parser.add_argument("--minutes", type=float, default=8.0, help="continued pre-training wall clock")
    parser.add_argument("--sst2-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    _, lines = sst2_rows(args.shared)  # as autoencoding.sst2 holds out its validation phrases
    text = work / "sst2-text.jsonl"
    text.write_text("".join(json.dumps({"text": line.split("\t")[0].strip()}) + "\n" for line in lines[HELD_OUT:]))
    data, continued = work / "data-sst2", work / "continued"
    if not (data / "meta.json").is_file():
        prepare([text], data, existing=tokenizer_from(args.base))
    if not (continued / "best" / "model.safetensors").is_file():
        shutil.rmtree(continued, ignore_errors=True)  # an interrupted attempt
        init = initial_weights(args.base)
        config = init_config(init, {}, ["train.lr=3e-4", "train.warmup_steps=50", "train.batch_size=32",
                                        "train.max_steps=1000000", f"train.max_time={args.minutes * 60}",
                                        "train.eval_interval=200", "train.sample_tokens=0", f"train.seed={args.seed}",
                                        f"train.threads={args.threads}"])
        result = train(config, data, continued, show_progress=False, init=init)
        print(f"continued pre-training: {result.step} steps, val loss {result.best_val_loss:.4f}", flush=True)
    accuracy = {name: sst2(work, args.shared, run, name, args.sst2_steps, args.seed, args.threads, pooling="last")
                for name, run in (("base", args.base), ("continued", continued))}
    steps = steps_done(continued)
    print(f"\nSST-2 dev accuracy after {args.sst2_steps} fine-tuning steps (head on the last token), seed {args.seed}; "
          f"continuation: {steps} steps in {args.minutes:g} min on SST-2's training text\n")
    print("| start | SST-2 dev accuracy |\n|---|---|")
    print(f"| {args.base} (WikiText-2 only) | {accuracy['base']:.3f} |")
    print(f"| + {args.minutes:g} min on SST-2 text (--init) | {accuracy['continued']:.3f} |")


if __name__ == "__main__":
    main()
