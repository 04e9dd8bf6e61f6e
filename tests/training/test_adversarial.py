"""SeqGAN's adversarial phase: Monte-Carlo rewards, the delayed rollout policy, discriminator refits, the
policy gradient, the mean baseline, and a `glmlab train` run that resumes mid-phase exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import glmlab.training.adversarial as adversarial
from glmlab.cli import main
from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.data.sentences import find_sentences
from glmlab.models.seqgan import EOS_ID, PAD_ID, SeqGAN, SeqGANConfig, sequence_mask
from glmlab.runs import load_run
from glmlab.training.adversarial import AdversarialPhase
from glmlab.training.trainer import train
from tests.conftest import metrics_records

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, VOCAB, WORDS = 2, 30, 6  # sentences of 6 words + <eos>; block_size 8 = <bos> + 7 targets
TINY = dict(vocab_size=VOCAB, block_size=WORDS + 2, n_embd=8, n_hidden=16, d_embd=8, d_filter_sizes="1,2,3",
            d_num_filters="8,8,8", d_dropout=0.0, rollout_num=2, adv_batch=16, d_samples=32, d_epochs=1, d_steps=1,
            d_pretrain_steps=1)




def make_phase(real: list[list[int]] | None = None, **changes) -> AdversarialPhase:
    torch.manual_seed(0)
    model = SeqGAN(SeqGANConfig(**{**TINY, **changes}))
    rng = np.random.default_rng(0)
    real = real or rng.integers(4, VOCAB, (50, WORDS)).tolist()
    tokens = np.array([t for sentence in real for t in [*sentence, EOS_ID]], dtype=np.uint16)
    return AdversarialPhase(model, find_sentences(tokens, EOS_ID, model.block_size), BOS, torch.device("cpu"), 0)


def last_real(samples: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: its first <eos>, or the last position."""
    ended = samples == EOS_ID
    return torch.where(ended.any(1), ended.float().argmax(1), torch.full_like(samples[:, 0], samples.size(1) - 1))


