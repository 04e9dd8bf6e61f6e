"""A fingerprint of glmlab's behaviour, to prove that a refactor changed none of it.

Trains short runs of every family through the CLI (gpt; lstm on windows and on sentences; a vae with
aggressive encoder updates, a KL schedule and free bits; seqgan's MLE and adversarial phases, with a learned
baseline, interleaved MLE and a KL penalty, and CoT), resumes one, fine-tunes (classify full / probe / LoRA,
sft full / LoRA), evaluates, and decodes seeded text every way there is: ``generate_batch`` with every
control, ``stream``, beam search, int8 decode weights, a vae's latent tools, the continuous batch and the
HTTP server (one-process engine). Records weight hashes, ``metrics.jsonl`` (wall-clock fields dropped),
``samples.txt``, ``results.json``, evaluation reports and every token stream and text.

    python benchmarks/behaviour_snapshot.py --write before.json    # before the change
    python benchmarks/behaviour_snapshot.py --check before.json    # after it: lists every difference

Only public surfaces are used (the CLI, ``glmlab.load``, ``ContinuousBatch``, ``create_app``), so the script
outlives the refactor it checks. One PyTorch thread: the same machine gives the same bits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

VOLATILE = {"elapsed", "tokens_per_sec", "train_seconds", "wall_seconds", "created", "id", "system_fingerprint"}
TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.1"]
TRAIN = ["train.batch_size=8", "train.eval_interval=10", "train.log_interval=5", "train.warmup_steps=5",
         "train.lr=3e-3", "train.sample_tokens=40", "train.eval_tokens=1024", "train.threads=1"]
WORDS = ["the", "a", "of", "and", "to", "my", "thou", "king", "lord", "sweet", "fair", "foul", "night", "day"]


def cli(*args: str) -> str:
    """Run ``glmlab ARGS``; its stdout (a failure is an exception naming the command and its stderr)."""
    from glmlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(list(args))
    if code != 0:
        raise RuntimeError(f"glmlab {' '.join(args)} exited {code}: {err.getvalue()}")
    return out.getvalue()


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def scrub(value: Any) -> Any:
    """Drop wall-clock fields and temporary paths, recursively."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and ("/tmp" in value or "/snapshot-" in value):
        return "<path>"
    return value


