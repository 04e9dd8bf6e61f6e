"""What structured output costs per generated token: the same `gpt` decodes the same number of tokens free and
under a grammar, alternately, and the difference per token is the grammar's (llguidance's mask for each row,
applied to the logits, and the token's acceptance). The grammar never completes (``root ::= [a-z ]+`` in GBNF,
and a JSON schema whose one property is an unbounded string), so every row runs to ``--tokens``.

    python benchmarks/structured_output.py --vocab 4096
    python benchmarks/structured_output.py --vocab 50257 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from glmlab.data.corpus import default_corpus_path
from glmlab.data.tokenizer import train_bpe
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.generation.grammar import Grammar, compiler
from glmlab.models.gpt import GPT, GPTConfig

GRAMMARS = {"gbnf [a-z ]+": Grammar("gbnf", "root ::= [a-z ]+"),
            "json schema": Grammar("json_schema", json.dumps({"type": "object", "properties": {
                "text": {"type": "string"}}, "required": ["text"]}))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary (trained on the bundled corpus)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = default_corpus_path().read_text(encoding="utf-8")
    tok = train_bpe([text * max(1, args.vocab // 4096)], args.vocab)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=args.tokens + 16, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0)).eval()
    started = time.perf_counter()
    compiler(tok, model.vocab_size)
    print(f"BPE {tok.vocab_size} tokens, 4 x 128 gpt, batch {args.batch}, {args.tokens} tokens per row, "
          f"{args.threads} thread(s); llguidance's view of the tokenizer built in "
          f"{(time.perf_counter() - started) * 1000:.0f} ms")
    prompts = ["First Citizen:"] * args.batch

    def per_token(grammar: Grammar | None) -> float:
        settings = GenerationSettings(max_new_tokens=args.tokens, seed=1, temperature=1.0, stop_at_eos=False,
                                      grammar=grammar)
        started = time.perf_counter()
        out = generate_batch(model, tok, prompts, settings)
        elapsed = time.perf_counter() - started
        assert all(len(c[0].token_ids) == args.tokens for c in out), "a row ended early"
        return elapsed / args.tokens * 1e6  # per decoding step (every row advances one token)

    per_token(None)
    times: dict[str, list[float]] = {"free": [], **{name: [] for name in GRAMMARS}}
    for _ in range(args.rounds):
        times["free"].append(per_token(None))
        for name, grammar in GRAMMARS.items():
            times[name].append(per_token(grammar))
    free = statistics.median(times["free"])
    print(f"  {'decoding':<14} {'us/step':>9} {'extra us/step':>14} {'extra per row-token':>20} {'slowdown':>9}")
    for name, values in times.items():
        step = statistics.median(values)
        extra = step - free
        print(f"  {name:<14} {step:9.0f} {extra:14.0f} {extra / args.batch:20.1f} {step / free:8.2f}x")


if __name__ == "__main__":
    main()