class LovesToken(nn.Module):
    """A discriminator certain that a sequence is real exactly when it holds ``token``."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token
        self.unused = nn.Linear(1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens == self.token).any(1), 10.0, -10.0)


def p_first(phase: AdversarialPhase, token: int) -> float:
    with torch.no_grad():
        out, _ = phase.model.net.features(torch.tensor([[BOS]]))
        return float(phase.model.net.logits(out[:, -1]).softmax(-1)[0, token])


# --- rewards ----------------------------------------------------------------------------------------------

def test_rewards_are_zero_at_padding_in_range_and_d_score_at_the_last_token():
    phase = make_phase()
    with torch.no_grad():
        phase.model.net.head.bias[EOS_ID] = 2.0  # some sequences end early
    samples = adversarial.sample_sequences(phase.model.net, 24, phase.length, BOS,
                                           generator=torch.Generator().manual_seed(0), banned=[PAD_ID, 1, BOS])
    rewards = phase.rewards(samples)
    mask = sequence_mask(samples)
    assert rewards.shape == samples.shape == (24, WORDS + 1)
    assert bool((~mask).any()) and bool((rewards[~mask] == 0).all())
    assert bool((rewards >= 0).all()) and bool((rewards <= 1).all()) and bool((rewards[mask] > 0).all())
    with torch.no_grad():
        own = torch.sigmoid(phase.model.discriminator.eval()(samples))
    assert torch.allclose(rewards[torch.arange(24), last_real(samples)], own, atol=1e-5)


def test_the_reward_of_a_token_counts_the_token_itself():
    """Once the loved token has been drawn, every completion holds it: the reward is D's certainty from
    that very position on (the prefix rolled out includes token t)."""
    phase = make_phase(rollout_num=4)
    phase.model.discriminator = LovesToken(7)
    samples = torch.tensor([[7, 4, 5, 6, 8, 9, EOS_ID], [4, 5, 7, 6, EOS_ID, PAD_ID, PAD_ID],
                            [4, 5, 6, 8, 9, 10, EOS_ID]])
    with torch.no_grad():  # the rollout policy never draws 7 (nor ends early)
        phase.rollout.head.bias[7] = -1e4
        phase.rollout.head.bias[EOS_ID] = -1e4
    rewards = phase.rewards(samples)
    sure, never = torch.sigmoid(torch.tensor(10.0)), torch.sigmoid(torch.tensor(-10.0))
    assert torch.allclose(rewards[0], sure.expand(7))
    assert torch.allclose(rewards[1, :2], never.expand(2)) and torch.allclose(rewards[1, 2:5], sure.expand(3))
    assert rewards[1, 5:].eq(0).all()
    assert torch.allclose(rewards[2], never.expand(7))


def test_logit_rewards_are_ds_mean_log_odds_over_the_rollouts():
    """reward=logit: the same rollouts, scored by D's logit log D / (1 - D) instead of its probability
    (signed and unbounded: with the loved token, +10; without, -10; half the rollouts, 0)."""
    phase = make_phase(rollout_num=4, reward="logit")
    phase.model.discriminator = LovesToken(7)
    samples = torch.tensor([[7, 4, 5, 6, 8, 9, EOS_ID], [4, 5, 7, 6, EOS_ID, PAD_ID, PAD_ID],
                            [4, 5, 6, 8, 9, 10, EOS_ID]])
    with torch.no_grad():
        phase.rollout.head.bias[7] = -1e4
        phase.rollout.head.bias[EOS_ID] = -1e4
    rewards = phase.rewards(samples)
    assert torch.equal(rewards[0], torch.full((7,), 10.0))
    assert torch.equal(rewards[1, :2], torch.full((2,), -10.0)) and torch.equal(rewards[1, 2:5], torch.full((3,), 10.0))
    assert rewards[1, 5:].eq(0).all() and torch.equal(rewards[2], torch.full((7,), -10.0))
    with torch.no_grad():  # a rollout policy that draws 7 half the time at the next position
        phase.rollout.head.bias[7] = 0.0
    mixed = phase.rewards(samples[2:])
    assert -10.0 < float(mixed[0, 0]) < 10.0


def test_constant_rewards_are_one_on_live_tokens_without_asking_the_discriminator():
    phase = make_phase(reward="constant")

    class Unused(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            raise AssertionError("reward=constant must not score with D")

    phase.model.discriminator = Unused()
    samples = torch.tensor([[7, 4, 5, 6, 8, 9, EOS_ID], [4, 5, 7, 6, EOS_ID, PAD_ID, PAD_ID]])
    assert torch.equal(phase.rewards(samples), sequence_mask(samples).float())
    assert phase.rewards(samples)[1].tolist() == [1, 1, 1, 1, 1, 0, 0]


# --- the rollout policy -----------------------------------------------------------------------------------

def test_update_rollout_follows_the_generator_at_the_configured_rate():
    phase = make_phase()
    with torch.no_grad():
        for p in phase.model.net.parameters():
            p.add_(0.5)
    before = [p.clone() for p in phase.rollout.parameters()]
    generator = list(phase.model.net.parameters())
    phase.config.rollout_update = 1.0
    phase.update_rollout()
    assert all(torch.equal(a, b) for a, b in zip(phase.rollout.parameters(), before, strict=True))
    phase.config.rollout_update = 0.5
    phase.update_rollout()
    assert all(torch.allclose(a, (b + g) / 2) for a, b, g in zip(phase.rollout.parameters(), before, generator,
                                                                  strict=True))
    phase.config.rollout_update = 0.0
    phase.update_rollout()
    assert all(torch.equal(a, g) for a, g in zip(phase.rollout.parameters(), generator, strict=True))


def test_the_rollout_policy_starts_from_the_pretrained_generator():
    """The phase is built before MLE training (and before a checkpoint is loaded): the rollout policy
    must start from the generator as it is when the adversarial phase begins, not from its initial weights."""
    phase = make_phase(d_pretrain_steps=0)
    with torch.no_grad():
        for p in phase.model.net.parameters():  # MLE training happens
            p.mul_(1.5).add_(0.1)
    phase.pretrain_discriminator()
    assert phase.d_pretrained
    assert all(torch.equal(a, g) for a, g in zip(phase.rollout.parameters(), phase.model.net.parameters(),
                                                 strict=True))


# --- the discriminator ------------------------------------------------------------------------------------

def test_fit_discriminator_learns_an_easy_task():
    """Real = one fixed sentence, fake = the untrained generator's near-uniform noise."""
    phase = make_phase(real=[[4, 5, 6, 7, 8, 9]] * 20, d_lr=1e-2, d_samples=64)
    fits = [phase.fit_discriminator() for _ in range(4)]
    assert fits[-1]["d_loss"] < fits[0]["d_loss"] and fits[-1]["d_accuracy"] > 0.95
    real = phase.real_batch(3)
    assert real.tolist() == [[4, 5, 6, 7, 8, 9, EOS_ID]] * 3


