"""Family `seqgan`: SeqGAN (Yu et al. 2017) — an LSTM generator trained as a policy against a CNN discriminator.

The generator is the `lstm` family's network; as a language model (``loss``, ``nll``, generation)
this family *is* its generator, so MLE pre-training is ordinary training and every tool that reads
an `lstm` run reads this one. The discriminator is SeqGAN's: token embeddings, convolutions of
several widths with max-pooling over time, a highway layer, dropout, and a real/fake logit. The
adversarial phase (:mod:`glmlab.training.adversarial`) follows ``model.adv_*`` keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.data.tokenizer import EOS_ID, PAD_ID
from glmlab.errors import ConfigError
from glmlab.models.contract import Traits
from glmlab.models.lstm import LSTMLM, LSTMConfig, LSTMNet
from glmlab.schema import field


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


@dataclass
class SeqGANConfig(LSTMConfig):
    """Generator shape (the ``lstm`` keys), discriminator shape and the adversarial schedule (``model.*``)."""

    family: str = field("seqgan", "model family")
    n_embd: int = field(32, "generator word embedding width (SeqGAN: 32)", min=1)
    n_hidden: int = field(32, "generator LSTM hidden units (SeqGAN: 32)", min=1)
    dropout: float = field(0.0, "generator dropout", min=0.0, max=0.99)
    tie_weights: bool = field(False, "share the generator's embedding with its softmax")
    d_embd: int = field(64, "discriminator embedding width (SeqGAN: 64)", min=1)
    d_filter_sizes: str = field("1,2,3,4,5,6,7,8,9,10,15,20", "discriminator convolution widths (SeqGAN's)")
    d_num_filters: str = field("100,200,200,200,200,100,100,100,100,100,160,160",
                               "filters per width (SeqGAN's; comma-separated, one per width)")
    d_dropout: float = field(0.25, "discriminator dropout before its output (SeqGAN: keep 0.75)", min=0.0, max=0.99)
    d_l2: float = field(0.2, "L2 penalty on the discriminator's output layer (SeqGAN: 0.2)", min=0.0)
    d_lr: float = field(1e-4, "discriminator Adam learning rate (SeqGAN: 1e-4)", min=0.0)
    g_lr: float = field(1e-2, "generator Adam learning rate in the adversarial phase (SeqGAN: 0.01)", min=0.0)
    adv_rounds: int = field(0, "adversarial rounds after MLE pre-training (train.max_steps); 0 = MLE only", min=0)
    adv_batch: int = field(64, "sequences per generator policy-gradient update (SeqGAN: 64)", min=1)
    g_steps: int = field(1, "generator updates per round (SeqGAN: 1)", min=0)
    g_epochs: int = field(1, "gradient steps per batch of samples and rewards (1: REINFORCE, as SeqGAN; more: "
                             "PPO's clipped surrogate, reusing each costly batch of rollout rewards)", min=1)
    g_clip: float = field(0.2, "g_epochs > 1: PPO's clip range for the probability ratio", min=0.0)
    mle_steps: int = field(0, "teacher-forced MLE updates of the generator on real sentences per round, after its "
                              "policy-gradient updates (LeakGAN's interleaved training: the forward-KL pull that "
                              "keeps the adversarial updates from dropping modes; 0 = SeqGAN)", min=0)
    kl_coef: float = field(0.0, "weight of a KL(G || MLE generator) penalty on the generator's policy-gradient "
                                "updates: the exact KL of the next-token distributions at each position of its "
                                "samples, against a frozen copy of the generator as MLE left it (RLHF's "
                                "KL-regularised objective: maximise the reward while staying near the data's "
                                "model; 0 = SeqGAN)", min=0.0)
    d_steps: int = field(5, "discriminator refits per round, each on fresh samples (SeqGAN: 5)", min=0)
    d_epochs: int = field(3, "epochs per discriminator refit (SeqGAN: 3)", min=1)
    d_samples: int = field(10000, "real and as many generated sequences per refit (SeqGAN: 10,000)", min=1)
    d_pretrain_steps: int = field(50, "discriminator refits before the first round (SeqGAN: 50)", min=0)
    rollout_num: int = field(16, "Monte-Carlo rollouts per token for the reward (SeqGAN: 16)", min=1)
    rollout_update: float = field(0.8, "rollout policy = rate * itself + (1 - rate) * generator after each "
                                        "round (SeqGAN: 0.8)", min=0.0, max=1.0)
    baseline: str = field("none", "reward baseline: none (SeqGAN), mean (subtract each position's mean "
                                  "reward over the batch: less variance, same expected gradient), or learned (a "
                                  "critic: a linear value head on the generator's LSTM state of each prefix, "
                                  "fitted to the rewards by least squares, its prediction subtracted)",
                          choices=("none", "mean", "learned"))
    critic_lr: float = field(1e-3, "baseline=learned: the value head's Adam learning rate", min=0.0)
    reward: str = field("probability", "token reward: D's mean P(real) over the rollouts (SeqGAN), or rank: "
                                       "LeakGAN's bootstrapped rescaled activation, sigmoid(delta (0.5 - rank / B)) "
                                       "of each sequence's rank among the batch at that position (scale-free when "
                                       "D saturates; still positive, so the update still sharpens G), or logit: "
                                       "D's mean logit log D / (1 - D), its estimate of log p_data / p_G (the "
                                       "reverse-KL policy gradient; signed, use with baseline=mean), or constant: "
                                       "1 for every token, D unused (an ablation: the drift of reinforcing G's "
                                       "own samples)",
                        choices=("probability", "rank", "logit", "constant"))
    reward_delta: float = field(12.0, "reward=rank: the rescaled activation's slope delta (LeakGAN: 12)", min=0.0)
    objective: str = field("adversarial", "what the phase after MLE trains G on: adversarial (SeqGAN: policy "
                                          "gradient against the discriminator), or cooperative (CoT, Lu et al. "
                                          "2019: a mediator LM fitted to the balanced mixture of real sentences "
                                          "and G's samples, G moved down the exact KL(G || mediator) over the "
                                          "whole vocabulary at each position of its samples: an estimate of "
                                          "JSD(data, G) minimised without rollouts, rewards or a discriminator)",
                          choices=("adversarial", "cooperative"))
    m_steps: int = field(1, "objective=cooperative: mediator MLE updates per round, each on adv_batch / 2 real and "
                            "as many generated sentences", min=0)
    m_lr: float = field(1e-3, "objective=cooperative: mediator Adam learning rate (CoT: 1e-3)", min=0.0)
    adv_eval_interval: int = field(10, "rounds between validation NLL evaluations in the adversarial phase", min=1)

    # keys a resumed run may change: the adversarial schedule continues from an MLE-trained generator
    RESUMABLE = ("d_lr", "g_lr", "adv_rounds", "adv_batch", "g_steps", "g_epochs", "g_clip", "mle_steps", "kl_coef",
                 "d_steps", "d_epochs", "d_samples", "d_pretrain_steps", "rollout_num", "rollout_update", "baseline",
                 "critic_lr", "adv_eval_interval", "reward", "reward_delta", "objective", "m_steps", "m_lr")

    def validate(self) -> None:
        for key in ("d_filter_sizes", "d_num_filters"):
            try:
                values = _ints(getattr(self, key))
            except ValueError:
                values = []
            if not values or min(values) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is not a list of positive integers",
                                  f"give comma-separated integers, e.g. model.{key}=2,3,4")
        if len(_ints(self.d_filter_sizes)) != len(_ints(self.d_num_filters)):
            raise ConfigError("model.d_filter_sizes and model.d_num_filters differ in length",
                              "give one filter count per width")


class Highway(nn.Module):
    """y = t * relu(W x) + (1 - t) * x, t = sigmoid(W_t x) (Srivastava et al. 2015), as SeqGAN's D uses."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.transform = nn.Linear(size, size)
        self.gate = nn.Linear(size, size)
        nn.init.constant_(self.gate.bias, -2.0)  # start close to the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.gate(x))
        return t * F.relu(self.transform(x)) + (1 - t) * x


