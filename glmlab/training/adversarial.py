"""SeqGAN's adversarial phase (Yu et al. 2017), run by the trainer after MLE pre-training of a `seqgan` model.

Before the first round the discriminator D is fitted ``d_pretrain_steps`` times to real sentences
against the generator's samples. Each round then makes ``g_steps`` policy-gradient updates of the
generator G — the reward of token t is D's mean P(real) over ``rollout_num`` completions of the
prefix by the rollout policy (a slowly following copy of G), the last token's is D's score of the
sequence itself — and refits D ``d_steps`` times on fresh samples. ``baseline=mean`` subtracts each
position's mean reward over the batch (an unbiased variance reduction); ``baseline=learned`` subtracts a
critic's estimate instead, a linear value head on the generator's (detached) LSTM state of each prefix
fitted to the rewards by least squares (actor-critic's state-dependent baseline); ``reward=rank`` replaces
rewards by LeakGAN's rescaled ranks (``rank_rewards``); ``reward=logit`` scores with D's logit,
log D / (1 - D), which for a well-fitted D estimates log p_data(x) / p_G(x), so the expected update
follows -KL(G || data) (the reverse KL: NLL-oracle minus G's entropy) instead of E_G[D], whose
differences vanish as D saturates; ``reward=constant`` rewards every token 1 without asking D (an
ablation: the update's expectation is zero, so what it does is the drift of reinforcing G's own samples).
``mle_steps`` adds LeakGAN's interleaved training: teacher-forced MLE updates on real sentences each
round, with their own optimiser, so the generator keeps covering the data while the adversarial
updates sharpen it. ``kl_coef`` adds RLHF's KL-regularised objective instead: each policy-gradient
update also descends ``kl_coef`` times the exact KL(G || reference) of the next-token distributions
along G's samples, the reference being a frozen copy of the generator as MLE left it — the reward is
pursued only as far as it pays for leaving the data's model.

``objective=cooperative`` replaces the game by CoT (Lu et al. 2019): a mediator, a copy of G's network
that starts from the MLE generator, is fitted by MLE to the balanced mixture of real sentences and G's
samples, so it estimates (p_data + p_G) / 2; G takes gradient steps on the exact per-position
KL(G || mediator) over the whole vocabulary along its own samples, which estimates the Jensen-Shannon
divergence's gradient. No rollouts, no rewards, no discriminator: each update costs a few forward passes.
Every round counts as one trainer step (a :class:`~glmlab.training.phases.Phase` of the trainer's loop:
checkpoints, metrics and the stop decision are the trainer's), so resume continues mid-phase exactly. The
phase runs on one process: under torchrun it is refused (pre-train there, then resume on one process).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from glmlab.data.sentences import Sentences, collate
from glmlab.data.tokenizer import EOS_ID, PAD_ID
from glmlab.generation.sampling import sample_rows
from glmlab.models.lstm import LSTMNet, token_nll
from glmlab.models.seqgan import SeqGAN, sequence_mask
from glmlab.training.phases import RunLog


@torch.no_grad()
def sample_sequences(net: LSTMNet, n: int, length: int, bos_id: int, prefix: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, banned: list[int] | None = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """``n`` sequences (n, length) sampled at ``temperature`` from an LSTM network (a SeqGAN generator or its
    rollout policy), continuing ``prefix`` (n, t) when given; after ``<eos>`` every position is ``<pad>``.
    ``banned`` token ids get probability 0 (the rest renormalised)."""
    device = next(net.parameters()).device
    start = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
    given = start if prefix is None else torch.cat([start, prefix], dim=1)
    out, state = net.features(given)
    logits = net.logits(out[:, -1]) / temperature
    tokens = [] if prefix is None else list(prefix.unbind(1))
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in tokens:
        done |= t == EOS_ID
    for _ in range(length - len(tokens)):
        if banned:
            logits[:, banned] = float("-inf")
        token = sample_rows(logits, generator)
        token = token.masked_fill(done, PAD_ID)
        tokens.append(token)
        done |= token == EOS_ID
        out, state = net.features(token[:, None], state)
        logits = net.logits(out[:, -1]) / temperature
    return torch.stack(tokens, dim=1)


class AdversarialPhase:
    """The adversarial state of a run (D's optimiser, G's adversarial optimiser, the rollout policy), its
    steps (:meth:`round`), and its place in the trainer's loop: trainer steps ``start`` to ``start +
    adv_rounds``, one round each, evaluated every ``adv_eval_interval`` rounds; the weights after the last
    round become the run's best (the adversarial phase is what the run is for)."""

    name = "adversarial"
    selects_best = False
    one_process = ("pre-train with torchrun and model.adv_rounds=0, then resume on one process with "
                   "model.adv_rounds=N (glmlab train --resume)")

    def __init__(self, model: SeqGAN, real: Sentences, bos_id: int, device: torch.device, seed: int,
                 start: int = 0) -> None:
        self.model, self.real, self.bos_id, self.device = model, real, bos_id, device
        c = model.config
        self.config = c
        self.start, self.end = start, start + c.adv_rounds
        self._stats: dict[str, float] = {}
        self.length = c.block_size - 1  # tokens per sequence, <eos> included
        self.g_optimizer = torch.optim.Adam(model.generator_parameters(), lr=c.g_lr)
        self.d_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=c.d_lr)
        self.mle_optimizer = torch.optim.Adam(model.generator_parameters(), lr=c.g_lr)
        self.rollout = model.rollout_copy()
        self.reference = model.rollout_copy() if c.kl_coef > 0 else None  # the MLE generator, for kl_coef
        self.critic: torch.nn.Linear | None = None
        if c.baseline == "learned":  # V(prefix) from the generator's LSTM state, for baseline=learned
            self.critic = torch.nn.Linear(model.net.n_hidden, 1).to(device)
            torch.nn.init.zeros_(self.critic.weight)
            torch.nn.init.zeros_(self.critic.bias)
            self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.cooperative = c.objective == "cooperative"
        if self.cooperative:  # CoT's mediator: G's network, fitted to the mixture of real and generated sentences
            self.mediator = copy.deepcopy(model.net).train()
            self.m_optimizer = torch.optim.Adam(self.mediator.parameters(), lr=c.m_lr)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.d_pretrained = False

    # --- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        extra = {"mediator": self.mediator.state_dict(), "m_optimizer": self.m_optimizer.state_dict()} \
            if self.cooperative else {}
        if self.reference is not None:
            extra["reference"] = self.reference.state_dict()
        if self.critic is not None:
            extra.update(critic=self.critic.state_dict(), critic_optimizer=self.critic_optimizer.state_dict())
        return {**extra, "g_optimizer": self.g_optimizer.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
                "mle_optimizer": self.mle_optimizer.state_dict(), "rollout": self.rollout.state_dict(),
                "generator": self.generator.get_state(), "d_pretrained": self.d_pretrained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        if "mle_optimizer" in state:  # absent in checkpoints written before model.mle_steps existed
            self.mle_optimizer.load_state_dict(state["mle_optimizer"])
        if self.cooperative and "mediator" in state:
            self.mediator.load_state_dict(state["mediator"])
            self.m_optimizer.load_state_dict(state["m_optimizer"])
        elif self.cooperative:  # a SeqGAN phase resumed as CoT: the mediator starts from the (loaded) generator
            self.mediator.load_state_dict(self.model.net.state_dict())
        self.rollout.load_state_dict(state["rollout"])
        if self.critic is not None and "critic" in state:  # else the critic starts afresh (predicting 0)
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if self.reference is not None:  # a phase saved without kl_coef keeps the generator it resumes from
            self.reference.load_state_dict(state.get("reference", self.model.net.state_dict()))
        self.generator.set_state(state["generator"])
        self.d_pretrained = bool(state["d_pretrained"])

    # --- the discriminator --------------------------------------------------------------------------------

    def real_batch(self, n: int) -> torch.Tensor:
        """``n`` training sentences drawn with the phase's generator, as D reads them: words and ``<eos>``, then
        ``<pad>`` up to the phase's length (n, length)."""
        index = torch.randint(len(self.real), (n,), generator=self.generator, device=self.device).cpu().numpy()
        _, y = collate(self.real, index, self.bos_id, PAD_ID)
        y = y.masked_fill(y < 0, PAD_ID)
        return F.pad(y, (0, max(0, self.length - y.size(1))), value=PAD_ID)[:, : self.length].to(self.device)

    def _fake_batch(self, n: int) -> torch.Tensor:
        return sample_sequences(self.model.net, n, self.length, self.bos_id, generator=self.generator)

    def fit_discriminator(self) -> dict[str, float]:
        """One refit: ``d_samples`` real and as many generated sequences, ``d_epochs`` epochs of mini-batches."""
        c, d = self.config, self.model.discriminator
        n = c.d_samples
        data = torch.cat([self.real_batch(n), self._fake_batch(n)])
        labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(self.device)
        d.train()
        losses, correct = [], 0
        for _ in range(c.d_epochs):
            order = torch.randperm(2 * n, generator=self.generator, device=self.device)
            for begin in range(0, 2 * n, c.adv_batch):
                idx = order[begin:begin + c.adv_batch]
                logits = d(data[idx])
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
                loss = loss + c.d_l2 * 0.5 * (d.out.weight.pow(2).sum() + d.out.bias.pow(2).sum())
                self.d_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.d_optimizer.step()
                losses.append(float(loss.detach()))
                correct += int(((logits > 0).float() == labels[idx]).sum())
        return {"d_loss": sum(losses) / len(losses), "d_accuracy": correct / (2 * n * c.d_epochs)}

    def pretrain_discriminator(self) -> dict[str, float]:
        """The phase's start: the rollout policy becomes a copy of the (MLE-trained) generator, then D is fitted."""
        self.rollout.load_state_dict(self.model.net.state_dict())  # built with the phase, before MLE or a resume
        if self.reference is not None:
            self.reference.load_state_dict(self.model.net.state_dict())
        if self.cooperative:  # the mediator starts from the MLE generator; no discriminator is used
            self.mediator.load_state_dict(self.model.net.state_dict())
            self.d_pretrained = True
            return {}
        stats: dict[str, float] = {}
        for _ in range(self.config.d_pretrain_steps):
            stats = self.fit_discriminator()
        self.d_pretrained = True
        return stats

    # --- the generator ------------------------------------------------------------------------------------

    @torch.no_grad()
    def rewards(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, L): token t's reward is D's mean P(real) (``reward=logit``: mean logit) over ``rollout_num``
        completions of samples[:, :t+1]."""
        c, d = self.config, self.model.discriminator
        if c.reward == "constant":  # the ablation: no discriminator, every live token rewarded 1
            return sequence_mask(samples).float()
        d.eval()
        B, L = samples.shape
        repeated = samples.repeat(c.rollout_num, 1)
        live = sequence_mask(samples)
        score = _logit if c.reward == "logit" else torch.sigmoid
        out = score(d(samples))[:, None].repeat(1, L)  # an ended sequence's tokens: D's score of it
        for t in range(1, L):
            if not bool(live[:, t].any()):  # every sequence ended by token t - 1: the rest is D's score
                break
            completed = sample_sequences(self.rollout, repeated.size(0), L, self.bos_id, prefix=repeated[:, :t],
                                         generator=self.generator)
            out[:, t - 1] = score(d(completed)).view(c.rollout_num, B).mean(0)
        return out * live

    def generator_step(self) -> dict[str, float]:
        """One policy-gradient update of G on ``adv_batch`` of its own samples."""
        c, model = self.config, self.model
        samples = sample_sequences(model.net, c.adv_batch, self.length, self.bos_id, generator=self.generator)
        rewards = self.rewards(samples)
        x, targets = self.teacher_forced(samples)
        mask = targets != -100
        mean_reward = float(rewards.sum() / mask.sum())
        if c.reward == "rank":
            rewards = rank_rewards(rewards, mask, c.reward_delta)
        if c.baseline == "mean":
            rewards = (rewards - rewards.sum(0) / mask.sum(0).clamp_min(1)) * mask
        stats: dict[str, float] = {"reward": mean_reward}
        if self.critic is not None:
            rewards, stats["critic_loss"] = self.critic_step(x, rewards, mask)
        log_ref = _frozen_log_probs(self.reference, x) if self.reference is not None else None
        for epoch in range(c.g_epochs):
            logits = model(x)
            logp = -token_nll(logits, targets)
            if epoch == 0:
                old_logp = logp.detach()  # the policy the samples came from
            if c.g_epochs == 1:  # REINFORCE
                loss = -(logp * rewards).sum() / c.adv_batch
            else:  # PPO's clipped surrogate; its first step's gradient is REINFORCE's
                ratio = (logp - old_logp).exp()
                clipped = ratio.clamp(1 - c.g_clip, 1 + c.g_clip)
                loss = -torch.minimum(ratio * rewards, clipped * rewards).sum() / c.adv_batch
            if log_ref is not None:
                kl = exact_kl(logits, log_ref, mask) / c.adv_batch
                loss = loss + c.kl_coef * kl
                if epoch == 0:
                    stats["kl"] = float(kl.detach())  # per sequence, before this batch's updates
            _update(self.g_optimizer, loss, model.generator_parameters())
        return {"g_loss": float(loss.detach()), **stats}

    def critic_step(self, x: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """baseline=learned: the advantages (rewards minus the critic's V of each token's prefix, as it
        stood before this batch) and one least-squares update of the critic on this batch's rewards."""
        with torch.no_grad():
            states, _ = self.model.net.features(x)  # (B, L, H): the state token t was drawn from
        values = self.critic(states.float()).squeeze(-1)
        advantages = (rewards - values.detach()) * mask
        loss = ((values - rewards) ** 2 * mask).sum() / mask.sum().clamp_min(1)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        return advantages, float(loss.detach())

    def mle_step(self) -> dict[str, float]:
        """One teacher-forced MLE update of G on ``adv_batch`` real sentences (interleaved training)."""
        model = self.model
        x, targets = self.teacher_forced(self.real_batch(self.config.adv_batch))
        loss = mean_nll(model(x), targets)
        _update(self.mle_optimizer, loss, model.generator_parameters())
        return {"mle_loss": float(loss.detach())}

    def teacher_forced(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for teacher forcing on sequences (B, L): <bos> + the sequence shifted right, and
        the sequence with everything after its <eos> ignored."""
        x = torch.cat([torch.full_like(samples[:, :1], self.bos_id), samples[:, :-1]], dim=1)
        return x, samples.masked_fill(~sequence_mask(samples), -100)

    def cooperative_step(self) -> dict[str, float]:
        """CoT's generator update: the exact KL(G || mediator) of the next-token distributions at each position
        of ``adv_batch`` of G's samples, summed over positions and averaged over sequences."""
        c, model = self.config, self.model
        samples = sample_sequences(model.net, c.adv_batch, self.length, self.bos_id, generator=self.generator)
        x, targets = self.teacher_forced(samples)
        self.mediator.eval()
        loss = exact_kl(model(x), _frozen_log_probs(self.mediator, x), targets != -100) / c.adv_batch
        _update(self.g_optimizer, loss, model.generator_parameters())
        return {"g_loss": float(loss.detach())}

    def mediator_step(self) -> dict[str, float]:
        """CoT's mediator update: MLE on ``adv_batch / 2`` real sentences and as many of G's samples."""
        c, m = self.config, self.mediator
        half = max(1, c.adv_batch // 2)
        x, targets = self.teacher_forced(torch.cat([self.real_batch(half), self._fake_batch(half)]))
        m.train()
        loss = mean_nll(m.decode(x), targets)
        _update(self.m_optimizer, loss, list(m.parameters()))
        return {"m_loss": float(loss.detach())}

    def update_rollout(self) -> None:
        """rollout = rate * rollout + (1 - rate) * G, parameter by parameter (SeqGAN's delayed policy)."""
        rate = self.config.rollout_update
        with torch.no_grad():
            for mine, theirs in zip(self.rollout.parameters(), self.model.net.parameters(), strict=True):
                mine.mul_(rate).add_(theirs.detach(), alpha=1 - rate)

    # --- the phase in the trainer's loop ----------------------------------------------------------------------

    def begin(self, state: dict[str, Any], log: RunLog) -> None:
        if not self.d_pretrained:
            log.progress.message(f"pre-training the discriminator ({self.config.d_pretrain_steps} refits)")
            stats = self.pretrain_discriminator()
            log.metrics.write({"step": state["step"], "split": "discriminator", **stats})

    def step(self, state: dict[str, Any]) -> None:
        self._stats = self.round()

    def record(self, state: dict[str, Any], log: RunLog) -> None:
        log.metrics.write({"step": state["step"], "split": "adversarial", "round": state["step"] - self.start,
                           "elapsed": state["elapsed"], **self._stats})

    def decision_due(self, step: int) -> bool:
        return True  # a round is long: look at the stop signal after each

    def evaluation_due(self, step: int) -> bool:
        return (step - self.start) % self.config.adv_eval_interval == 0 or step == self.end

    def checkpoint_due(self, step: int) -> bool:
        return self.evaluation_due(step)

    def settle(self, state: dict[str, Any]) -> None:
        pass

    def evaluation_record(self, state: dict[str, Any], val: float, figures: dict[str, Any],
                          improved: bool) -> tuple[dict[str, Any], str]:
        done, stats = state["step"] - self.start, self._stats
        record = {"step": state["step"], "split": "val", "loss": val, "round": done, "elapsed": state["elapsed"],
                  **figures}
        return record, (f"round {done}/{self.config.adv_rounds}: val loss {val:.4f}, reward "
                        f"{stats.get('reward', 0):.3f}, D accuracy {stats.get('d_accuracy', 0):.3f}")

    def evaluated(self) -> None:
        pass

    def finish(self, save_best: Callable[[], None]) -> None:
        save_best()

    # --- a round --------------------------------------------------------------------------------------------------

    def round(self) -> dict[str, float]:
        """One adversarial round: G updates (policy gradient, then any interleaved MLE), rollout update, D refits."""
        stats: dict[str, float] = {}
        self.model.train()
        if self.cooperative:
            for _ in range(self.config.m_steps):
                stats.update(self.mediator_step())
            for _ in range(self.config.g_steps):
                stats.update(self.cooperative_step())
            for _ in range(self.config.mle_steps):
                stats.update(self.mle_step())
            return stats
        for _ in range(self.config.g_steps):
            stats.update(self.generator_step())
        for _ in range(self.config.mle_steps):
            stats.update(self.mle_step())
        self.update_rollout()
        for _ in range(self.config.d_steps):
            stats.update(self.fit_discriminator())
        return stats


def exact_kl(logits: torch.Tensor, log_other: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Sum over the live positions of KL(softmax(logits) || exp(log_other)), each computed exactly over
    the vocabulary (CoT's generator loss; the kl_coef penalty)."""
    log_g = F.log_softmax(logits.float(), dim=-1)
    return ((log_g.exp() * (log_g - log_other)).sum(-1) * live).sum()


@torch.no_grad()
def _frozen_log_probs(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A network's next-token log-probabilities, no gradient: the reference or mediator side of a KL."""
    return F.log_softmax(net.decode(x).float(), dim=-1)


def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean per-token NLL of ``targets`` (-100: ignored) under ``logits``."""
    return token_nll(logits, targets).sum() / (targets != -100).sum()


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 5 (SeqGAN's generator clip)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 5.0)
    optimizer.step()


def _logit(logits: torch.Tensor) -> torch.Tensor:
    """D's logit as the reward: log D / (1 - D), its estimate of log p_data(x) / p_G(x)."""
    return logits


def rank_rewards(rewards: torch.Tensor, mask: torch.Tensor, delta: float) -> torch.Tensor:
    """LeakGAN's bootstrapped rescaled activation: at each position, the live sequences ranked by reward
    (1 = best of n) get sigmoid(delta * (0.5 - rank / n)) instead of the reward itself."""
    out = torch.zeros_like(rewards)
    for t in range(rewards.size(1)):
        live = mask[:, t]
        n = int(live.sum())
        if n == 0:
            continue
        order = rewards[live, t].argsort(descending=True, stable=True)
        ranks = torch.empty(n, device=rewards.device)
        ranks[order] = torch.arange(1, n + 1, device=rewards.device, dtype=ranks.dtype)
        out[live, t] = torch.sigmoid(delta * (0.5 - ranks / n)).to(out.dtype)
    return out
