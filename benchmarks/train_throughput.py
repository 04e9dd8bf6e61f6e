"""Training-step throughput: glmlab's `gpt` against Hugging Face `GPT2LMHeadModel`, same shapes, one run.

Both models get identical weights (glmlab's layout is GPT-2's, so a plain copy), the same batches,
the same fused AdamW, clipping and loss; their steps are interleaved in rounds so machine noise hits
both alike. Also measured: this machine's matmul peak (1024² fp32 and bf16) and each row's model FLOP
utilisation (MFU) against the peak of its precision, and glmlab with ``torch.compile``.

    python benchmarks/train_throughput.py              # both shapes, fp32 (and bf16 where fast), eager + compiled
    python benchmarks/train_throughput.py --rounds 3 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.transformer import SLOW_BF16_ATTENTION, attend_in_fp32, measured_attention_slowdown
from glmlab.runtime import autocast, cpu_has_fast_bf16, resolve_precision
from glmlab.training.tasks import LossModule

SHAPES = {  # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "nanoGPT CPU recipe (4x128, block 64, batch 12)": (4, 4, 128, 64, 12),
    "6x384, block 256, batch 8": (6, 6, 384, 256, 8),
}
VOCAB = 65  # Tiny Shakespeare's characters


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 30) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on this machine's threads (best of 3)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - start))
    return best


def flops_per_token(n_layer: int, n_embd: int, block: int) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores and mixing."""
    weights = n_layer * 12 * n_embd ** 2 + VOCAB * n_embd  # blocks + (tied) LM head
    return 6 * weights + 12 * n_layer * block * n_embd


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


def make_step(model: torch.nn.Module, hf: bool, dtype: torch.dtype | None, batch_size: int, compile_: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ctx = autocast(torch.device("cpu"), dtype)
    if hf:
        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x).logits.float().view(-1, VOCAB), y.view(-1))
    else:
        loss_fn = LossModule(model)  # exactly what glmlab's trainer runs
        if dtype == torch.bfloat16:  # and where the trainer measures fp32 attention faster, so does this step
            slowdown = measured_attention_slowdown(model, batch_size, model.block_size)
            attend_in_fp32(model, slowdown is not None and slowdown >= SLOW_BF16_ATTENTION)
        if compile_:
            loss_fn = torch.compile(loss_fn)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with ctx:
            loss = loss_fn(x, y)
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
    parser.add_argument("--precisions", default="fp32,bf16" if cpu_has_fast_bf16() else "fp32",
                        help="comma-separated; bf16 by default only where bf16 matmuls run fast here (AMX, or "
                             "measured 1.5x fp32's): elsewhere bf16 is slow or emulated (1 GFLOP/s on an AVX2 EPYC) "
                             "and its rows take most of an hour")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    default = resolve_precision("auto", torch.device("cpu"))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fast bf16: {cpu_has_fast_bf16()}, "
          f"glmlab default precision on this CPU: {'bf16' if default else 'fp32'}")
    print(f"peak (1024² matmul): fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    print("| shape | precision | glmlab tokens/s | glmlab compiled tokens/s | HF GPT-2 tokens/s | glmlab / HF | "
          "best / HF | MFU (best) |\n|---|---|---|---|---|---|---|---|")
    for name, (n_layer, n_head, n_embd, block, batch) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randint(0, VOCAB, (batch, block), generator=gen),
                    torch.randint(0, VOCAB, (batch, block), generator=gen)) for _ in range(4)]
        for precision in args.precisions.split(","):
            dtype = None if precision == "fp32" else torch.bfloat16
            ours, hf = build_pair(n_layer, n_head, n_embd, block)
            steps = {"glmlab": make_step(ours, False, dtype, batch), "hf": make_step(hf, True, dtype, batch)}
            if not args.no_compile:
                compiled, _ = build_pair(n_layer, n_head, n_embd, block)
                steps["compiled"] = make_step(compiled, False, dtype, batch, compile_=True)
            for fn in steps.values():
                measure(fn, batches, 3)  # warm-up (and compilation)
            times: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(args.rounds):
                for key, fn in steps.items():
                    times[key].append(measure(fn, batches, args.steps))
            tokens = batch * block * args.steps
            rate = {k: tokens / statistics.median(v) for k, v in times.items()}
            best = max(rate["glmlab"], rate.get("compiled", 0.0))
            mfu = best * flops_per_token(n_layer, n_embd, block) / peaks[precision]
            mark = " (default)" if (dtype is None) == (default is None) else ""
            compiled_text = f"{rate['compiled']:,.0f}" if "compiled" in rate else "-"
            print(f"| {name} | {precision}{mark} | {rate['glmlab']:,.0f} | {compiled_text} | {rate['hf']:,.0f} | "
                  f"{rate['glmlab'] / rate['hf']:.2f} | {best / rate['hf']:.2f} | {mfu:.0%} |",
                  flush=True)


if __name__ == "__main__":
    main()