# --- the generator ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("baseline, reward, epochs", [("none", "probability", 1), ("mean", "probability", 1),
                                                      ("none", "rank", 1), ("mean", "logit", 1),
                                                      ("mean", "probability", 4), ("learned", "probability", 1)])
def test_policy_gradient_raises_the_probability_of_a_rewarded_token(baseline, reward, epochs):
    phase = make_phase(g_lr=0.05, adv_batch=32, baseline=baseline, reward=reward, g_epochs=epochs)
    phase.model.discriminator = LovesToken(7)
    before = p_first(phase, 7)
    stats = [phase.generator_step() for _ in range(10)]
    assert p_first(phase, 7) > 3 * before
    assert stats[-1]["reward"] > stats[0]["reward"]


def test_ppo_epochs_reuse_one_batch_and_start_as_reinforce(monkeypatch):
    """g_epochs=4: one batch of samples and rewards (one reward computation), four optimiser steps, the
    first of which is exactly REINFORCE's (the clipped surrogate's gradient at ratio 1)."""
    reinforce = make_phase(g_lr=0.05, adv_batch=16)
    reinforce.generator_step()
    phase = make_phase(g_lr=0.05, adv_batch=16, g_epochs=4, g_clip=0.2)
    calls, after_first = {"rewards": 0, "steps": 0}, {}
    original_rewards, original_step = phase.rewards, phase.g_optimizer.step

    def step() -> None:
        original_step()
        calls["steps"] += 1
        if calls["steps"] == 1:
            after_first.update({k: v.clone() for k, v in phase.model.net.state_dict().items()})

    monkeypatch.setattr(phase, "rewards", lambda s: calls.update(rewards=calls["rewards"] + 1) or original_rewards(s))
    monkeypatch.setattr(phase.g_optimizer, "step", step)
    phase.generator_step()
    assert calls == {"rewards": 1, "steps": 4}
    for key, value in reinforce.model.net.state_dict().items():
        assert torch.allclose(after_first[key], value, atol=1e-6), key
    assert any(not torch.allclose(after_first[k], v) for k, v in phase.model.net.state_dict().items())


def _first_gradients(phase: AdversarialPhase, monkeypatch) -> dict[str, torch.Tensor]:
    """The generator's gradients at its next update (recorded as the optimiser steps)."""
    grads: dict[str, torch.Tensor] = {}
    step = phase.g_optimizer.step

    def recording() -> None:
        if not grads:
            grads.update({n: p.grad.clone() for n, p in phase.model.net.named_parameters() if p.grad is not None})
        step()

    monkeypatch.setattr(phase.g_optimizer, "step", recording)
    return grads