def run_record(run: Path) -> dict[str, Any]:
    """Weights, metrics, samples and results of a run directory."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record: dict[str, Any] = {"weights": sha(run / "model.safetensors"),
                              "best": sha(run / "best" / "model.safetensors"),
                              "metrics": scrub(metrics)}
    if (run / "samples.txt").is_file():
        record["samples"] = (run / "samples.txt").read_text()
    if (run / "results.json").is_file():
        record["results"] = scrub(json.loads((run / "results.json").read_text()))
    return record


def completions(completion_lists: list[list[Any]]) -> list[list[dict[str, Any]]]:
    out = []
    for row in completion_lists:
        out.append([{"text": c.text, "ids": list(c.token_ids), "finish": c.finish_reason, "prompt": c.prompt_tokens,
                     "score": c.score,
                     "logprobs": None if c.logprobs is None else [(t.token_id, t.logprob, [list(x) for x in t.top])
                                                                  for t in c.logprobs]} for c in row])
    return out


SETTINGS = [
    dict(temperature=0.0, max_new_tokens=30),
    dict(temperature=0.8, top_k=10, max_new_tokens=40, seed=1, num_return_sequences=3),
    dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, stop=["\n", "the"], logprobs=2, max_new_tokens=50, seed=2,
         num_return_sequences=2),
    dict(temperature=0.7, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, max_new_tokens=40, seed=3),
    dict(temperature=1.2, typical_p=0.8, no_repeat_ngram_size=2, bad_words=["e"], min_new_tokens=10,
         max_new_tokens=30, seed=4, num_return_sequences=2),
    dict(temperature=0.9, max_new_tokens=90, seed=5, stop_at_eos=False, logprobs=0),  # past the context: re-encodes
]
BEAMS = [dict(num_beams=3, max_new_tokens=20, num_return_sequences=2),
         dict(num_beams=4, max_new_tokens=25, length_penalty=0.5, early_stopping=True),
         dict(num_beams=2, max_new_tokens=40, early_stopping="never", no_repeat_ngram_size=3)]


def decoding(run_dir: Path, prompts: list[str]) -> dict[str, Any]:
    """Every seeded way of decoding a run through the library."""
    import glmlab

    lm = glmlab.load(run_dir)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(SETTINGS):
            out[f"batch{i}"] = completions(lm.complete(prompts, **s))
        for i, s in enumerate(BEAMS):
            out[f"beam{i}"] = completions(lm.complete(prompts[:1], **s))
        out["stream"] = list(lm.stream(prompts[0], temperature=0.9, max_new_tokens=60, seed=7, stop=["\n\n"]))
        out["stream_greedy"] = list(lm.stream(prompts[-1], temperature=0.0, max_new_tokens=60))
        out["generate"] = lm.generate(prompts[1], temperature=0.8, max_new_tokens=30, seed=9, num_samples=2)
    return out


def continuous(run_dir: Path, prompts: list[str]) -> list[Any]:
    """Rows joining and leaving a continuous batch between steps; every event."""
    import glmlab
    from glmlab.generation.continuous import ContinuousBatch
    from glmlab.generation.settings import GenerationSettings

    lm = glmlab.load(run_dir)
    tok = lm.tokenizer
    batch = ContinuousBatch(lm.model, tok, 4)
    start = [tok.bos_id] if lm.config.train.batching == "sentences" or lm.config.model.family in ("vae", "seqgan") \
        else []
    pending = [(f"r{i}", start + tok.encode(p) or [tok.eos_id],
                GenerationSettings(temperature=0.0 if i % 3 == 0 else 0.9, max_new_tokens=8 + 5 * i, seed=i,
                                   logprobs=1 if i % 2 else None, stop=["\n"] if i == 4 else []), i % 2)
               for i, p in enumerate(prompts * 3)]
    events: list[Any] = []
    steps = 0
    while (pending or batch.active) and steps < 400:
        while pending and batch.free_slots and (steps % 3 == 0 or not batch.active):
            key, ids, settings, index = pending.pop(0)
            batch.add(key, ids, settings, index)
        for e in batch.step():
            events.append([e.key, e.delta, list(e.token_ids), [(t.token_id, t.logprob) for t in e.logprobs],
                           None if e.completion is None else [e.completion.text, e.completion.finish_reason]])
        steps += 1
    return events


def server(run_dir: Path, vae: bool) -> dict[str, Any]:
    """Seeded requests to the OpenAI-compatible server (one-process engine), answers without their ids and times."""
    from fastapi.testclient import TestClient

    from glmlab.runs import load_run
    from glmlab.serve.app import ServeOptions, create_app

    app = create_app(load_run(run_dir), ServeOptions(model_name="m", max_batch=4, engine="thread"))
    out: dict[str, Any] = {}
    with TestClient(app) as client:
        if vae:
            out["sample"] = client.post("/v1/vae/sample", json={"n": 3, "seed": 2}).json()
            out["reconstruct"] = client.post("/v1/vae/reconstruct",
                                             json={"sentences": ["the good lord", "my lord"]}).json()
            out["interpolate"] = client.post("/v1/vae/interpolate", json={"start": "the good lord", "end": "a day",
                                                                          "steps": 4}).json()
        out["completion"] = scrub(client.post("/v1/completions", json={
            "prompt": ["the ", "And then"], "max_tokens": 20, "seed": 3, "n": 2, "temperature": 0.9,
            "logprobs": 2}).json())
        out["greedy"] = scrub(client.post("/v1/completions", json={"prompt": "O", "max_tokens": 25,
                                                                   "temperature": 0}).json())
        if not vae:
            out["echo"] = scrub(client.post("/v1/completions", json={
                "prompt": "the king", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}).json())
        out["chat"] = scrub(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 15, "seed": 4}).json())
        with client.stream("POST", "/v1/completions", json={"prompt": "the", "max_tokens": 15, "seed": 5,
                                                             "stream": True, "stop": ["\n"]}) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data:")]
        parsed = [json.loads(c[5:]) for c in chunks if c.strip() != "data: [DONE]"]  # chunking follows timing
        out["stream"] = ["".join(p["choices"][0]["text"] for p in parsed if p["choices"]),
                         [p["choices"][0]["finish_reason"] for p in parsed if p["choices"]][-1], chunks[-1]]
    return out


def build(work: Path, corpus: Path) -> dict[str, Any]:
    shot: dict[str, Any] = {}
    chars, words = work / "chars", work / "words"
    cli("prepare", str(corpus), "--out", str(chars), "--tokenizer", "char")
    cli("prepare", str(corpus), "--out", str(words), "--tokenizer", "word", "--vocab-size", "400", "--sentences")
    runs = work / "runs"

    def train(name: str, data: Path, *overrides: str) -> Path:
        cli("train", "--data", str(data), "--out", str(runs / name), "--quiet", *overrides)
        shot[f"run:{name}"] = run_record(runs / name)
        return runs / name

    gpt = train("gpt", chars, *TINY_GPT, *TRAIN, "train.max_steps=40")
    train("gpt-accum", chars, *TINY_GPT, *TRAIN, "train.max_steps=12", "train.grad_accum=2",
          "train.on_nonfinite=skip", "train.lr_schedule=linear", "train.patience=1")
    half = train("gpt-resumed", chars, *TINY_GPT, *TRAIN, "train.max_steps=20")
    cli("train", "--resume", "--out", str(half), "--quiet", "train.max_steps=40")
    shot["run:gpt-resumed"] = run_record(half)
    lstm = train("lstm", chars, "model.family=lstm", "model.n_embd=16", "model.n_hidden=32", "model.block_size=32",
                 *TRAIN, "train.max_steps=20")
    lstm_sent = train("lstm-sentences", words, "model.family=lstm", "model.n_embd=16", "model.n_hidden=32",
                      "model.block_size=16", "train.batching=sentences", *TRAIN, "train.max_steps=20")
    vae_keys = ["model.family=vae", "model.block_size=16", "model.n_embd=16", "model.n_hidden=32",
                "model.encoder_hidden=16", "model.latent_dim=4", "model.word_dropout=0.2", *TRAIN]
    vae = train("vae", words, *vae_keys, "model.aggressive=true", "model.aggressive_inner_steps=12",
                "model.beta_schedule=linear", "model.anneal_steps=10", "model.free_bits=0.1",
                "model.free_bits_until=15", "train.max_steps=30")
    train("vae-mixture", words, *vae_keys, "model.prior=mixture", "model.prior_components=3", "model.bn_gamma=0.5",
          "train.max_steps=12")
    gan = ["model.family=seqgan", "model.block_size=12", "model.n_embd=8", "model.n_hidden=16", "model.d_embd=8",
           "model.d_filter_sizes=1,2,3", "model.d_num_filters=8,8,8", "model.rollout_num=2", "model.adv_batch=8",
           "model.d_samples=24", "model.d_epochs=1", "model.d_pretrain_steps=2", "model.adv_rounds=4",
           "model.adv_eval_interval=2", *TRAIN, "train.max_steps=10"]
    seqgan = train("seqgan", words, *gan)
    train("seqgan-critic", words, *gan, "model.baseline=learned", "model.mle_steps=1", "model.kl_coef=0.1",
          "model.g_epochs=2")
    train("seqgan-rank", words, *gan, "model.reward=rank", "model.baseline=mean")
    train("cot", words, *gan, "model.objective=cooperative")
    tasks = work / "tasks"
    tasks.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 120), ("val", 30)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            lines.append(" ".join(rng.choices(WORDS, k=4) + ["good" if label else "evil"]) + f"\t{label}")
        (tasks / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (tasks / "pairs.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w} {w}"})
                                                 for w in rng.choices(WORDS, k=60)) + "\n")
    ft = ["train.max_steps=16", "train.eval_interval=8", "train.batch_size=8", "train.threads=1"]
    for name, init, mode, extra in (("classify-full", gpt, "full", ["--lm-weight", "0.5", "--pooling", "mean"]),
                                    ("classify-lora", gpt, "lora", ["--class-weights", "balanced"]),
                                    ("classify-probe", lstm, "probe", [])):
        out = runs / name
        cli("finetune", "classify", "--init", str(init), "--train", str(tasks / "train.tsv"), "--val",
            str(tasks / "val.tsv"), "--mode", mode, "--out", str(out), "--quiet", *extra, *ft)
        shot[f"run:{name}"] = run_record(out)
        shot[f"predict:{name}"] = cli("predict", str(out), "--text", "the king good", "--text", "evil night", "--json")
    for name, mode in (("sft-full", "full"), ("sft-lora", "lora")):
        out = runs / name
        cli("finetune", "sft", "--init", str(gpt), "--data", str(tasks / "pairs.jsonl"), "--mode", mode,
            "--eval-samples", "6", "--out", str(out), "--quiet", *ft)
        shot[f"run:{name}"] = run_record(out)
        shot[f"decode:{name}"] = decoding(out, ["say king:", "say night:"])
    for name, run in (("gpt", gpt), ("lstm", lstm), ("lstm-sentences", lstm_sent), ("vae", vae), ("seqgan", seqgan)):
        report = json.loads(cli("eval", str(run), "--split", "test", "--json", "--samples", "20",
                                "--bleu-sentences", "20"))
        shot[f"eval:{name}"] = scrub(report)
    prompts = ["ROMEO:\nO", "the ", "And so I say to you that"]
    shot["decode:gpt"] = decoding(gpt, prompts)
    shot["decode:lstm"] = decoding(lstm, prompts)
    shot["decode:lstm-sentences"] = decoding(lstm_sent, ["the good", "my", "and thou art"])
    shot["decode:seqgan"] = decoding(seqgan, ["the good", "my", "and thou art"])
    shot["generate-cli:gpt-int8"] = json.loads(cli("generate", str(gpt), "--prompt", "ROMEO:", "--seed", "3",
                                                   "--max-new-tokens", "40", "--decode-weights", "int8", "--json",
                                                   "--logprobs", "1", "--num-samples", "2"))
    import glmlab

    lm = glmlab.load(vae)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shot["vae-tools"] = {"prior": lm.sample_prior(4, seed=1), "prior_beam": lm.sample_prior(2, seed=2, num_beams=3),
                             "reconstruct": lm.reconstruct(["the king", "my lord of the night"]),
                             "reconstruct_sampled": lm.reconstruct(["the king"], sample=True, seed=3, temperature=0.8),
                             "interpolate": lm.interpolate("the king", "a day", steps=4),
                             "generate": lm.generate("", temperature=0.9, seed=1, num_samples=2, max_new_tokens=10)}
    for name, run in (("gpt", gpt), ("lstm-sentences", lstm_sent), ("vae", vae)):
        shot[f"continuous:{name}"] = continuous(run, ["the ", "And so", "O"])
    shot["server:gpt"] = server(gpt, vae=False)
    shot["server:vae"] = server(vae, vae=True)
    compare_dir = work / "compare"
    cli("compare", str(lstm_sent), str(vae), str(seqgan), "--out", str(compare_dir), "--samples", "20",
        "--iw-samples", "5", "--max-sentences", "40")
    report = (compare_dir / "report.md").read_text().replace(str(work), "<work>")
    shot["compare"] = re.sub(r"\| [0-9.]+ s \||\| \d+m \d+s \|", "| <time> |", report)  # training time
    return shot


def differences(a: Any, b: Any, path: str = "", tolerance: float = 0.0, close: list[float] | None = None,
                ) -> list[str]:
    """Every difference between two fingerprints; floats within ``tolerance`` go to ``close`` instead."""
    close = [] if close is None else close
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only before" for k in a if k not in b]
        out += [f"{path}.{k}: only after" for k in b if k not in a]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], f"{path}.{k}", tolerance, close)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]", tolerance, close)]
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b) or a == b:
            return []
        if abs(a - b) <= tolerance:
            close.append(abs(a - b))
            return []
        return [f"{path}: {a!r} -> {b!r} (diff {abs(a - b):.3g})"]
    if a != b:
        shown = lambda v: repr(v)[:120]  # noqa: E731
        return [f"{path}: {shown(a)} -> {shown(b)}"]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="FILE.json", help="write the fingerprint")
    what.add_argument("--check", metavar="FILE.json", help="compare with a fingerprint written before")
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temporary directory)")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="X",
                        help="--check: count floats that differ by at most X apart (e.g. 1e-6 for log-probabilities "
                             "computed by another kernel), and list only the rest (default 0: every bit)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from glmlab.data.corpus import default_corpus_path

    started = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="snapshot-"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(default_corpus_path().read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    try:
        shot = json.loads(json.dumps(build(work, corpus)))  # tuples as lists, as a file read back has them
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.write:
        Path(args.write).write_text(json.dumps(shot, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write}: {len(shot)} sections")
        return
    before = json.loads(Path(args.check).read_text())
    close: list[float] = []
    found = differences(before, shot, tolerance=args.tolerance, close=close)
    for line in found:
        print(line)
    if close:
        print(f"{len(close)} floats differ by at most {max(close):.3g} (within --tolerance {args.tolerance:g})")
    print(f"{len(found)} differences in {len(shot)} sections")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
