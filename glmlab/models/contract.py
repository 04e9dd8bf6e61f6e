"""What a model family is: the surface every consumer uses, and the traits each family declares.

The trainer, the evaluator, the generation engine, the fine-tuner and the server use a model through
:class:`LanguageModel` only, and read what it can do from its :class:`Traits` — never by probing for
attributes or comparing family names. A new family subclasses :class:`FamilyModel` (which supplies the
defaults: no per-step schedule, no statistics, no training hooks, no features), declares its traits,
registers in :mod:`glmlab.models`, and the conformance suite (``tests/models/test_contract.py``) checks it.

Optional surfaces, each announced by a trait:

- ``traits.fast_paths``: :class:`FastDecoding` methods the engine may call (each may still answer None for
  a case it does not cover, and the engine then uses ``forward``).
- ``traits.latent_dim > 0``: :class:`LatentModel` (a VAE's encoder, prior and decoder given z).
- ``traits.feature_width > 0``: ``features`` / ``features_to_logits`` (what a classifier pools).
- ``traits.adapter_targets``: the modules LoRA adapts.
- ``traits.phases``: training phases after maximum likelihood (``"adversarial"``: SeqGAN's rounds).
- ``traits.infilling`` "mask_predict" or "blank": :class:`BlankFilling` (a bert's or a glm's answer at a blank).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from glmlab.data.tokenizer import ROLES
from glmlab.errors import GlmlabError

FAST_PATHS = ("decode_rows", "prefill_rows")
PHASES = ("adversarial",)
# What a family's forward pass predicts, and so how it is scored, trained and decoded:
# causal: the next token (exact NLL; the engine decodes it token by token);
# masked: each position of a bidirectionally read text (scored by pseudo-log-likelihood, written by mask-predict);
# blank_infilling: GLM's spans written left to right after a bidirectionally read text (exact NLL; infills).
OBJECTIVES = ("causal", "masked", "blank_infilling")
INFILLING = ("fim", "blank", "mask_predict")


@dataclass(frozen=True)
class Traits:
    """What a model can do, declared by its family from its config (``FamilyModel.declare``)."""

    family: str
    sentence_level: bool = False  # reads <bos>-started sentences, so prompts start with <bos> (a run's choice)
    windows: bool = True  # may train on windows of running text (False: whole sentences only)
    latent_dim: int = 0  # > 0: a latent-variable model (LatentModel)
    feature_width: int = 0  # width of features(idx); 0: no per-token features (no classifier on it)
    adapter_targets: tuple[str, ...] = ()  # module-name suffixes whose weight LoRA adapts; (): none
    fast_paths: frozenset[str] = frozenset()  # which FastDecoding methods exist
    decode_weights: tuple[str, ...] = ("native",)  # formats set_decode_weights accepts
    compiled_decode: bool = False  # set_decode_compiled exists (--compile-decode: a step compiled ahead of time)
    special_tokens: tuple[str, ...] = ()  # tokenizer roles its own code uses, at glmlab's ids (data.tokenizer)
    auxiliary: tuple[str, ...] = ()  # submodules that are not part of the language model (a discriminator)
    phases: tuple[str, ...] = ()  # training phases after maximum likelihood, in order
    hf_architecture: str | None = None  # the transformers class ``glmlab export-hf`` writes it as (None: none)
    objective: str = "causal"  # one of OBJECTIVES
    # how it fills a blank between a prefix and a suffix: "fim" (a gpt trained with train.fim_rate: sentinels),
    # "blank" (glm: Part A with [MASK]), "mask_predict" (bert: a given number of [MASK]s); None: it cannot
    infilling: str | None = None

    def __post_init__(self) -> None:
        if not (self.windows or self.sentence_level):
            raise ValueError(f"{self.family}: a family that trains on sentences only is sentence-level")
        unknown = (set(self.fast_paths) - set(FAST_PATHS)) | (set(self.special_tokens) - set(ROLES)) \
            | (set(self.phases) - set(PHASES)) | ({self.objective} - set(OBJECTIVES)) \
            | ({self.infilling} - {None, *INFILLING})
        if unknown:
            raise ValueError(f"{self.family}: unknown traits {sorted(unknown)}")

    @property
    def pseudo_likelihood(self) -> bool:
        """Whether ``nll`` is a pseudo-log-likelihood (each token given all the others), not comparable to an NLL."""
        return self.objective == "masked"

    @property
    def left_to_right(self) -> bool:
        """Whether the engine can decode it token by token (``forward`` gives next-token logits with a cache)."""
        return self.objective != "masked"

    @property
    def slides(self) -> bool:
        """Whether decoding may go on past a full context by re-encoding its tail (a glm's piece belongs to its
        Part A, so it ends when the context is full)."""
        return self.objective == "causal"

    def filling_in_the_middle(self) -> Traits:
        """These traits for a run trained with fill-in-the-middle (its prompts may then have a suffix)."""
        return dataclasses.replace(self, infilling="fim")

    def reading_sentences(self, sentences: bool) -> Traits:
        """These traits for a run that reads sentences (or windows, where the family allows them)."""
        return dataclasses.replace(self, sentence_level=sentences or not self.windows)


@runtime_checkable
class DecodeCache(Protocol):
    """A family's generation state for a batch of rows (slots): a KV cache, or an LSTM's state."""

    lengths: list[int]  # tokens each slot has read
    max_len: int  # tokens a slot can hold

    def select(self, rows: list[int]) -> None:
        """Keep (or repeat, for beams) the given slots, in that order."""

    def reset_row(self, row: int) -> None:
        """Empty a slot (it starts again from the family's initial state)."""

    def move_row(self, src: int, dst: int) -> None:
        """Move slot ``src``'s state into the free slot ``dst``; ``src`` becomes empty."""


@runtime_checkable
class LanguageModel(Protocol):
    """The surface every consumer uses. ``x``, ``y``: (B, T) token ids and targets (-100: not scored)."""

    config: Any
    traits: Traits
    stats: dict[str, torch.Tensor]  # detached per-batch figures of the last loss (a VAE's recon / KL / beta)

    @property
    def block_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean training loss (what the optimiser descends)."""

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood in nats (exact, or a stated upper bound for a latent model)."""

    def forward(self, idx: torch.Tensor, cache: DecodeCache | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, vocab); with a cache, each row continues its slot (``rows``: which slots;
        ``valid``: real lengths of right-padded rows; ``last_only``: each row's last real position)."""

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> DecodeCache:
        """An empty cache of ``batch_size`` slots."""

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, feature_width) of a full forward pass."""

    def features_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features`' output: ``forward(idx) == features_to_logits(features(idx))``."""

    def num_parameters(self) -> int: ...

    def set_step(self, step: int) -> None:
        """Called before each optimiser step (a VAE's KL-weight schedule)."""

    def training_hooks(self) -> list[TrainingHook]:
        """Extra work the family asks of the training loop (a VAE's aggressive encoder updates)."""

    def read_vocabulary(self, tokenizer: Any) -> None:
        """Learn what the family's objective needs to know of the tokenizer before training (which tokens begin
        a word or end a sentence); nothing of it is saved with the weights."""


class FastDecoding(Protocol):
    """Compiled decoding steps (``traits.fast_paths``); each answers None when the general ``forward`` is needed."""

    def decode_rows(self, tokens: torch.Tensor, cache: DecodeCache, rows: list[int]) -> torch.Tensor | None:
        """Logits (B, vocab) for one new token in each of the slots ``rows``, at any positions."""

    def prefill_rows(self, idx: torch.Tensor, cache: DecodeCache, rows: list[int],
                     valid: list[int]) -> torch.Tensor | None:
        """Logits (B, vocab) at the last real token of right-padded prompts encoded into empty slots."""

    def set_decode_weights(self, fmt: str) -> None:
        """Decode with ``traits.decode_weights`` format ``fmt`` (``int8``)."""

    def set_decode_compiled(self, enabled: bool = True) -> None:
        """Decode through a step compiled ahead of time (``traits.compiled_decode``)."""


class BlankFilling(Protocol):
    """What fills a blank given the text on both sides (``traits.infilling`` "mask_predict" or "blank")."""

    def blank_logits(self, idx: torch.Tensor, blank_at: list[int] | None = None) -> torch.Tensor:
        """Logits (B, vocab) of the (first) token at the last blank of each right-padded row (or at position
        ``blank_at[i]`` of row i)."""


class LatentModel(Protocol):
    """A latent-variable model of sentences (``traits.latent_dim > 0``): q(z|x), p(z) and p(x|z)."""

    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x) for sentences given as targets (words, <eos>, -100 padding)."""

    def reconstruction_nll(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per sentence (B,)."""

    def log_prior(self, z: torch.Tensor) -> torch.Tensor: ...

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def kl_divergence(self, mu: torch.Tensor, logvar: torch.Tensor, log_prior: torch.Tensor | None = None,
                      samples: int = 64, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def given(self, z: torch.Tensor) -> LanguageModel:
        """p(x|z) for fixed latent vectors: a language model whose row i decodes from z[i]."""

    def encoder_parameters(self) -> list[nn.Parameter]: ...


class StepContext(Protocol):
    """What a training hook may use of the trainer's step."""

    optimizer: torch.optim.Optimizer
    grad_clip: float

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch (x, y), on the training device."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch through the trainer's (distributed, compiled) module and autocast."""


class TrainingHook(Protocol):
    """Work a family adds to the training loop; its state is saved with every checkpoint under ``name``."""

    name: str

    def before_step(self, context: StepContext) -> None:
        """Runs before each optimiser step's micro-batches."""

    def frozen(self) -> list[nn.Parameter]:
        """Parameters whose gradient the coming optimiser step drops (the step updates the rest)."""

    def after_evaluation(self, figures: dict[str, float]) -> dict[str, Any]:
        """Sees each evaluation's figures; returns entries to add to its metrics.jsonl record."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FamilyModel(nn.Module):
    """The defaults of :class:`LanguageModel` every family starts from; ``declare`` is the family's own."""

    config: Any
    # Methods doing host work inside ``loss`` — Python over a batch's rows, draws from the global generator (a
    # masked family's corruption) — that torch.compile must leave eager (``keep_host_work_eager``, which the
    # trainer calls when it compiles).
    host_work: tuple[str, ...] = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.traits = self.declare(config)
        self.stats: dict[str, torch.Tensor] = {}

    def keep_host_work_eager(self) -> None:
        """Before torch.compile traces ``loss``: the ``host_work`` methods of this instance run eagerly (dynamo
        would trace their per-row Python into a new graph for nearly every batch, and inductor would draw other
        random numbers than the eager run with the same seed). Only the compiled path pays for the wrapper."""
        for name in self.host_work:
            setattr(self, name, torch.compiler.disable(getattr(self, name)))

    @classmethod
    def declare(cls, config: Any) -> Traits:
        """The traits of a model of this family built from ``config``."""
        raise NotImplementedError

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_step(self, step: int) -> None:
        pass

    def training_hooks(self) -> list[TrainingHook]:
        return []

    def read_vocabulary(self, tokenizer: Any) -> None:
        pass

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        raise GlmlabError(f"a {self.traits.family} model has no per-token features",
                          "use a family whose traits declare a feature width (gpt, lstm)")

    def features_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        raise GlmlabError(f"a {self.traits.family} model has no per-token features")


def exempt_from_weight_decay(parameter: nn.Parameter) -> nn.Parameter:
    """Mark a parameter the optimiser must not decay (a density's parameters: decay pulls it to a point)."""
    parameter.no_weight_decay = True  # type: ignore[attr-defined]
    return parameter


def not_hidden(layer: nn.Module) -> nn.Module:
    """Mark a linear layer as a model's input or output map rather than a hidden layer (a VAE's posterior head and
    its projection of z into the decoder): ``train.optimizer=muon`` leaves its weight to AdamW, as Muon's recipe
    does with embeddings and output layers."""
    layer.weight.not_hidden = True  # type: ignore[attr-defined]
    return layer


def is_hidden(parameter: nn.Parameter) -> bool:
    """False for a weight :func:`not_hidden` marked."""
    return not parameter.__dict__.get("not_hidden", False)


def decays(parameter: nn.Parameter) -> bool:
    """Whether weight decay applies: matrices and embeddings (dim >= 2), unless exempted."""
    return parameter.dim() >= 2 and not parameter.__dict__.get("no_weight_decay", False)
