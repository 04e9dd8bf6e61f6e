"""Family `vae`: the sentence VAE of Bowman et al. (2016), with the known defences against posterior collapse.

An LSTM encoder (optionally bidirectional) reads a sentence and gives q(z|x) = N(mu, diag sigma^2);
the decoder is the `lstm` family's network, conditioned on z through its initial state and by
concatenating z to every input. Training maximises the ELBO, E_q[log p(x|z)] - KL(q(z|x) || p(z)),
with a weight beta on the KL term that follows a schedule (constant, linear warm-up, or cyclical as in
Fu et al. 2019), word dropout on the decoder's inputs, and free bits (Kingma et al. 2016): a KL floor
per latent dimension or in total, below which the KL term exerts no pull; BN-VAE (Zhu et al. 2020)
fixes the spread of the posterior means instead. p(z) is N(0, I) or a learned mixture of Gaussians
(``prior=mixture``) fitted to the aggregate posterior: with the standard prior, the part of the KL
that is KL(q(z) || p(z)) — the aggregate posterior's mismatch with the prior, measured at ~1.2 nats
per PTB sentence — is paid by every bound and buys nothing. ``nll`` (used for validation) is the
negative ELBO with beta = 1 and none of the defences: an upper bound on the NLL.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import PAD_ID, UNK_ID
from glmlab.errors import ConfigError
from glmlab.models.contract import FamilyModel, StepContext, TrainingHook, Traits, exempt_from_weight_decay, not_hidden
from glmlab.models.lstm import LSTMNet, LSTMState, token_nll
from glmlab.schema import field


@dataclass
class VAEConfig:
    """Shape and training objective of a `vae` model (``model.*`` keys)."""

    family: str = field("vae", "model family")
    vocab_size: int = field(0, "vocabulary size; 0 = take it from the data's tokenizer", min=0)
    block_size: int = field(64, "longest sentence in tokens (longer ones are cut)", min=2)
    n_embd: int = field(256, "word embedding width (shared by encoder and decoder)", min=1)
    n_hidden: int = field(256, "decoder LSTM hidden units", min=1)
    n_layer: int = field(1, "decoder LSTM layers", min=1)
    encoder_hidden: int = field(256, "encoder LSTM hidden units (per direction)", min=1)
    bidirectional: bool = field(True, "bidirectional encoder")
    latent_dim: int = field(32, "dimensions of z", min=1)
    dropout: float = field(0.3, "dropout on embeddings and before the softmax", min=0.0, max=0.99)
    tie_weights: bool = field(True, "share the embedding with the softmax")
    word_dropout: float = field(0.0, "rate at which decoder input words become <unk> while training (Bowman: "
                                     "forces the decoder to use z)", min=0.0, max=1.0)
    beta: float = field(1.0, "weight of the KL term at the end of its schedule", min=0.0)
    beta_schedule: str = field("constant", "KL weight schedule: constant, linear (0 -> beta over anneal_steps), "
                                           "cyclical (Fu et al. 2019: cycles of linear rise then hold)",
                               choices=("constant", "linear", "cyclical"))
    anneal_steps: int = field(10000, "linear: steps of the 0 -> beta warm-up; cyclical: steps per cycle", min=1)
    cycle_rise: float = field(0.5, "cyclical: fraction of each cycle spent rising (the rest holds beta)",
                              min=0.0, max=1.0)
    free_bits: float = field(0.0, "KL floor in nats (free bits): below it the KL term has no gradient; 0 = off",
                             min=0.0)
    free_bits_mode: str = field("dimension", "free bits per latent dimension (summed over dims) or on the total",
                                choices=("dimension", "total"))
    free_bits_until: int = field(0, "optimiser step at which free bits switch off, so that the rest of the run "
                                    "maximises the plain (beta-weighted) ELBO the evaluation measures; 0 = never",
                                 min=0)
    prior: str = field("standard", "p(z): standard (N(0, I)) or mixture (a learned mixture of Gaussians fitted to "
                                   "the aggregate posterior; see SentenceVAE.log_prior)",
                       choices=("standard", "mixture"))
    prior_components: int = field(64, "mixture prior: number of Gaussian components", min=1)
    bn_gamma: float = field(0.0, "BN-VAE (Zhu et al. 2020): batch-normalise the posterior means with this fixed "
                                 "scale (learned shift), which keeps E[KL] >= latent_dim * gamma^2 / 2; 0 = off",
                            min=0.0)
    aggressive: bool = field(False, "aggressive encoder training (He et al. 2019): inner encoder-only updates "
                                    "before each decoder update, until mutual information stops rising")
    aggressive_inner_steps: int = field(30, "most encoder-only updates per step while aggressive", min=1)

    def validate(self) -> None:
        pass


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per dimension, closed form, (B, d)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def beta_at(config: VAEConfig, step: int) -> float:
    """The KL weight at optimiser step ``step`` (0-based) under the config's schedule."""
    if config.beta_schedule == "constant":
        return config.beta
    if config.beta_schedule == "linear":
        return config.beta * min(1.0, step / config.anneal_steps)
    position = (step % config.anneal_steps) / config.anneal_steps  # cyclical
    rise = config.cycle_rise
    return config.beta * (1.0 if rise == 0 or position >= rise else position / rise)


