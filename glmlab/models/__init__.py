"""Model families and the registry that maps a ``model.family`` name to its config, its model and what the
rest of glmlab needs to know about it.

Every family implements the contract of :mod:`glmlab.models.contract` (a :class:`LanguageModel` with
declared :class:`Traits`), so the trainer, evaluator, generator and server never branch on the family
name; ``tests/models/test_contract.py`` checks every registered family against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmlab.errors import ConfigError
from glmlab.models.bert import BERT, BertConfig
from glmlab.models.contract import FamilyModel, LanguageModel, Traits
from glmlab.models.glm import GLM, GLMConfig
from glmlab.models.gpt import GPT, GPTConfig
from glmlab.models.lstm import LSTMLM, LSTMConfig
from glmlab.models.seqgan import SeqGAN, SeqGANConfig
from glmlab.models.vae import SentenceVAE, VAEConfig
from glmlab.schema import suggest

__all__ = ["FAMILIES", "Family", "FamilyModel", "LanguageModel", "Traits", "build_model", "family_config_class",
           "family_traits", "get_family"]


@dataclass(frozen=True)
class Family:
    """A registered family: its config section, its model, and how runs of it may change."""

    config: type
    model: type[FamilyModel]
    description: str
    resumable: tuple[str, ...] = ()  # model keys a resumed run may change
    language_model: dict[str, Any] = field(default_factory=dict)  # model keys that leave the LM alone (fine-tuning)


FAMILIES: dict[str, Family] = {
    "bert": Family(BertConfig, BERT, "masked language model (BERT): bidirectional Transformer encoder"),
    "glm": Family(GLMConfig, GLM, "GLM (Du et al. 2022): autoregressive blank infilling, bidirectional Part A"),
    "gpt": Family(GPTConfig, GPT, "decoder-only Transformer (GPT-2 layout)"),
    "lstm": Family(LSTMConfig, LSTMLM, "LSTM language model"),
    "seqgan": Family(SeqGANConfig, SeqGAN, "SeqGAN (Yu et al. 2017): LSTM generator, CNN discriminator",
                     resumable=SeqGANConfig.RESUMABLE, language_model={"adv_rounds": 0}),
    "vae": Family(VAEConfig, SentenceVAE, "sentence VAE (Bowman et al. 2016): LSTM encoder and decoder"),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'", suggest(name, FAMILIES).replace("valid keys",
                                                                                             "available families"))
    return FAMILIES[name]


def family_config_class(name: str) -> type:
    return get_family(name).config


def family_traits(config: Any, sentences: bool = False) -> Traits:
    """The traits a model built from ``config`` has (``sentences``: for a run that reads sentences)."""
    return get_family(config.family).model.declare(config).reading_sentences(sentences)


def build_model(config: Any, sentences: bool = False) -> FamilyModel:
    """Instantiate the model for a family config (``config.family`` picks the class). ``sentences``: the run
    reads ``<bos>``-started sentences (``train.batching``), so the model is prompted the same way."""
    model = get_family(config.family).model(config)
    model.traits = model.traits.reading_sentences(sentences)
    return model
