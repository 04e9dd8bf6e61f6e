"""What fill-in-the-middle training (train.fim_rate) costs per batch, against the training step it feeds.

Times RandomWindows.next_batch with and without the FIM transform (FimWindows, fim_rate 0.5, SPM share 0.5) on a
synthetic token stream with no document breaks, ~40-token and ~10-token documents, and a 4-layer, 128-wide gpt's
training step (forward, backward, AdamW) at block 64, batch 12, all in one process; prints the transform's cost
as a share of the step (the same process, so machine noise hits both).

    python benchmarks/fim_cost.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from glmlab.config import resolve_config
from glmlab.data.dataset import RandomWindows
from glmlab.data.fim import FimWindows
from glmlab.data.tokenizer import EOS_ID, FIRST_TEXT_ID
from glmlab.models import build_model


def stream(n: int, doc_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_TEXT_ID, 80, size=n)
    if doc_len:
        tokens[rng.random(n) < 1 / doc_len] = EOS_ID
    return tokens.astype(np.uint16)


def per_batch(sampler, n: int) -> float:
    sampler.next_batch()
    start = time.perf_counter()
    for _ in range(n):
        sampler.next_batch()
    return (time.perf_counter() - start) / n


def step_time(block: int, batch: int, n: int = 30) -> float:
    cfg = resolve_config({}, ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", f"model.block_size={block}",
                              "model.vocab_size=80", "model.dropout=0.0"])
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    windows = RandomWindows(stream(200_000, 40), block, batch, 0)

    def one() -> None:
        x, y = windows.next_batch()
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        one()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    print(f"threads {torch.get_num_threads()}")
    step = step_time(64, 12)
    print(f"gpt 4x128, block 64, batch 12: training step {step * 1e3:.2f} ms (median of 30)")
    for block, batch, n in ((64, 12, 200), (1024, 32, 30)):
        for doc_len in (0, 40, 10):
            tokens = stream(500_000, doc_len)
            plain = per_batch(RandomWindows(tokens, block, batch, 0), n)
            fim = per_batch(FimWindows(RandomWindows(tokens, block, batch, 0), 0.5, 0.5, 0), n)
            line = (f"block {block:>4} batch {batch}, documents ~{doc_len or 'unbroken'}: windows {plain * 1e3:.3f} "
                    f"ms, with FIM {fim * 1e3:.3f} ms: transform +{(fim - plain) * 1e3:.3f} ms")
            if block == 64:
                line += f" = {100 * (fim - plain) / step:.2f}% of the step"
            print(line)


if __name__ == "__main__":
    main()