class SentenceVAE(FamilyModel):
    """Encoder q(z|x), decoder p(x|z), and the families' protocol (``loss``, ``nll``, ``forward``)."""

    def __init__(self, config: VAEConfig) -> None:
        if config.vocab_size < 1:
            raise ConfigError("model.vocab_size is 0", "train on a data directory, which sets it from its tokenizer")
        super().__init__(config)
        c = config
        self.decoder = LSTMNet(c.vocab_size, c.n_embd, c.n_hidden, c.n_layer, c.dropout, c.tie_weights,
                               cond_dim=c.latent_dim)
        self.encoder = nn.LSTM(c.n_embd, c.encoder_hidden, 1, batch_first=True, bidirectional=c.bidirectional)
        enc_out = c.encoder_hidden * (2 if c.bidirectional else 1)
        self.to_posterior = not_hidden(nn.Linear(enc_out, 2 * c.latent_dim))  # (Muon leaves these two to AdamW)
        self.z_to_state = not_hidden(nn.Linear(c.latent_dim, 2 * c.n_layer * c.n_hidden))
        if c.bn_gamma > 0:
            # eps far below batch norm's default: with 1e-5 the encoder escapes the floor by shrinking the
            # raw means' variance under eps (measured on PTB: KL 0.2 nats at gamma = 0.5)
            self.mu_norm = nn.BatchNorm1d(c.latent_dim, affine=False, eps=1e-10)
            self.mu_shift = nn.Parameter(torch.zeros(c.latent_dim))
        if c.prior == "mixture":
            # from the global generator like every other initial weight (a fixed seed here would repeat the
            # evaluation's seed-0 noise: those z's would land on the initial components and read too likely)
            self.prior_means = nn.Parameter(0.5 * torch.randn(c.prior_components, c.latent_dim))
            self.prior_logvars = nn.Parameter(torch.full((c.prior_components, c.latent_dim), math.log(0.75)))
            self.prior_logits = nn.Parameter(torch.zeros(c.prior_components))
            for p in (self.prior_means, self.prior_logvars):
                exempt_from_weight_decay(p)  # a density's parameters: decay would pull it towards a point
        self.beta = c.beta if c.beta_schedule == "constant" else 0.0
        self.free_bits_on = c.free_bits > 0

    @classmethod
    def declare(cls, config: VAEConfig) -> Traits:
        return Traits(family="vae", sentence_level=True, windows=False, latent_dim=config.latent_dim,
                      special_tokens=("pad", "unk"))

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def training_hooks(self) -> list[TrainingHook]:
        return [AggressiveEncoderTraining(self)] if self.config.aggressive else []

    def given(self, z: torch.Tensor) -> LatentDecoder:
        """p(x|z) for the latent vectors ``z`` (N, latent_dim): row i of every batch decodes from z[i]."""
        return LatentDecoder(self, z)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of q(z|x) only (the embedding is shared, so it belongs to the decoder side here)."""
        shift = [self.mu_shift] if self.config.bn_gamma > 0 else []
        return [*self.encoder.parameters(), *self.to_posterior.parameters(), *shift]

    # --- the two halves ----------------------------------------------------------------------------------

    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, latent_dim), of q(z|x) for sentences given as targets ``y``
        (words then ``<eos>``, padded with IGNORE_INDEX). In fp32 under bf16 autocast too: the KL, the sampled z
        and the logged ELBO terms need more than bf16's three digits."""
        lengths = (y != IGNORE_INDEX).sum(1).clamp_min(1)
        tokens = y.masked_fill(y == IGNORE_INDEX, PAD_ID)
        emb = self.decoder.embedding(tokens)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.encoder(packed)
        h = torch.cat([h[-2], h[-1]], dim=-1) if self.config.bidirectional else h[-1]
        mu, logvar = self.to_posterior(h).float().chunk(2, dim=-1)
        if self.config.bn_gamma > 0:
            mu = self._normalise_means(mu)
        return mu, logvar

    def _normalise_means(self, mu: torch.Tensor) -> torch.Tensor:
        """BN-VAE: every dimension of mu has batch mean ``mu_shift`` and standard deviation ``bn_gamma``
        (running statistics outside training, and for a batch of one sentence)."""
        norm = self.mu_norm
        batch_stats = self.training and mu.size(0) > 1
        mu = torch.nn.functional.batch_norm(mu, norm.running_mean, norm.running_var, training=batch_stats,
                                            momentum=norm.momentum, eps=norm.eps)
        return mu * self.config.bn_gamma + self.mu_shift

    # --- the prior ---------------------------------------------------------------------------------------

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) over the last dimension of ``z``: N(0, I), or the learned mixture of Gaussians."""
        if self.config.prior == "standard":
            return log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        per_component = log_normal(z[..., None, :], self.prior_means, self.prior_logvars)
        return torch.logsumexp(per_component + torch.log_softmax(self.prior_logits, 0), dim=-1)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from p(z), (n, latent_dim), made on the CPU (``generator``'s device) and moved to
        the model's."""
        device = next(self.parameters()).device
        eps = torch.randn((n, self.latent_dim), generator=generator)
        if self.config.prior == "standard":
            return eps.to(device)
        weights = torch.softmax(self.prior_logits.detach().float().cpu(), 0)
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        means, logvars = self.prior_means.detach().cpu()[k], self.prior_logvars.detach().cpu()[k]
        return (means + eps * (0.5 * logvars).exp()).to(device)

    def prior_centre(self) -> torch.Tensor:
        """The z a decoder starts from when none is given, (latent_dim,): 0, the mode of N(0, I); for the
        mixture, the mean of its heaviest component."""
        if self.config.prior == "standard":
            return torch.zeros(self.latent_dim, device=next(self.parameters()).device)
        return self.prior_means.detach()[int(self.prior_logits.detach().argmax())]

    def kl_divergence(self, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor | None = None,
                      samples: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per sentence (B,): closed form for N(0, I); for the mixture, the entropy of
        q in closed form and E_q[log p(z)] by Monte Carlo — ``log_prior`` (B,) when the caller has it
        from its own draws of z, else over ``samples`` fresh draws."""
        if self.config.prior == "standard":
            return gaussian_kl(mu, logvar).sum(-1)
        if log_prior is None:
            eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device)
            log_prior = self.log_prior(mu + eps * (0.5 * logvar).exp()).mean(0)
        neg_entropy = -0.5 * (mu.size(-1) * (1 + math.log(2 * math.pi)) + logvar.sum(-1))
        return neg_entropy - log_prior

    def initial_state(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        h, cell = torch.tanh(self.z_to_state(z)).view(z.size(0), 2, c.n_layer, c.n_hidden).unbind(1)
        return h.transpose(0, 1).contiguous(), cell.transpose(0, 1).contiguous()

    def decode_logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, vocab) of p(x|z) for decoder inputs ``x`` (``<bos>`` then words)."""
        out, _ = self.decoder.features(x, self.initial_state(z), cond=z)
        return self.decoder.logits(out)

    def reconstruction_nll(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per sentence (B,), nats."""
        return token_nll(self.decode_logits(x, z), y).sum(1)

    # --- training ----------------------------------------------------------------------------------------

    def set_step(self, step: int) -> None:
        """Called by the trainer before each optimiser step: the KL weight follows its schedule."""
        self.beta = beta_at(self.config, step)
        c = self.config
        self.free_bits_on = c.free_bits > 0 and (c.free_bits_until == 0 or step < c.free_bits_until)

    def kl_term(self, kl: torch.Tensor) -> torch.Tensor:
        """The KL penalty of a batch (summed over sentences), with free bits applied to batch means."""
        c, batch = self.config, kl.size(0)
        if not self.free_bits_on:
            return kl.sum()
        if c.free_bits_mode == "dimension":
            return kl.mean(0).clamp_min(c.free_bits).sum() * batch
        return kl.sum(1).mean().clamp_min(c.free_bits) * batch

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training objective per target token: (reconstruction + beta * KL term) / tokens. Records
        per-sentence reconstruction, KL, beta and ELBO in ``self.stats`` (detached, on device)."""
        c = self.config
        mu, logvar = self.encode(y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        inputs = x
        if self.training and c.word_dropout > 0:
            drop = (torch.rand(x.shape, device=x.device) < c.word_dropout) & (y != IGNORE_INDEX)
            drop[:, 0] = False  # keep <bos>
            inputs = x.masked_fill(drop, UNK_ID)
        recon = self.reconstruction_nll(inputs, y, z)
        kl = gaussian_kl(mu, logvar)
        tokens = (y != IGNORE_INDEX).sum().clamp_min(1)
        objective = recon.sum() + self.beta * self.kl_term(kl)
        if c.prior == "mixture":
            # the ELBO's gradient for the prior's parameters, E_q[log p(z)], on this batch's z's; the loss's
            # value is unchanged, and the encoder's penalty stays the KL to N(0, I) above (with its
            # schedule and free bits), which keeps the aggregate posterior compact for the mixture to fit
            log_p = self.log_prior(z.detach())
            prior_sum = log_p.sum()
            objective = objective - (prior_sum - prior_sum.detach())
            kl_sum = self.kl_divergence(mu.detach(), logvar.detach(), log_prior=log_p.detach())
        else:
            kl_sum = kl.sum(1)
        self.stats = {"recon": recon.detach().mean(), "kl": kl_sum.detach().mean(),
                      "beta": torch.tensor(self.beta), "elbo": -(recon + kl_sum).detach().mean()}
        return objective / tokens

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative ELBO summed over the batch (nats; beta = 1, no defences), one z per sentence drawn
        with a fixed seed so that validation losses are comparable: an upper bound on the NLL."""
        mu, logvar = self.encode(y)
        generator = torch.Generator(device=mu.device).manual_seed(0)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        z = mu + eps * (0.5 * logvar).exp()
        kl = self.kl_divergence(mu, logvar, log_prior=self.log_prior(z))
        return (self.reconstruction_nll(x, y, z) + kl).sum()

    # --- generation: the decoder given z, through the shared engine ---------------------------------------

    def forward(self, idx: torch.Tensor, cache: LSTMState | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Decoder logits (B, T, vocab) continuing each row's state; the cache (from :meth:`new_cache`, or
        :meth:`given`'s) holds each row's z. Without a cache every row decodes from the prior's centre, as a
        cache made without z does (what a prompt is scored and continued from when no z is given)."""
        if cache is None:
            cache = self.new_cache(idx.size(0), idx.device)
        return self.decoder.decode(idx, cache, rows, valid, last_only)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None,
                  z: torch.Tensor | None = None) -> LSTMState:
        """Decoder states for ``batch_size`` rows started from ``z`` (B, latent_dim); the prior's centre
        (:meth:`prior_centre`) when not given."""
        if z is None:
            z = self.prior_centre().to(device).repeat(batch_size, 1)  # a row of its own per slot (move_row writes)
        if z.size(0) != batch_size:
            raise ValueError(f"{z.size(0)} latent vectors for {batch_size} rows")
        z = z.to(device)
        h, c = self.initial_state(z)
        return LSTMState(h, c, cond=z)


class LatentDecoder(FamilyModel):
    """p(x|z) for fixed latent vectors, a language model of its own (``SentenceVAE.given``): row i of every
    batch, and cache slot i, decodes from ``z[i]``; a batch without a cache takes z[:B]."""

    def __init__(self, vae: SentenceVAE, z: torch.Tensor) -> None:
        super().__init__(vae.config)
        self.vae, self.z = vae, z
        # a new Module is in training mode; take the VAE's instead, or the generator's train(was_training)
        # afterwards would leave the VAE in training mode (dropout on)
        self.train(vae.training)

    @classmethod
    def declare(cls, config: VAEConfig) -> Traits:
        return dataclasses.replace(SentenceVAE.declare(config), latent_dim=0)  # z is given: no latent left

    def forward(self, idx: torch.Tensor, cache: LSTMState | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        if cache is None:
            cache = self.new_cache(idx.size(0), idx.device)
        return self.vae(idx, cache, rows=rows, valid=valid, last_only=last_only)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> LSTMState:
        return self.vae.new_cache(batch_size, device, z=self.z[:batch_size])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean -log p(x|z) per target token."""
        return self.nll(x, y) / (y != IGNORE_INDEX).sum().clamp_min(1)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) summed over the batch (row i given z[i])."""
        return self.vae.reconstruction_nll(x, y, self.z[: x.size(0)]).sum()


class AggressiveEncoderTraining:
    """He et al. (2019)'s aggressive encoder training, the hook a `vae` with ``model.aggressive`` gives the
    trainer: before each optimiser step, encoder-only updates on fresh batches until the encoder's loss stops
    falling (compared every 10 updates, at most ``model.aggressive_inner_steps``), through the run's own
    optimiser (AdamW skips parameters whose gradient is None, so the decoder side stays as it is); the outer
    step then updates the decoder only. It ends for good at the first evaluation whose mutual information
    I(x; z) is no higher than the previous one's."""

    name = "aggressive"

    def __init__(self, model: SentenceVAE) -> None:
        self.model = model
        self.active = True
        self.last_mutual_info = -math.inf

    def before_step(self, context: StepContext) -> None:
        if not self.active:
            return
        model = self.model
        encoder = {id(p) for p in model.encoder_parameters()}
        others = [p for p in model.parameters() if id(p) not in encoder]
        previous, window = math.inf, []
        for _ in range(model.config.aggressive_inner_steps):
            x, y = context.next_batch()
            loss = context.loss(x, y)
            loss.backward()
            for p in others:
                p.grad = None
            if context.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), context.grad_clip)
            context.optimizer.step()
            context.optimizer.zero_grad(set_to_none=True)
            window.append(float(loss.detach()))
            if len(window) == 10:
                current = sum(window) / len(window)
                if current >= previous:
                    break
                previous, window = current, []

    def frozen(self) -> list[nn.Parameter]:
        return self.model.encoder_parameters() if self.active else []

    def after_evaluation(self, figures: dict[str, float]) -> dict[str, Any]:
        if not self.active or "mutual_info" not in figures:
            return {}
        ended = figures["mutual_info"] <= self.last_mutual_info
        self.last_mutual_info = figures["mutual_info"]
        if ended:
            self.active = False
            return {"aggressive_ended": True}
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"aggressive": self.active, "last_mutual_info": self.last_mutual_info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = bool(state.get("aggressive", self.active))
        self.last_mutual_info = float(state.get("last_mutual_info", self.last_mutual_info))


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dimension."""
    return -0.5 * (((z - mu) ** 2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)
