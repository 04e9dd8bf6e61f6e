"""Generation speed: glmlab's engine against Hugging Face ``generate`` on identical weights, one run.

Greedy decoding, interleaved rounds (median), and a check that both produce the same tokens. Shapes:
(a) the nanoGPT CPU recipe (4 layers, 4 heads, 128 dims, vocab 65), 256 new tokens; (b) GPT-2 small
(12 x 768, vocab 50,257, random weights), 64 new tokens; batch 1 and 8; fp32, and bf16 weights (with
the largest logit difference they cost). For (b) the script measures memory read bandwidth and
prints the bandwidth bound: weight bytes read per decoding step / bandwidth.

    python benchmarks/generate_speed.py
    python benchmarks/generate_speed.py --rounds 2 --shapes a
    python benchmarks/generate_speed.py --shapes b --weights fp32,int8
    python benchmarks/generate_speed.py --shapes a --weights fp32,compiled   # --compile-decode's step too

``compiled`` is fp32 weights decoded by the step compiled ahead of time (``--compile-decode``); its compilation
(or its load from the cache, ``$GLMLAB_CACHE_DIR``) happens before the timed rounds and is printed apart.
``--hf-compiled`` adds Hugging Face's own compiled path beside its default one: a static cache
(``cache_implementation="static"``) and ``torch.compile`` of the model's forward (``generate`` compiles by itself
on CUDA only, so the script compiles it); its compilation also happens before the timed rounds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
import types

import torch

from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models.gpt import GPT, GPTConfig

SHAPES = {  # name: (n_layer, n_head, n_embd, vocab, block, new tokens)
    "a": ("nanoGPT CPU shape (4x128, vocab 65)", 4, 4, 128, 65, 512, 256),
    "b": ("GPT-2 small shape (12x768, vocab 50,257)", 12, 12, 768, 50257, 1024, 64),
}
PROMPT_LEN = 16


def read_bandwidth(megabytes: int = 1024) -> float:
    """Bytes per second this machine reads from memory (summing a large fp32 tensor, best of 5)."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


@torch.inference_mode()
def max_decode_diff(model: GPT, reference: GPT, prompts: torch.Tensor) -> float:
    """Largest logit difference of one decoding step of ``model`` (in its decode format and step) against fp32
    weights decoded by the scripted step."""
    def step_logits(m: GPT) -> torch.Tensor:
        cache = m.new_cache(prompts.size(0), torch.device("cpu"))
        m(prompts[:, :-1], cache)
        return m(prompts[:, -1:], cache)[:, -1].float()

    measured = step_logits(model)
    saved = reference.decode_weight_format, reference.decode_compiled  # (the reference may be the model itself)
    reference.set_decode_compiled(False)
    reference.set_decode_weights("native")
    expected = step_logits(reference)
    reference.set_decode_weights(saved[0])
    reference.set_decode_compiled(saved[1])
    return (measured - expected).abs().max().item()


