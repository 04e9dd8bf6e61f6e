"""Training-step throughput: glmlab's `gpt` against Hugging Face `GPT2LMHeadModel`, same shapes, one run.

Both models get identical weights (glmlab's layout is GPT-2's, so a plain copy), the same batches,
the same fused AdamW and the same loss; their steps are interleaved in rounds so machine noise hits
both alike. Prints tokens/s of each and the ratio, per shape and precision.

    python benchmarks/train_throughput.py                 # both shapes, fp32 and bf16
    python benchmarks/train_throughput.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from glmlab.models.gpt import GPT, GPTConfig
from glmlab.runtime import autocast, cpu_has_fast_bf16, resolve_precision

SHAPES = {  # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "nanoGPT CPU recipe (4x128, block 64, batch 12)": (4, 4, 128, 64, 12),
    "6x384, block 256, batch 8": (6, 6, 384, 256, 8),
}
VOCAB = 65  # Tiny Shakespeare's characters


def build_pair(n_layer: int, n_head: int, n_embd: int, block: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=VOCAB, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         dropout=0.0))
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
    hf.load_state_dict(ours.state_dict(), strict=False)  # same weights, same names
    return ours.train(), hf.train()


def make_step(model: torch.nn.Module, hf: bool, dtype: torch.dtype | None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ctx = autocast(torch.device("cpu"), dtype)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with ctx:
            logits = model(x).logits if hf else model(x)
            loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(step, batches, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per model per round")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    default = resolve_precision("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX: {cpu_has_fast_bf16()}, "
          f"glmlab default precision on this CPU: {'bf16' if default else 'fp32'}")
    print("| shape | precision | glmlab tokens/s | HF GPT-2 tokens/s | glmlab / HF |\n|---|---|---|---|---|")
    for name, (n_layer, n_head, n_embd, block, batch) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randint(0, VOCAB, (batch, block), generator=gen),
                    torch.randint(0, VOCAB, (batch, block), generator=gen)) for _ in range(4)]
        for precision in args.precisions.split(","):
            dtype = None if precision == "fp32" else torch.bfloat16
            ours, hf = build_pair(n_layer, n_head, n_embd, block)
            steps = {"glmlab": make_step(ours, False, dtype), "hf": make_step(hf, True, dtype)}
            for fn in steps.values():
                measure(fn, batches, 3)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(args.rounds):
                for key, fn in steps.items():
                    times[key].append(measure(fn, batches, args.steps))
            tokens = batch * block * args.steps
            rate = {k: tokens / statistics.median(v) for k, v in times.items()}
            mark = " (default)" if (dtype is None) == (default is None) else ""
            print(f"| {name} | {precision}{mark} | {rate['glmlab']:,.0f} | {rate['hf']:,.0f} | "
                  f"{rate['glmlab'] / rate['hf']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