def test_the_kl_penalty_is_silent_at_the_reference_and_holds_g_near_it(monkeypatch):
    """kl_coef: at the phase's start G is its reference (the MLE generator), where KL(G || reference) and
    its gradient are zero, so the first update's gradient is the unpenalised one; over more updates G
    ends nearer the reference than without the penalty, and the reference does not move."""
    plain = make_phase(g_lr=0.05, adv_batch=16)
    plain.model.discriminator = LovesToken(7)
    penalised = make_phase(g_lr=0.05, adv_batch=16, kl_coef=5.0, d_pretrain_steps=0)
    penalised.model.discriminator = LovesToken(7)
    penalised.pretrain_discriminator()  # the reference becomes the generator as it is now
    reference = {k: v.clone() for k, v in penalised.reference.state_dict().items()}
    plain_grads, penalised_grads = _first_gradients(plain, monkeypatch), _first_gradients(penalised, monkeypatch)
    first = penalised.generator_step()
    plain.generator_step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert plain_grads.keys() == penalised_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(penalised_grads[name], grad, atol=1e-6), name
    for _ in range(15):
        plain.generator_step()
        last = penalised.generator_step()
    assert last["kl"] > 0 and p_first(penalised, 7) < p_first(plain, 7)
    assert all(torch.equal(reference[k], v) for k, v in penalised.reference.state_dict().items())
    saved = penalised.state_dict()
    other = make_phase(kl_coef=5.0)
    other.load_state_dict(saved)
    assert all(torch.equal(reference[k], v) for k, v in other.reference.state_dict().items())


def test_the_learned_baseline_fits_the_rewards_and_subtracts_its_estimate(monkeypatch):
    """baseline=learned: the critic starts at 0 (the first update is SeqGAN's own), learns to predict the
    rewards of its prefixes (its loss falls), and what the policy gradient sees is reward - V, with V
    as it stood before the batch."""
    phase = make_phase(g_lr=0.0, adv_batch=32, baseline="learned", critic_lr=0.05)
    rewards = torch.full((32, WORDS + 1), 0.7)
    monkeypatch.setattr(phase, "rewards", lambda samples: rewards * sequence_mask(samples))
    seen = []
    original = phase.critic_step

    def recording(x, r, mask):
        advantages, loss = original(x, r, mask)
        seen.append((advantages, mask, loss))
        return advantages, loss

    monkeypatch.setattr(phase, "critic_step", recording)
    for _ in range(60):
        phase.generator_step()
    first_advantages, first_mask, first_loss = seen[0]
    assert torch.allclose(first_advantages, 0.7 * first_mask.float())  # V = 0 before any fit
    last_advantages, last_mask, last_loss = seen[-1]
    assert last_loss < first_loss / 10
    assert float(last_advantages.abs().sum() / last_mask.sum()) < 0.1  # V ~ 0.7 now: little left to reinforce
    saved = phase.state_dict()
    other = make_phase(baseline="learned")
    other.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(other.critic.parameters(), phase.critic.parameters(), strict=True))


