"""Online DPO (Guo et al., 2024) on ``dpo_sentiment.py``'s controlled sentiment task (issue 21): the pairs come
from the policy being trained, not from the SFT policy once.

Each step draws ``--prefixes`` training prefixes, samples ``--k`` answers to each from the current policy
(temperature 1), scores them with the reward, pairs a positive answer with a negative one per prefix (each drawn
at random within its class, as ``--pair-rule label``; prefixes whose answers share a class give none) and takes one
DPO step (``glmlab.finetune.preferences.preference_loss``, optionally RPO's likelihood term) against the frozen SFT
policy, on the sampled tokens themselves. ``--token-kl λ`` adds λ times the mean over the answers' positions of
KL(π(·|context) ‖ π_ref(·|context)) between the full next-token distributions: on answers the policy sampled, the
per-token form of the KL that is measured (the KL penalty of RLHF's objective), where DPO constrains only each
pair's difference of log-ratios. No dropout (trl's ``disable_dropout``). Every ``--eval-every`` steps the
policy is measured as ``dpo_sentiment.py`` measures its policies, on the same held-out prefixes, seed and samples
per prefix: the positive rate and the mean per-token KL to the SFT policy (also per sequence), one JSON line each
(``--out``/log.jsonl). Compare with that script's best-of-N and bound rows for the same SFT policy and reward.

``--loss cdpo --label-smoothing ε`` is conservative DPO, whose optimum (β 1) is the bound's reweighting by
(1 − ε) / ε; ``--train head`` trains only an LM head of the policy's own over the SFT policy's frozen features.
``OUT/state.pt`` is kept every ``--save-every`` steps: run the same command again and it goes on from there,
with the same draws as an uninterrupted run.

    python benchmarks/dpo_online.py --sft W/sft --reward /work/bench-ae3/sst2-gpt-head-1337 --out OUT \\
        --beta 1 --lr 1e-5 --steps 1000 --eval-every 50
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.finetune import load_classifier
from glmlab.finetune.preferences import chosen_nll, preference_loss, target_logps
from glmlab.runs import load_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoencoding import SHARED  # noqa: E402
from dpo_sentiment import answer_rows, measure, phrases, rewards, sample, split_prefix  # noqa: E402


def scored_rows(run, pairs: list[tuple[str, object]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) for completions as sampled (their token ids, and the end-of-text token where it
    was sampled) after their prompts; only the completions' tokens are scored."""
    rows = answer_rows(run, [p for p, _ in pairs], [c for _, c in pairs])
    width = max(len(h) + len(t) for h, t in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (head, tail) in enumerate(rows):
        row = head + tail
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(head) - 1:len(row) - 1] = torch.tensor(tail)
    return x, y


