"""Metrics of a latent-variable model of sentences: KL, active units, mutual information, and the
importance-weighted NLL bound.

Conventions, so that numbers compare with the literature and answer the usual questions:

- **NLL** is per sentence in nats, summed over its tokens *including* ``<eos>``; **PPL** is
  exp(total NLL / total tokens including ``<eos>``), so it includes the KL term whenever the NLL does.
- **ELBO-NLL** is -ELBO = E_q[-log p(x|z)] + KL(q(z|x) || p(z)): an upper bound on the NLL.
- **IW-NLL** is -log (1/k) sum_k p(x, z_k) / q(z_k|x) with z_k ~ q(z|x) (Burda et al. 2016): a tighter
  upper bound that approaches the NLL as k grows; k = 500 by default, computed in chunks.
- **Active units** (Burda et al.): dimensions whose E_q[z|x] varies over the data, Var_x(mu_d) > 0.01.
- **Mutual information** I(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)], with the aggregate posterior
  q(z) = mean_x q(z|x) estimated over *the whole evaluation set* (not a minibatch, as He et al.'s code
  does), one z per sentence.
- A collapsed posterior shows as KL ~ 0, MI ~ 0 and AU = 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.models.vae import SentenceVAE, log_normal

ACTIVE_UNIT_THRESHOLD = 0.01


@dataclass
class LatentReport:
    sentences: int
    tokens: int  # targets scored, <eos> included
    kl: float  # mean KL(q(z|x) || p(z)) per sentence, nats
    active_units: int
    latent_dim: int
    mutual_info: float  # nats, aggregate posterior over the evaluation set

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def posteriors(model: SentenceVAE, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """mu and logvar (N, d) of q(z|x) for every sentence, and the number of target tokens."""
    mus, logvars, tokens = [], [], 0
    with torch.no_grad():
        for _, y in batches:
            y = y.to(device)
            mu, logvar = model.encode(y)
            mus.append(mu.float())
            logvars.append(logvar.float())
            tokens += int((y != IGNORE_INDEX).sum())
    return torch.cat(mus), torch.cat(logvars), tokens


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Dimensions whose posterior mean varies over the data: Var_x(E_q[z_d | x]) > threshold."""
    if mu.size(0) < 2:
        return 0
    return int((mu.var(dim=0, unbiased=True) > threshold).sum())


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                       chunk: int = 512) -> float:
    """I(x; z) under q, with q(z) = (1/N) sum_n q(z | x_n) over these N sentences (one z per sentence)."""
    n, d = mu.shape
    z = mu + torch.randn(mu.shape, generator=generator, device=mu.device) * (0.5 * logvar).exp()
    neg_entropy = (-0.5 * d * math.log(2 * math.pi) - 0.5 * (1 + logvar).sum(-1)).mean()  # E_q log q(z|x)
    log_qz = []
    for begin in range(0, n, chunk):
        zc = z[begin:begin + chunk, None, :]  # (c, 1, d) against every posterior (1, N, d)
        log_qz.append(torch.logsumexp(log_normal(zc, mu[None], logvar[None]), dim=1) - math.log(n))
    return float(neg_entropy - torch.cat(log_qz).mean())


def latent_report(model: SentenceVAE, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device | str = "cpu", seed: int = 0) -> LatentReport:
    """KL, active units and mutual information over every sentence of ``batches``."""
    was_training = model.training
    model.eval()
    try:
        mu, logvar, tokens = posteriors(model, batches, device)
    finally:
        model.train(was_training)
    generator = torch.Generator(device=mu.device).manual_seed(seed)
    with torch.no_grad():
        kl = float(model.kl_divergence(mu, logvar, generator=generator).mean())
    return LatentReport(sentences=mu.size(0), tokens=tokens, kl=kl,
                        active_units=active_units(mu), latent_dim=mu.size(1),
                        mutual_info=mutual_information(mu, logvar, generator))


@torch.no_grad()
def importance_weighted_nll(model: SentenceVAE, x: torch.Tensor, y: torch.Tensor, samples: int = 500,
                            chunk: int = 50, generator: torch.Generator | None = None,
                            posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sentence (B,): the importance-weighted NLL bound with ``samples`` z's from q(z|x), and the
    ELBO-NLL estimated from the same samples (mean reconstruction + closed-form KL). Nats.
    ``posterior`` is (mu, logvar) of q(z|x) when the caller has already encoded ``y``."""
    mu, logvar = posterior if posterior is not None else model.encode(y)
    B, d = mu.shape
    std = (0.5 * logvar).exp()
    log_weights, recon_sum, prior_sum = [], torch.zeros(B, device=mu.device), torch.zeros(B, device=mu.device)
    done = 0
    while done < samples:
        k = min(chunk, samples - done)
        eps = torch.randn((k, B, d), generator=generator, device=mu.device)
        z = mu[None] + eps * std[None]  # (k, B, d)
        flat = z.reshape(k * B, d)
        recon = model.reconstruction_nll(x.repeat(k, 1), y.repeat(k, 1), flat).view(k, B)
        log_prior = model.log_prior(z)
        log_q = log_normal(z, mu[None], logvar[None])
        log_weights.append(-recon + log_prior - log_q)
        recon_sum += recon.sum(0)
        prior_sum += log_prior.sum(0)
        done += k
    iw = -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(samples))
    # closed form under N(0, I); under a mixture, E_q[log p(z)] over the same samples
    elbo_nll = recon_sum / samples + model.kl_divergence(mu, logvar, log_prior=prior_sum / samples)
    return iw, elbo_nll