def test_rank_rewards_rescale_ranks_among_live_sequences():
    rewards = torch.tensor([[0.9, 0.2], [0.1, 0.0], [0.5, 0.3], [0.05, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    out = adversarial.rank_rewards(rewards, mask, delta=12.0)
    # position 0: ranks 1, 3, 2, 4 of n = 4; position 1: ranks 2, 1 of the two live rows
    expected0 = torch.sigmoid(12.0 * (0.5 - torch.tensor([1, 3, 2, 4]) / 4))
    assert torch.allclose(out[:, 0], expected0)
    assert torch.allclose(out[[0, 2], 1], torch.sigmoid(12.0 * (0.5 - torch.tensor([2.0, 1.0]) / 2)))
    assert bool((out[~mask] == 0).all())
    scaled = adversarial.rank_rewards(rewards * 0.001, mask, delta=12.0)  # scale-free: D saturating changes nothing
    assert torch.allclose(scaled, out)


def test_mean_baseline_centres_each_position_over_live_tokens(monkeypatch):
    """The weight of each token's log-probability in the loss is its reward: with baseline=mean it sums
    to zero over the live tokens of each position, and is zero at padding."""
    phase = make_phase(baseline="mean", adv_batch=24)
    with torch.no_grad():
        phase.model.net.head.bias[EOS_ID] = 1.5
    captured, original = {}, adversarial.token_nll

    def token_nll(logits, y):  # loss = sum(nll * weights) / adv_batch: d loss / d nll = weights / adv_batch
        nll = original(logits, y)
        nll.register_hook(lambda grad: captured.update(weights=grad * phase.config.adv_batch))
        captured["y"] = y
        return nll

    monkeypatch.setattr(adversarial, "token_nll", token_nll)
    phase.generator_step()
    weights, live = captured["weights"], captured["y"] != -100
    assert bool((~live).any()) and bool((weights[~live] == 0).all())
    assert torch.allclose((weights * live).sum(0), torch.zeros(weights.size(1)), atol=1e-5)
    assert bool((weights[live] != 0).any())


def test_interleaved_mle_steps_fit_the_real_sentences_and_resume(monkeypatch):
    """model.mle_steps: each round adds that many teacher-forced updates on real sentences, with their own
    optimiser (saved with the phase; a state from before the key existed still loads); repeated, they
    lower the generator's NLL of the real data, masked after each sentence's <eos>."""
    phase = make_phase(mle_steps=3, g_lr=0.05)
    calls = []
    original = phase.mle_step
    monkeypatch.setattr(phase, "mle_step", lambda: calls.append(1) or original())
    phase.pretrain_discriminator()
    stats = phase.round()
    assert len(calls) == 3 and "mle_loss" in stats and "g_loss" in stats
    x, targets = phase.teacher_forced(phase.real_batch(50))

    def nll() -> float:
        with torch.no_grad():
            return float(adversarial.mean_nll(phase.model(x), targets))

    before = nll()
    for _ in range(30):
        original()
    assert nll() < before - 0.1
    saved = phase.state_dict()
    assert saved["mle_optimizer"]["state"]
    other = make_phase(mle_steps=3)
    other.load_state_dict(saved)
    assert other.mle_optimizer.state_dict()["state"].keys() == saved["mle_optimizer"]["state"].keys()
    make_phase().load_state_dict({k: v for k, v in saved.items() if k != "mle_optimizer"})


def test_cooperative_training_moves_g_toward_the_mediator_and_the_mediator_toward_the_mixture():
    """objective=cooperative (CoT): the mediator starts as the generator (KL 0, so G's first gradient is
    zero); fitted to real and generated sentences it moves away, and G's steps then lower KL(G || mediator)
    on G's own samples; a round makes m_steps mediator and g_steps generator updates and asks no
    discriminator; the mediator and its optimiser are saved with the phase."""
    phase = make_phase(objective="cooperative", g_lr=0.05, m_lr=0.05, m_steps=2, g_steps=1, adv_batch=32)
    phase.model.discriminator = None  # never asked
    assert phase.pretrain_discriminator() == {} and phase.d_pretrained
    assert phase.cooperative_step()["g_loss"] == pytest.approx(0.0, abs=1e-6)
    assert max(float(p.grad.abs().max()) for p in phase.model.generator_parameters()) < 1e-5
    real = phase.real_batch(64)
    x, targets = phase.teacher_forced(real)

    def mediator_nll() -> float:
        with torch.no_grad():
            return float(adversarial.mean_nll(phase.mediator.eval().decode(x), targets))

    start = mediator_nll()
    for _ in range(20):
        phase.mediator_step()
    assert mediator_nll() < start - 0.1  # it learns the real half of its mixture
    losses = [phase.cooperative_step()["g_loss"] for _ in range(25)]
    assert losses[0] > 0.01 and sum(losses[-5:]) / 5 < losses[0] * 0.8
    stats = phase.round()
    assert {"m_loss", "g_loss"} <= set(stats) and "d_loss" not in stats
    other = make_phase(objective="cooperative")
    other.load_state_dict(phase.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.mediator.parameters(), phase.mediator.parameters(),
                                                 strict=True))
    seqgan = make_phase()  # a SeqGAN phase's state resumed as CoT: the mediator starts from the generator
    with torch.no_grad():
        for p in other.model.net.parameters():
            p.add_(0.1)
    other.load_state_dict(seqgan.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.mediator.parameters(), other.model.net.parameters(),
                                                 strict=True))


def test_round_and_state_dict_round_trip():
    phase = make_phase()
    phase.pretrain_discriminator()
    stats = phase.round()
    assert {"g_loss", "reward", "d_loss", "d_accuracy"} <= set(stats)
    saved = phase.state_dict()
    other = make_phase()
    other.load_state_dict(saved)
    assert other.d_pretrained and torch.equal(other.generator.get_state(), phase.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(other.rollout.parameters(), phase.rollout.parameters(), strict=True))


# --- through the trainer ----------------------------------------------------------------------------------

RUN = ["model.family=seqgan", f"model.block_size={WORDS + 2}", "model.n_embd=8", "model.n_hidden=16",
       "model.d_embd=8", "model.d_filter_sizes=1,2,3", "model.d_num_filters=8,8,8", "model.rollout_num=2",
       "model.adv_batch=16", "model.d_samples=32", "model.d_epochs=1", "model.d_steps=1", "model.d_pretrain_steps=2",
       "model.adv_eval_interval=1", "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=0",
       "train.lr_schedule=constant", "train.eval_interval=10", "train.log_interval=10", "train.sample_tokens=0",
       "train.eval_tokens=0", "train.threads=1"]


@pytest.fixture(scope="module")
def word_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentences of six words from a vocabulary of 26."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(26)]
    lines = [" ".join(rng.choice(vocab) for _ in range(WORDS)) for _ in range(240)]
    root = tmp_path_factory.mktemp("words")
    (root / "train.txt").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (root / "val.txt").write_text("\n".join(lines[200:]) + "\n", encoding="utf-8")
    prepare([root / "train.txt"], root / "data", tokenizer="word", val_file=root / "val.txt", split="1,0,0",
            sentences=True)
    return root / "data"




def test_glmlab_train_runs_the_adversarial_phase_and_resumes_it_exactly(word_data: Path, tmp_path: Path, capsys):
    whole = tmp_path / "whole"
    code = main(["train", "--quiet", "--data", str(word_data), "--out", str(whole), *RUN, "train.max_steps=10",
                 "model.adv_rounds=2"])
    assert code == 0, capsys.readouterr().err
    rounds = metrics_records(whole, "adversarial")
    assert [r["round"] for r in rounds] == [1, 2] and [r["step"] for r in rounds] == [11, 12]
    assert {"g_loss", "reward", "d_loss", "d_accuracy"} <= set(rounds[0])
    assert len(metrics_records(whole, "discriminator")) == 1
    assert [r["step"] for r in metrics_records(whole, "val")] == [10, 11, 12]
    assert (whole / "best" / "model.safetensors").is_file()

    split = tmp_path / "split"  # MLE only; then round 1; then round 2, each a resume
    train(resolve_config({}, [*RUN, "train.max_steps=10"]), word_data, split, show_progress=False)
    assert not metrics_records(split, "adversarial")
    train(resolve_config({}, [*RUN, "train.max_steps=10", "model.adv_rounds=1"]), word_data, split, resume=True,
          show_progress=False)
    code = main(["train", "--quiet", "--out", str(split), "--resume", "model.adv_rounds=2"])
    assert code == 0, capsys.readouterr().err
    a = load_run(whole, checkpoint="last").model.state_dict()
    b = load_run(split, checkpoint="last").model.state_dict()
    assert any(k.startswith("discriminator.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("g_loss", "reward", "d_loss", "d_accuracy")
    assert [{k: r[k] for k in keys} for r in metrics_records(split, "adversarial")] == \
        [{k: r[k] for k in keys} for r in rounds]
