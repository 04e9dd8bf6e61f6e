"""Model families and the registry that maps a ``model.family`` name to its config and module.

Every family offers the same small protocol, so the trainer, evaluator and generator never branch
on the family name: ``loss(x, y)`` (mean training loss), ``nll(x, y)`` (summed NLL in nats for
evaluation), ``forward(idx, cache)`` (next-token logits), ``new_cache(...)`` and ``block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from glmlab.config import suggest
from glmlab.errors import ConfigError
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.lstm import LSTMLM, LSTMConfig
from glmlab.models.seqgan import SeqGAN, SeqGANConfig
from glmlab.models.vae import SentenceVAE, VAEConfig


@dataclass(frozen=True)
class Family:
    config: type
    model: type[nn.Module]
    description: str


FAMILIES: dict[str, Family] = {
    "gpt": Family(GPTConfig, GPT, "decoder-only Transformer (GPT-2 layout)"),
    "lstm": Family(LSTMConfig, LSTMLM, "LSTM language model"),
    "seqgan": Family(SeqGANConfig, SeqGAN, "SeqGAN (Yu et al. 2017): LSTM generator, CNN discriminator"),
    "vae": Family(VAEConfig, SentenceVAE, "sentence VAE (Bowman et al. 2016): LSTM encoder and decoder"),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'", suggest(name, FAMILIES).replace("valid keys",
                                                                                             "available families"))
    return FAMILIES[name]


def family_config_class(name: str) -> type:
    return get_family(name).config


def build_model(config: object) -> nn.Module:
    """Instantiate the model for a family config (``config.family`` picks the class)."""
    return get_family(config.family).model(config)  # type: ignore[attr-defined]