def label_pairs(prompts: list[str], samples: list[list], scores: list[float], k: int, rng: random.Random
                ) -> list[tuple[tuple[str, object], tuple[str, object]]]:
    """(chosen, rejected) per prefix: a positive answer over a negative one, each drawn within its class."""
    pairs = []
    for i, (prompt, row) in enumerate(zip(prompts, samples, strict=True)):
        answered = [j for j in range(k) if row[j].token_ids]
        positive = [j for j in answered if scores[k * i + j] > 0.5]
        negative = [j for j in answered if scores[k * i + j] <= 0.5]
        if positive and negative:
            pairs.append(((prompt, row[rng.choice(positive)]), (prompt, row[rng.choice(negative)])))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, required=True, help="the SFT policy (dpo_sentiment.py's WORK/sft)")
    ap.add_argument("--reward", type=Path, required=True, help="the classifier run used as the reward")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo", "cdpo"))
    ap.add_argument("--label-smoothing", type=float, default=0.0,
                    help="--loss cdpo: ε, whose optimum tilts the reference by (1 - ε) / ε on the positive answers "
                         "(e^a with a = log((1 - ε) / ε), the bound's row of that a when β is 1)")
    ap.add_argument("--rpo-alpha", type=float, default=0.0)
    ap.add_argument("--token-kl", type=float, default=0.0, help="weight of the token-level KL(policy || SFT) term")
    ap.add_argument("--kl-in-reward", type=float, default=0.0, metavar="BETA",
                    help="--objective rloo: subtract BETA x each answer's sampled log-ratio to the SFT policy from its "
                         "reward before the baseline (trl's RLOO: the gradient of E[r] - BETA KL, whose optimum is the "
                         "SFT policy reweighted by exp(r / BETA), the bound's policy)")
    ap.add_argument("--objective", default="dpo", choices=("dpo", "rloo"),
                    help="dpo (default), or rloo: REINFORCE with the leave-one-out baseline on every sampled "
                         "answer, the positive label as the reward (a reference point for what a policy trained "
                         "on the reward itself reaches; with --token-kl, RLHF's KL-penalised objective)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--prefixes", type=int, default=32, help="training prefixes per step")
    ap.add_argument("--k", type=int, default=4, help="answers sampled per prefix (at least 2)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-prefixes", type=int, default=300)
    ap.add_argument("--samples", type=int, default=4, help="answers per held-out prefix when measuring")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--stop-at", type=float, default=0.95, help="stop once the measured positive rate reaches this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", default="all", choices=("all", "head"),
                    help="all: every weight (default); head: only an LM head of its own (untied from the token "
                         "embedding, which stays the SFT policy's), over the SFT policy's frozen features: the policy "
                         "is the SFT policy's logits plus a learnt linear tilt of its last hidden state")
    ap.add_argument("--save-every", type=int, default=100,
                    help="keep OUT/state.pt (policy, optimizer, step, sampler state) every this many steps; a run "
                         "started again with the same --out goes on from it")
    args = ap.parse_args()
    if args.k < 2:
        ap.error("--k must be at least 2 (pairs, and RLOO's leave-one-out baseline)")
    if args.kl_in_reward and args.objective != "rloo":
        ap.error("--kl-in-reward is for --objective rloo")
    if (args.loss == "cdpo") != (args.label_smoothing > 0):
        ap.error("--loss cdpo goes with --label-smoothing ε > 0, and only it")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    train, held = phrases(args.shared)
    rng = random.Random(3)  # dpo_sentiment.py's held-out prefixes
    eval_prompts = [split_prefix(t, rng)[0] for t in rng.sample(held, args.eval_prefixes)]
    classifier = load_classifier(args.reward)
    run, sft_run = load_run(args.sft), load_run(args.sft)
    policy, reference = run.model.eval(), sft_run.model.eval().requires_grad_(False)  # eval(): no dropout
    if args.train == "head":  # the backbone is the reference's: one forward gives both models' features
        policy.requires_grad_(False)
        policy.lm_head.weight = torch.nn.Parameter(policy.transformer.wte.weight.detach().clone())
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    def both_logits(x: torch.Tensor, with_reference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's logits (with gradients) and, if asked, the reference's, on the same rows."""
        if args.train == "head":
            with torch.no_grad():
                h = policy.features(x)
            ref = F.linear(h, reference.lm_head.weight).float() if with_reference else None
            return policy.lm_head(h).float(), ref
        logits = policy(x).float()
        with torch.no_grad():
            return logits, reference(x).float() if with_reference else None
    draw = random.Random(7)
    started, pairs_seen, first = time.time(), 0, 0
    state_path = args.out / "state.pt"
    # what a resumed run must share with the run it goes on from (--lr may change: an annealed continuation)
    settings = {k: str(v) for k, v in vars(args).items()
                if k not in ("out", "lr", "steps", "threads", "stop_at", "save_every", "eval_every")}
    if state_path.is_file():  # go on where the last run of this --out stopped
        state = torch.load(state_path, weights_only=True)  # tensors, numbers and the sampler's tuple: no code
        if state.get("settings", settings) != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            options = ", ".join("--" + k.replace("_", "-") for k in changed)
            sys.exit(f"{state_path} was saved by a run with other {options}: give another --out, or the same options")
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        draw.setstate(state["draw"])
        first, pairs_seen, started = state["step"], state["pairs"], time.time() - state["seconds"]
        print(f"resuming at step {first}", flush=True)
    with (args.out / "log.jsonl").open("a") as log:
        for step in range(first, args.steps + 1):
            if step > first and step % args.save_every == 0:
                state = {"policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "draw": draw.getstate(),
                         "step": step, "pairs": pairs_seen, "seconds": time.time() - started, "settings": settings}
                partial = state_path.with_suffix(".tmp")
                torch.save(state, partial)
                partial.replace(state_path)
            due = step % args.eval_every == 0 or step == args.steps
            if due and (step != first or first == 0 or step == args.steps):  # (a resumed step was measured before)
                with torch.no_grad():  # (dpo_sentiment.py's seed for its policies, 202)
                    result = measure(run, sft_run, eval_prompts, classifier, args.samples, 202, args.max_new_tokens)
                example = f"{eval_prompts[0]}|{result['samples'][0].text}"
                result = {k: v for k, v in result.items() if k not in ("scores", "samples")}
                result.update(step=step, pairs=pairs_seen, seconds=round(time.time() - started, 1), example=example)
                print(json.dumps(result), flush=True)
                log.write(json.dumps(result) + "\n")
                log.flush()
                if result["positive"] >= args.stop_at or step == args.steps:
                    break
            prompts = [split_prefix(t, draw)[0] for t in draw.sample(train, args.prefixes)]
            with torch.no_grad():
                samples = sample(run, prompts, args.k, 1000 + 7919 * step, args.max_new_tokens)
                scores = rewards(classifier, [p + c.text for p, row in zip(prompts, samples, strict=True)
                                              for c in row])
            if args.objective == "rloo":
                answers = [(p, c) for p, row in zip(prompts, samples, strict=True) for c in row]
                pairs_seen += len(answers)
                x, y = scored_rows(run, answers)
                logits, ref_logits = both_logits(x, bool(args.token_kl or args.kl_in_reward))
                logps, _ = target_logps(logits, y)
                reward = torch.tensor([float(score > 0.5) for score in scores]).view(-1, args.k)
                if args.kl_in_reward:
                    log_ratio = logps.detach() - target_logps(ref_logits, y)[0]
                    reward = reward - args.kl_in_reward * log_ratio.view(-1, args.k)
                advantage = reward - (reward.sum(1, keepdim=True) - reward) / (args.k - 1)  # leave-one-out baseline
                loss = -(advantage.view(-1) * logps).mean()
            else:
                pairs = label_pairs(prompts, samples, scores, args.k, draw)
                if not pairs:
                    continue
                pairs_seen += len(pairs)
                x, y = scored_rows(run, [c for c, _ in pairs] + [r for _, r in pairs])
                logits, ref_logits = both_logits(x, True)
                logps, tokens = target_logps(logits, y)
                with torch.no_grad():
                    ref_logps, _ = target_logps(ref_logits, y)
                (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref_logps.chunk(2)
                chosen_tokens, rejected_tokens = tokens.chunk(2)
                losses, _, _ = preference_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss,
                                               args.label_smoothing, chosen_tokens, rejected_tokens)
                loss = losses.mean() + (args.rpo_alpha * chosen_nll(chosen, chosen_tokens) if args.rpo_alpha else 0)
            if args.token_kl:
                scored = y != IGNORE_INDEX
                log_p, log_ref = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
                kl = (log_p.exp() * (log_p - log_ref)).sum(-1)
                loss = loss + args.token_kl * kl[scored].mean()
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
    torch.save(policy.state_dict(), args.out / "policy.pt")


if __name__ == "__main__":
    main()