def build_pair(n_layer, n_head, n_embd, vocab, block):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head, bos_token_id=None,
        eos_token_id=None)).eval()
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         dropout=0.0)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)  # the same weights: a plain copy
    return ours, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="a,b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--weights", default="fp32,bf16,int8",
                        help="which weights to time (bf16 is slow on a CPU without native bf16: AVX2 emulates it); "
                             "'compiled': fp32 with --compile-decode's step")
    parser.add_argument("--hf-compiled", action="store_true",
                        help="also time transformers with a static cache and torch.compile of its forward")
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, memory read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("| shape | batch | weights | glmlab tokens/s | HF tokens/s | glmlab / HF | same tokens | "
          "max logit diff vs fp32 | bandwidth bound tokens/s (batch 1) |"
          + (" HF compiled tokens/s | glmlab / HF compiled | same tokens |" if args.hf_compiled else "")
          + "\n" + "|---" * (12 if args.hf_compiled else 9) + "|")
    tokenizer = types.SimpleNamespace(eos_id=-1, kind="bpe", encode=lambda text: [], decode=lambda ids, **kw: "")
    for key in args.shapes.split(","):
        name, n_layer, n_head, n_embd, vocab, block, new = SHAPES[key]
        ours32, hf32 = build_pair(n_layer, n_head, n_embd, vocab, block)
        gen = torch.Generator().manual_seed(1)
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=gen)
            kinds = {"fp32": ("fp32", torch.float32), "bf16": ("bf16", torch.bfloat16), "int8": ("int8 (glmlab)", None),
                     "compiled": ("fp32, compiled step", torch.float32)}
            for weights in args.weights.split(","):
                label, dtype = kinds[weights]
                ours = ours32 if dtype != torch.bfloat16 else GPT(ours32.config).to(dtype).eval()
                hf = hf32 if dtype != torch.bfloat16 else copy.deepcopy(hf32).to(dtype)
                if dtype == torch.bfloat16:
                    ours.load_state_dict(ours32.state_dict())
                ours32.set_decode_compiled(False)
                ours32.set_decode_weights("int8" if dtype is None else "native")
                ours32.set_decode_compiled(weights == "compiled")
                settings = GenerationSettings(max_new_tokens=new, temperature=0, stop_at_eos=False)

                def run_ours(ours=ours, settings=settings, prompts=prompts):
                    out = generate_batch(ours, tokenizer, prompts.tolist(), settings)
                    return [c[0].token_ids for c in out]

                def run_hf(hf=hf, prompts=prompts, new=new, **options):
                    with torch.no_grad():
                        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0, **options)
                    return out[:, PROMPT_LEN:].tolist()

                if dtype is None:
                    generate_batch(ours, tokenizer, prompts.tolist()[:1],  # quantize once, outside the timing
                                   GenerationSettings(max_new_tokens=1, temperature=0))
                if weights == "compiled":  # compile (or load from the cache) once, outside the timing
                    start = time.perf_counter()
                    generate_batch(ours, tokenizer, prompts.tolist(),
                                   GenerationSettings(max_new_tokens=2, temperature=0))
                    print(f"compiled step for batch {batch}: ready in {time.perf_counter() - start:.1f} s", flush=True)
                sides = {"ours": run_ours, "hf": run_hf}
                if args.hf_compiled:
                    hf_compiled = copy.deepcopy(hf)
                    hf_compiled.forward = torch.compile(hf_compiled.forward, dynamic=False)
                    sides["hfc"] = functools.partial(run_hf, hf_compiled, cache_implementation="static")
                    start = time.perf_counter()
                    sides["hfc"]()  # compiles, outside the timing
                    print(f"transformers compiled for batch {batch} in {time.perf_counter() - start:.1f} s", flush=True)
                times: dict[str, list[float]] = {side: [] for side in sides}
                outputs = {}
                for _ in range(args.rounds):
                    for side, fn in sides.items():
                        start = time.perf_counter()
                        outputs[side] = fn()
                        times[side].append(time.perf_counter() - start)
                rate = {k: batch * new / statistics.median(v) for k, v in times.items()}
                same = outputs["ours"] == outputs["hf"]
                diff = max_decode_diff(ours, ours32, prompts)
                weight_bytes = sum(p.numel() * (1 if dtype is None else p.element_size())
                                   for p in ours.parameters() if p is not ours.transformer.wpe.weight)
                bound = bandwidth / weight_bytes if batch == 1 else float("nan")
                print(f"| {name} | {batch} | {label} | {rate['ours']:,.1f} | {rate['hf']:,.1f} | "
                      f"{rate['ours'] / rate['hf']:.2f} | {same} | {diff:.2e} | "
                      f"{'' if batch != 1 else f'{bound:,.1f}'} |"
                      + (f" {rate['hfc']:,.1f} | {rate['ours'] / rate['hfc']:.2f} | "
                         f"{outputs['ours'] == outputs['hfc']} |" if args.hf_compiled else ""), flush=True)


if __name__ == "__main__":
    main()
