"""``glmlab bench oracle``'s CPU preset as the command line shows it: the MLE steps and adversarial rounds, and the
adversarial variants it can run, each from the same MLE run, with their config overrides and a line saying what
each is (the command's --help is made from them). No heavy imports: the command line reads this before it loads
PyTorch."""

from __future__ import annotations

from typing import NamedTuple

# 3,000 MLE steps (19 epochs) reach NLL-oracle ~9.02; longer overfits the 10,000 sequences (NLL-test rises).
CPU_MLE_STEPS = 3000
CPU_ROUNDS = 30


class Variant(NamedTuple):
    overrides: list[str]
    help: str


VARIANTS = {
    "seqgan": Variant([], "as published: 16 rollouts, no baseline, one generator update per round"),
    "seqgan-baseline": Variant(["model.baseline=mean"], "variance reduction: each position's mean reward subtracted"),
    "seqgan-critic": Variant(["model.baseline=learned"], "actor-critic's learned, state-dependent baseline"),
    "seqgan-fast": Variant(["model.rollout_num=4", "model.g_steps=3"], "4 rollouts, 3 generator updates per round"),
    "seqgan-rank": Variant(["model.reward=rank"], "LeakGAN's bootstrapped rescaled activation of the rewards"),
    "seqgan-ratio": Variant(["model.reward=logit", "model.baseline=mean"],
                            "D's log-odds as the reward, mean baseline: a reverse-KL policy gradient"),
    "seqgan-drift": Variant(["model.reward=constant"], "the ablation: reward 1 everywhere, no discriminator"),
    "seqgan-ppo": Variant(["model.g_epochs=4"], "four PPO clipped-surrogate steps per batch of rollout rewards"),
    "seqgan-mle": Variant(["model.mle_steps=1"],
                          "LeakGAN's interleaved training: an MLE update on real sentences per round"),
    "seqgan-ppo-kl": Variant(["model.g_epochs=4", "model.kl_coef=0.05"],
                             "RLHF's objective: PPO's four steps, held near the MLE generator by an exact-KL penalty"),
    "cot": Variant(["model.objective=cooperative", "model.g_lr=1e-3", "model.m_lr=1e-3",
                    "model.adv_eval_interval=500"],
                   "CoT: a mediator LM fitted to the mixture and the exact KL to it; no discriminator or rollouts"),
}
DEFAULT_VARIANTS = ("seqgan", "seqgan-baseline", "seqgan-fast")


def variants_help() -> str:
    """--variants' help: the default, then every variant with what it is."""
    return (f"comma-separated (default: {','.join(DEFAULT_VARIANTS)}): "
            + "; ".join(f"{name} ({variant.help})" for name, variant in VARIANTS.items()))
