"""The DPO paper's first experiment, controlled sentiment generation, at CPU scale (issue 21; Rafailov et al.,
2023, section 6.1): make a language model continue movie-review prefixes positively, and measure what that
costs in KL divergence from where it started.

1. **Reward**: a sentiment classifier (``glmlab finetune classify`` on SST-2 from the base run; ``--reward RUN``
   reuses one); the reward of a text is its probability of the positive class.
2. **SFT policy**: the base run fine-tuned (``finetune sft``) to continue SST-2 phrases: prompt = the first 2-4
   words of a training phrase of 8 or more words, completion = the rest.
3. **Preference pairs**: two samples (temperature 1) from the SFT policy for each of ``--pairs`` training
   prefixes, the one with the higher reward chosen (pairs whose texts or rewards tie, or with an empty answer,
   are dropped). ``--pair-rule label``: a positive answer over a negative one, drawn at random within each class
   (``--pair-samples`` answers per prefix; a prefix whose answers are all of one class gives no pair).
4. **DPO** from the SFT policy (its frozen reference) at each ``--betas`` value (``finetune dpo``; ``--loss ipo``
   for IPO, whose tau is the beta, ``--rpo-alpha`` for RPO's likelihood term). ``--rounds R`` iterates it
   (on-policy pairs): round r samples pairs on fresh prefixes from round r - 1's policy and trains from it, with
   the SFT policy kept as the reference.
5. **Evaluation** on prefixes of held-out phrases (the 2,000 the SST-2 fine-tunes hold out, never trained on):
   ``--samples`` completions per prefix from each policy; the positive rate (reward > 0.5), the mean reward and
   the mean per-token KL to the SFT policy, sum over sampled tokens of log pi(y_t) - log pi_sft(y_t) over the
   tokens (a Monte-Carlo estimate; the end-of-text token counted where it was sampled). Against **best-of-N**
   from the SFT policy (N = 1, 2, 4, ..., ``--best-of``): the sample of highest reward among N, its KL the
   analytic log N - (N - 1) / N per sequence (Stiennon et al., 2020), per token over the chosen samples' mean
   length. And the bound no policy can pass: the least KL that buys each positive rate (the SFT policy with its
   positive answers' probabilities scaled up, per prefix, estimated from its samples). The table goes to stdout,
   the reward-KL plot to ``WORK/reward_kl.png``.

Every stage is kept in ``--work`` and skipped when present, so a run can be continued.

    python benchmarks/dpo_sentiment.py --base /work/bench-ae/gpt-1337 --reward /work/bench-ae/sst2-gpt-head-1337
    python benchmarks/dpo_sentiment.py --base RUN --pairs 200 --eval-prefixes 50 --sft-steps 50 --dpo-steps 30  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
from pathlib import Path

import torch

from glmlab.finetune import load_classifier
from glmlab.finetune.run import FinetuneOptions, finetune
from glmlab.generation.engine import start_id
from glmlab.runs import load_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoencoding import HELD_OUT, SHARED, sst2_rows, write_sst2_split  # noqa: E402 — the same SST-2 split


def phrases(shared: Path) -> tuple[list[str], list[str]]:
    """SST-2's training phrases of 8 or more words: (training, held out), the held-out ones among those the
    SST-2 fine-tunes of benchmarks/autoencoding.py keep for validation."""
    _, rows = sst2_rows(shared)
    texts = [row.split("\t")[0].strip() for row in rows]
    long = [(i, t) for i, t in enumerate(texts) if len(t.split()) >= 8]
    return [t for i, t in long if i >= HELD_OUT], [t for i, t in long if i < HELD_OUT]


def split_prefix(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    k = rng.randint(2, 4)
    return " ".join(words[:k]), " " + " ".join(words[k:])


def reward_model(args: argparse.Namespace):
    if args.reward is not None:
        return load_classifier(args.reward)
    out = args.work / "reward"
    if not (out / "results.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        train_tsv, val_tsv = write_sst2_split(args.work, args.shared)  # every phrase; the held-out ones validate
        finetune(FinetuneOptions(task="classify", init=str(args.base), train=str(train_tsv), val=str(val_tsv)),
                 out, overrides=["train.max_steps=1500", "train.eval_interval=250", "train.lr=1e-4",
                                 "train.batch_size=32", f"train.threads={args.threads}"], show_progress=False)
    return load_classifier(out)


def rewards(classifier, texts: list[str]) -> list[float]:
    return [p.probabilities["1"] for p in classifier.predict(texts)]


def sft_policy(args: argparse.Namespace, train: list[str]) -> Path:
    out = args.work / "sft"
    if not (out / "results.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        rng = random.Random(1)
        path = args.work / "sft.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for text in train:
                prompt, completion = split_prefix(text, rng)
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
        finetune(FinetuneOptions(task="sft", init=str(args.base), train=str(path), val_fraction=0.02,
                                 eval_samples=50), out,
                 overrides=[f"train.max_steps={args.sft_steps}", "train.eval_interval=250", "train.lr=1e-4",
                            "train.batch_size=32", f"train.threads={args.threads}", "train.warmup_steps=50"],
                 show_progress=False)
    return out


def sample(run, prompts: list[str], n: int, seed: int, max_new_tokens: int) -> list[list]:
    """``n`` completions (temperature 1, nothing truncated) of each prompt from a loaded run, seeded."""
    out = []
    for begin in range(0, len(prompts), 64):
        out += run.complete(prompts[begin:begin + 64], temperature=1.0, max_new_tokens=max_new_tokens,
                            num_return_sequences=n, seed=seed + begin)
    return out


def preference_pairs(args: argparse.Namespace, policy: Path, train: list[str], classifier, name: str = "prefs",
                     prefix_seed: int = 2) -> Path:
    """``--pair-samples`` completions of each of ``--pairs`` training prefixes (drawn with ``prefix_seed``) from
    ``policy`` (the SFT policy; a later round's, the last round's policy); the one of highest reward is chosen, the
    one of lowest rejected (with two samples, the DPO paper's pairs), and a pair whose rewards differ by less than
    ``--min-margin`` is dropped, as are ties and empty answers. Kept as ``WORK/NAME.jsonl``."""
    path, made_with = args.work / f"{name}.jsonl", args.work / f"{name}-settings.json"
    settings = {"pairs": args.pairs, "pair_samples": args.pair_samples, "min_margin": args.min_margin,
                "max_new_tokens": args.max_new_tokens}
    if args.pair_rule != "score":  # (recorded only when set: files made before the option stay reusable)
        settings["pair_rule"] = args.pair_rule
    if path.is_file():  # reused only if made as asked (pairs from before this record are taken as they are)
        if made_with.is_file() and json.loads(made_with.read_text()) != settings:
            sys.exit(f"{path} was made with {made_with.read_text().strip()}, not {json.dumps(settings)}: give another "
                     "--work, or remove it")
        return path
    rng = random.Random(prefix_seed)
    prompts = [split_prefix(t, rng)[0] for t in rng.sample(train, args.pairs)]
    k = args.pair_samples
    samples = sample(load_run(policy), prompts, k, seed=11, max_new_tokens=args.max_new_tokens)
    scores = rewards(classifier, [p + c.text for p, row in zip(prompts, samples, strict=True) for c in row])
    kept, pick = 0, random.Random(prefix_seed)
    with path.open("w", encoding="utf-8") as f:
        for i, (prompt, row) in enumerate(zip(prompts, samples, strict=True)):
            ranked = sorted((s, j) for j, s in enumerate(scores[k * i:k * i + k]) if row[j].text.strip())
            if len(ranked) < 2:
                continue  # DPO refuses an empty answer
            (low, worst), (high, best) = ranked[0], ranked[-1]
            if args.pair_rule == "label":  # a positive answer over a negative one, each drawn at random in its class
                positive, negative = [j for s, j in ranked if s > 0.5], [j for s, j in ranked if s <= 0.5]
                if not positive or not negative:
                    continue
                best, worst = pick.choice(positive), pick.choice(negative)
            elif high - low < max(args.min_margin, 1e-3):
                continue  # equal rewards carry no preference
            if row[best].text == row[worst].text:
                continue  # nor do equal answers
            f.write(json.dumps({"prompt": prompt, "chosen": row[best].text, "rejected": row[worst].text}) + "\n")
            kept += 1
    made_with.write_text(json.dumps(settings))
    dropped = "prefixes whose answers are all of one class" if args.pair_rule == "label" else \
        f"ties, margins under {args.min_margin}"
    print(f"preference pairs from {policy.name}: {kept} of {len(prompts)} prefixes ({k} samples each; {dropped} and "
          "empty answers dropped)", flush=True)
    return path


def dpo_policy(args: argparse.Namespace, init: Path, prefs: Path, beta: float, round_: int = 1,
               reference: Path | None = None) -> Path:
    """DPO (or ``--loss``) at ``beta`` from ``init`` on ``prefs``, against ``reference`` (default: ``init``)."""
    out = args.work / (f"dpo-beta{beta:g}" + (f"-rpo{args.rpo_alpha:g}" if args.rpo_alpha else "")
                       + (f"-{args.loss}" if args.loss != "sigmoid" else "")
                       + (f"-lora{args.lora_rank}" if args.dpo_mode == "lora" else "")
                       + (f"-round{round_}" if round_ > 1 else ""))
    if (out / "results.json").is_file():  # a finished run is reused only if it was trained as asked
        train = json.loads((out / "config.json").read_text())["train"]
        if (train["lr"], train["max_steps"]) != (args.dpo_lr, args.dpo_steps):
            sys.exit(f"{out} was trained at lr {train['lr']:g} for {train['max_steps']} steps, not --dpo-lr "
                     f"{args.dpo_lr:g} --dpo-steps {args.dpo_steps}: give another --work, or remove it")
    else:
        shutil.rmtree(out, ignore_errors=True)
        finetune(FinetuneOptions(task="dpo", init=str(init), train=str(prefs), beta=beta, val_fraction=0.05,
                                 loss=args.loss, rpo_alpha=args.rpo_alpha, mode=args.dpo_mode,
                                 lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                                 reference=None if reference is None else str(reference)), out,
                 overrides=[f"train.max_steps={args.dpo_steps}", "train.eval_interval=100", f"train.lr={args.dpo_lr}",
                            "train.batch_size=16", f"train.threads={args.threads}", "train.warmup_steps=20"],
                 show_progress=False)
    return out


def answer_rows(run, prompts: list[str], completions: list) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per completion as sampled: the start token and the prompt, then its tokens and
    the end-of-text token where it was sampled."""
    start = start_id(run.model, run.tokenizer)
    return [(([start] if start is not None else []) + run.tokenizer.encode(prompt),
             list(c.token_ids) + ([run.tokenizer.eos_id] if c.ended_at_eos else []))
            for prompt, c in zip(prompts, completions, strict=True)]


@torch.no_grad()
def sequence_logprobs(run, prompts: list[str], completions: list) -> list[tuple[float, int]]:
    """Each completion's summed log-probability under ``run``'s model given its prompt, and its token count
    (the end-of-text token included where it was sampled)."""
    model = run.model
    pairs = answer_rows(run, prompts, completions)
    rows, spans = [head + tail for head, tail in pairs], [(len(head), len(tail)) for head, tail in pairs]
    out = []
    for begin in range(0, len(rows), 64):
        batch = rows[begin:begin + 64]
        width = max(len(r) for r in batch)
        x = torch.tensor([r + [0] * (width - len(r)) for r in batch])
        logp = model(x[:, :-1]).float().log_softmax(-1)
        for j, row in enumerate(batch):
            head, n = spans[begin + j]
            targets = torch.tensor(row[head:head + n])
            picked = logp[j, head - 1:head - 1 + n].gather(-1, targets[:, None]).sum()
            out.append((float(picked), n))
    return out


def evaluate(args: argparse.Namespace, policy: Path, sft_run, prompts: list[str], classifier, n: int, seed: int
             ) -> dict:
    return measure(load_run(policy), sft_run, prompts, classifier, n, seed, args.max_new_tokens)


def measure(run, sft_run, prompts: list[str], classifier, n: int, seed: int, max_new_tokens: int) -> dict:
    """A loaded policy's ``n`` samples per prompt: positive rate, mean reward, KL to the SFT policy per token and
    per sequence, the samples and their scores."""
    samples = sample(run, prompts, n, seed, max_new_tokens)
    flat_prompts = [p for p, row in zip(prompts, samples, strict=True) for _ in row]
    flat = [c for row in samples for c in row]
    scores = rewards(classifier, [p + c.text for p, c in zip(flat_prompts, flat, strict=True)])
    mine = sequence_logprobs(run, flat_prompts, flat)
    ref = sequence_logprobs(sft_run, flat_prompts, flat)
    tokens = sum(t for _, t in mine)
    kl = sum(a - b for (a, _), (b, _) in zip(mine, ref, strict=True))
    return {"positive": sum(s > 0.5 for s in scores) / len(scores), "reward": sum(scores) / len(scores),
            "kl_per_token": kl / max(tokens, 1), "kl_per_sequence": kl / len(flat),
            "tokens_per_sample": tokens / len(flat), "scores": scores, "samples": flat}


def best_of_n(sft_eval: dict, per_prefix: int, ns: list[int]) -> list[dict]:
    """Best-of-N from the SFT policy's own samples (``per_prefix`` of them for each prefix, in order)."""
    scores, samples = sft_eval["scores"], sft_eval["samples"]
    rows = []
    for n in ns:
        chosen, lengths = [], []
        for begin in range(0, len(scores), per_prefix):
            best = max(range(begin, begin + n), key=lambda i: scores[i])
            chosen.append(scores[best])
            lengths.append(len(samples[best].token_ids) + int(samples[best].ended_at_eos))
        kl = (math.log(n) - (n - 1) / n) / (sum(lengths) / len(lengths))
        rows.append({"name": f"best-of-{n}", "positive": sum(s > 0.5 for s in chosen) / len(chosen),
                     "reward": sum(chosen) / len(chosen), "kl_per_token": kl})
    return rows


def reweighting_bound(sft_eval: dict, per_prefix: int, shifts: list[float]) -> list[dict]:
    """The least KL any policy can pay for a positive rate: for the rate as reward, the KL-regularised optimum is
    the SFT policy with each positive answer's probability multiplied by e^a and renormalised, per prefix — each
    prefix's positive rate p0 then becomes p0 e^a / (p0 e^a + 1 - p0) at the Bernoulli KL between the two rates.
    p0 is estimated from the SFT policy's ``per_prefix`` samples ((k + 0.5) / (n + 1), so that no prefix is
    hopeless); KL per token over the SFT samples' mean length."""
    scores, n = sft_eval["scores"], per_prefix
    p0s = [(sum(s > 0.5 for s in scores[b:b + n]) + 0.5) / (n + 1) for b in range(0, len(scores), n)]
    rows = []
    for a in shifts:
        rate = kl = 0.0
        for p0 in p0s:
            p = p0 * math.exp(a) / (p0 * math.exp(a) + 1 - p0)
            rate += p
            kl += p * math.log(p / p0) + (1 - p) * math.log((1 - p) / (1 - p0))
        rows.append({"name": f"optimum, e^{a:g} on positive answers (bound)", "positive": rate / len(p0s),
                     "reward": float("nan"), "kl_per_token": kl / len(p0s) / sft_eval["tokens_per_sample"]})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    best = [r for r in rows if r["name"].startswith("best-of")]
    ax.plot([r["kl_per_token"] for r in best], [r["positive"] for r in best], "o-", label="best-of-N (SFT)")
    bound = [r for r in rows if r["name"].startswith("optimum")]
    ax.plot([r["kl_per_token"] for r in bound], [r["positive"] for r in bound], "--", color="grey",
            label="least KL for the rate (bound)")
    for r in rows:
        if not r["name"].startswith(("best-of", "optimum")):
            ax.plot(r["kl_per_token"], r["positive"], "s", label=r["name"])
    ax.set_xlabel("KL to the SFT policy (nats per token)")
    ax.set_ylabel("positive rate (reward > 0.5)")
    ax.axhline(0.9, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the pre-trained run to start from")
    parser.add_argument("--reward", type=Path, default=None, help="a classifier run to use as the reward")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpo-sentiment"))
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--betas", default="0.05,0.1,0.5")
    parser.add_argument("--pairs", type=int, default=4000, help="training prefixes sampled twice for pairs")
    parser.add_argument("--pair-samples", type=int, default=2,
                        help="completions per training prefix; the best and the worst make the pair (default 2)")
    parser.add_argument("--pair-rule", default="score", choices=("score", "label"),
                        help="score: the answer of highest reward over the one of lowest (the DPO paper's pairs); "
                             "label: a positive answer (reward > 0.5) over a negative one, each drawn at random "
                             "among the prefix's answers of its class, and no pair where all answers share a class "
                             "(the preference the positive rate measures, nothing within a class)")
    parser.add_argument("--min-margin", type=float, default=0.0,
                        help="drop pairs whose rewards differ by less (default 0: only ties)")
    parser.add_argument("--eval-prefixes", type=int, default=300)
    parser.add_argument("--samples", type=int, default=4, help="completions per held-out prefix per policy")
    parser.add_argument("--best-of", type=int, default=16)
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--dpo-steps", type=int, default=600)
    parser.add_argument("--dpo-lr", type=float, default=1e-5)
    parser.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo"),
                        help="finetune dpo --loss: sigmoid (DPO) or ipo (IPO: beta is its tau)")
    parser.add_argument("--rpo-alpha", type=float, default=0.0,
                        help="finetune dpo --rpo-alpha: weight of the chosen answers' NLL (default 0: DPO alone)")
    parser.add_argument("--dpo-mode", default="full", choices=("full", "lora"),
                        help="finetune dpo --mode: full (every weight) or lora (low-rank updates, alpha 2r)")
    parser.add_argument("--lora-rank", type=int, default=8, help="--dpo-mode lora: the rank (default 8)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="iterated DPO: each later round samples --pairs fresh prefixes from the last round's "
                             "policy, ranks them by the reward and trains from that policy, the SFT policy still its "
                             "reference (finetune dpo --reference)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 (plain DPO) or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train, held = phrases(args.shared)
    classifier = reward_model(args)
    sft = sft_policy(args, train)
    prefs = preference_pairs(args, sft, train, classifier)
    rpo = f" rpo={args.rpo_alpha:g}" if args.rpo_alpha else ""
    name = "dpo" if args.loss == "sigmoid" else args.loss
    policies = {"sft": sft}
    for b in args.betas.split(","):
        policy = policies[f"{name} beta={b}{rpo}"] = dpo_policy(args, sft, prefs, float(b))
        for r in range(2, args.rounds + 1):  # iterated: pairs from the last policy, the SFT policy still the reference
            fresh = preference_pairs(args, policy, train, classifier, name=f"prefs-{policy.name}", prefix_seed=2 + r)
            policy = policies[f"{name} beta={b}{rpo} round {r}"] = dpo_policy(args, policy, fresh, float(b), r, sft)
    rng = random.Random(3)
    prompts = [split_prefix(t, rng)[0] for t in rng.sample(held, args.eval_prefixes)]
    sft_run = load_run(sft)
    rows = []
    sft_eval = evaluate(args, sft, sft_run, prompts, classifier, args.best_of, seed=101)
    rows.append({"name": "sft", **{k: sft_eval[k] for k in ("positive", "reward", "kl_per_token")}})
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.best_of]
    rows += best_of_n(sft_eval, args.best_of, ns)
    rows += reweighting_bound(sft_eval, args.best_of, [1, 1.5, 2, 2.5, 3, 4])
    for name, policy in policies.items():
        if name == "sft":
            continue
        result = evaluate(args, policy, sft_run, prompts, classifier, args.samples, seed=202)
        rows.append({"name": name, **{k: result[k] for k in ("positive", "reward", "kl_per_token")}})
        example = next(c.text for c in result["samples"])
        print(f"{name}: e.g. {prompts[0]!r} -> {example!r}", flush=True)
    print(f"\n{len(prompts)} held-out prefixes; reward: {args.reward or args.work / 'reward'}\n")
    print("| policy | positive rate | mean reward | KL to SFT (nats/token) |\n|---|---|---|---|")
    for r in rows:
        reward = "" if math.isnan(r["reward"]) else f"{r['reward']:.3f}"
        print(f"| {r['name']} | {r['positive']:.3f} | {reward} | {r['kl_per_token']:.4f} |")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.work / "reward_kl.png")
    print(f"\nplot: {args.work / 'reward_kl.png'}")


if __name__ == "__main__":
    main()