class Discriminator(nn.Module):
    """SeqGAN's CNN: P(real) logits (B,) for token sequences (B, L), padded with ``<pad>`` after ``<eos>``."""

    def __init__(self, config: SeqGANConfig) -> None:
        super().__init__()
        widths, counts = _ints(config.d_filter_sizes), _ints(config.d_num_filters)
        self.min_length = max(widths)
        self.embedding = nn.Embedding(config.vocab_size, config.d_embd, padding_idx=PAD_ID)
        self.convs = nn.ModuleList(nn.Conv1d(config.d_embd, n, w) for w, n in zip(widths, counts, strict=True))
        total = sum(counts)
        self.highway = Highway(total)
        self.drop = nn.Dropout(config.d_dropout)
        self.out = nn.Linear(total, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.size(1) < self.min_length:
            tokens = F.pad(tokens, (0, self.min_length - tokens.size(1)), value=PAD_ID)
        x = self.embedding(tokens).transpose(1, 2)  # (B, d_embd, L)
        pooled = torch.cat([F.relu(conv(x)).amax(dim=2) for conv in self.convs], dim=1)
        return self.out(self.drop(self.highway(pooled)))[:, 0]


class SeqGAN(LSTMLM):
    """The generator (an LSTM LM, with every protocol method of `lstm`) plus the discriminator."""

    def __init__(self, config: SeqGANConfig) -> None:
        super().__init__(config)
        self.discriminator = Discriminator(config)

    @classmethod
    def declare(cls, config: SeqGANConfig) -> Traits:
        return Traits(family="seqgan", sentence_level=True, windows=False, feature_width=config.n_hidden,
                      special_tokens=("pad", "eos"), auxiliary=("discriminator",),
                      phases=("adversarial",) if config.adv_rounds else ())

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def rollout_copy(self) -> LSTMNet:
        """A frozen copy of the generator: the rollout policy."""
        net = copy.deepcopy(self.net)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval()


def sequence_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True at real tokens: everything up to and including the first ``<eos>`` (B, L)."""
    ended_before = (tokens == EOS_ID).long().cumsum(1) - (tokens == EOS_ID).long()
    return (ended_before == 0) & (tokens != PAD_ID)
