"""The decoding loop's own cost per step: ``generate_batch`` on a 4 x 128 `gpt` with the compiled decoding step
replaced by a stub that returns fixed logits, so what is timed is the loop's Python (choosing tokens, the rows'
bookkeeping, the cache's slots), not arithmetic. Minimum over repeats, microseconds per step.

Run it under two checkouts to compare them in one sitting (the library is whatever ``glmlab`` imports):

    python benchmarks/decode_overhead.py --batch 1
    PYTHONPATH=/path/to/other/checkout python benchmarks/decode_overhead.py --batch 1
"""

from __future__ import annotations

import argparse
import time
import types

import torch

import glmlab.models.gpt as gpt
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models.gpt import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--steps", type=int, default=2000, help="tokens per row per repeat")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=args.steps * 2, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0)).eval()
    fixed = torch.randn(args.batch, 65)
    gpt.scripted_decode_layers = lambda: (lambda *a, **k: fixed)  # the step's arithmetic gone
    tokenizer = types.SimpleNamespace(eos_id=-1, kind="bpe", encode=lambda text: [], decode=lambda ids, **k: "")
    prompts = torch.randint(0, 65, (args.batch, 16), generator=torch.Generator().manual_seed(1)).tolist()
    settings = GenerationSettings(max_new_tokens=args.steps, temperature=0, stop_at_eos=False)
    generate_batch(model, tokenizer, prompts, settings)
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        generate_batch(model, tokenizer, prompts, settings)
        best = min(best, time.perf_counter() - started)
    print(f"batch {args.batch}: {best * 1e6 / args.steps:.2f} us per step (the loop without the model's arithmetic)")


if __name__ == "__main__":
    main()
