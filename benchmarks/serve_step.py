"""What the server's model thread costs on its own: the continuous batch's step at 1 and 16 rows, the prefill
of a joining request, and whether the model's compute overlaps Python work on another thread.

``serve_load.py`` measures the server from outside; this script takes the model thread alone, in one
process, so the two can be compared:

- **step**: a :class:`~glmlab.generation.continuous.ContinuousBatch` kept at N rows the way
  ``serve_load.py`` loads the server (its eight prompts in turn, 64 tokens each at temperature 0.8, a new
  request joining as one finishes). 16 x (1-row step) / (16-row step) is how the model thread alone
  scales from one client to sixteen; a server's ratio moves from it by how its own per-token work
  compares at the two loads.
- **prefill**: a joining request's prompt through the family's compiled ``prefill_rows`` against the
  general module-by-module forward, per prompt length, and sixteen of serve_load's prompts joining at
  once (``prefill_rows`` runs the matrix products on the real tokens only; the forward on the padding too).
- **overlap**: the 16-row decode called right after waking a thread that runs 0.5 ms of Python (as a
  server's event loop does when a step's tokens arrive). If the model's compute ran beside it, the call
  would take as long as alone.

    python benchmarks/serve_step.py
    python benchmarks/serve_step.py --steps 1000 --run runs/shakespeare-char
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch
from serve_load import PROMPTS, ROOT  # the same requests as the load test

from glmlab.generation.continuous import ContinuousBatch
from glmlab.generation.settings import GenerationSettings
from glmlab.runs import load_run


def step_time(model: torch.nn.Module, tokenizer, rows: int, steps: int) -> float:
    """Seconds per step of a batch kept at ``rows`` rows of 64-token requests."""
    batch = ContinuousBatch(model, tokenizer, 64)
    added = 0

    def add() -> None:
        nonlocal added
        settings = GenerationSettings(max_new_tokens=64, temperature=0.8, seed=added, stop_at_eos=False)
        batch.add(added, tokenizer.encode(PROMPTS[added % len(PROMPTS)]), settings)
        added += 1

    for _ in range(rows):
        add()
    for i in range(steps + 200):  # the first 200 steps warm up
        if i == 200:
            started = time.perf_counter()
        for event in batch.step():
            if event.completion is not None:
                add()
    return (time.perf_counter() - started) / steps


def timed(fn, n: int) -> float:
    for _ in range(max(10, n // 10)):
        fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def prefill_times(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[float, float]:
    """Seconds to prefill ``prompts`` together (right-padded) into empty slots: the compiled, packed
    ``prefill_rows`` and the general forward."""
    cache = model.new_cache(len(prompts), torch.device("cpu"))
    lengths, slots = [len(p) for p in prompts], list(range(len(prompts)))
    idx = torch.tensor([p + [0] * (max(lengths) - len(p)) for p in prompts])

    def fast() -> None:
        for s in slots:
            cache.reset_row(s)
        model.prefill_rows(idx, cache, slots, lengths)

    def general() -> None:
        for s in slots:
            cache.reset_row(s)
        model(idx, cache, rows=slots, valid=lengths, last_only=True)

    return timed(fast, 200), timed(general, 200)


def overlap(model: torch.nn.Module, burst: float = 0.0005, calls: int = 200) -> tuple[float, float, float]:
    """The 16-row decode alone, and right after waking a thread that spins ``burst`` seconds of Python;
    also when that burst ended, after the call began (medians, seconds)."""
    cache = model.new_cache(64, torch.device("cpu"))
    rows = list(range(16))
    for r in rows:
        cache.lengths[r] = 40 + 3 * r  # rows at different positions, as in a server
    tokens = torch.randint(0, model.config.vocab_size, (16,))

    def decode() -> None:
        model.decode_rows(tokens, cache, rows)
        for r in rows:
            cache.lengths[r] -= 1

    alone = timed(decode, calls)
    wake, ends, stop = threading.Event(), [], [False]

    def spinner() -> None:
        while True:
            wake.wait()
            wake.clear()
            if stop[0]:
                return
            t = time.perf_counter()
            while time.perf_counter() - t < burst:
                pass
            ends.append(time.perf_counter())

    thread = threading.Thread(target=spinner, daemon=True)
    thread.start()
    durations, offsets = [], []
    for _ in range(calls):
        before = len(ends)
        t0 = time.perf_counter()
        wake.set()
        decode()
        durations.append(time.perf_counter() - t0)
        while len(ends) == before:
            time.sleep(0.0001)
        offsets.append(ends[-1] - t0)
        time.sleep(0.002)
    stop[0] = True
    wake.set()
    thread.join()
    return alone, statistics.median(durations), statistics.median(offsets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "shakespeare-char")
    ap.add_argument("--steps", type=int, default=2000, help="timed steps per batch size")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads (the server's default: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    model, tokenizer = run.model.eval(), run.tokenizer
    with torch.inference_mode():
        one = step_time(model, tokenizer, 1, args.steps)
        sixteen = step_time(model, tokenizer, 16, args.steps)
        print(f"step, 1 row: {one * 1e3:.3f} ms ({1 / one:,.0f} tokens/s)")
        print(f"step, 16 rows: {sixteen * 1e3:.3f} ms ({16 / sixteen:,.0f} tokens/s)")
        print(f"16 rows vs 1: {16 * one / sixteen:.2f}x the tokens/s (the model thread's own scaling)")
        if hasattr(model, "prefill_rows"):
            for n in (1, 8, 16, 32):
                fast, general = prefill_times(model, [list(range(4, 4 + n))])
                print(f"prefill of {n} tokens: prefill_rows {fast * 1e3:.3f} ms, general forward "
                      f"{general * 1e3:.3f} ms")
            joining = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(16)]
            fast, general = prefill_times(model, joining)
            print(f"prefill of 16 joining prompts ({sum(map(len, joining))} tokens, padded to "
                  f"{16 * max(map(len, joining))}): prefill_rows {fast * 1e3:.3f} ms, general forward "
                  f"{general * 1e3:.3f} ms")
        if hasattr(model, "decode_rows"):
            alone, beside, ended = overlap(model)
            print(f"16-row decode: alone {alone * 1e3:.3f} ms; right after waking 0.5 ms of Python on another "
                  f"thread {beside * 1e3:.3f} ms (the Python ended {ended * 1e3:.3f} ms into the call)")


if __name__ == "__main__":
    main()
