"""What a run trains on: a :class:`Task` gives the trainer its data, its model and its validation.

The trainer (:mod:`glmlab.training.trainer`) owns the loop and everything that happens once per run; a task
says what differs between language modelling on a prepared data directory (:class:`LanguageModelingTask`,
windows of the token stream or whole sentences) and fine-tuning (:mod:`glmlab.finetune.tasks`:
classification, supervised completions): the batches, the model to train, the validation loss and figures,
what goes into ``config.json`` and ``samples.txt``, and any phases after maximum likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from glmlab.config import RunConfig, TrainConfig
from glmlab.data.dataset import RandomWindows, open_data_dir
from glmlab.data.fim import FIM_ROLES, FimWindows
from glmlab.data.sentences import SentenceBatches, find_sentences, sentence_batches
from glmlab.data.tokenizer import ROLES, SPECIAL_TOKENS, Tokenizer
from glmlab.errors import ConfigError, DataError, GlmlabError
from glmlab.evaluation.latent import latent_report
from glmlab.evaluation.likelihood import sum_nll, sum_nll_batches
from glmlab.generation.chat import CHATML_TEMPLATE
from glmlab.models import Traits, build_model, family_traits
from glmlab.runs import LoadSpec
from glmlab.training.adversarial import AdversarialPhase
from glmlab.training.distributed import Distributed
from glmlab.training.initial import InitialWeights, check_tokenizer, load_initial
from glmlab.training.phases import Phase
from glmlab.training.samples import write_samples


class LossModule(nn.Module):
    """``forward(x, y) -> loss`` around a model, so DDP and torch.compile wrap the whole loss: a task's default
    objective, the model's own ``loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


class Sampler(Protocol):
    """Training batches, reproducible from a seed and resumable from ``state_dict``."""

    last_tokens: int  # tokens (targets) in the latest batch, this process's share

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Validation:
    """One evaluation: the validation loss (nats per scored target) and figures logged with it."""

    loss: float
    figures: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """What a run trains on. The trainer calls ``check``, ``build_model`` (seeded), ``sampler``,
    ``later_phases``, then, per evaluation, ``evaluate`` and ``write_samples``."""

    tokenizer: Tokenizer
    notes: list[str]  # said before training starts
    starts_from_weights: bool  # the model starts from existing weights (a checkpoint at step 0 keeps them)
    chat_template: str | None  # the chat template (Jinja) the run carries, or None (the plain one)

    def check(self, config: RunConfig) -> None:
        """Refuse a config that does not fit the data (and fill in what the data decides, e.g. vocab_size)."""

    def build_model(self, config: RunConfig, fresh: bool) -> nn.Module:
        """The model to train (``fresh``: a new run, not a resume whose checkpoint will overwrite it)."""

    def sampler(self, train: TrainConfig, rank: int, world_size: int) -> Sampler: ...

    def loss_module(self, model: nn.Module) -> nn.Module:
        """What a step minimises, ``forward(x, y) -> loss`` around the model on its device (``LossModule``: the
        model's own loss; preference tuning adds a frozen reference)."""

    def some_parameters_unused(self, model: nn.Module) -> bool:
        """Whether the loss leaves some trainable parameters without a gradient (DDP must then look for them)."""

    def later_phases(self, model: nn.Module, sampler: Sampler, device: torch.device,
                     train: TrainConfig) -> list[Phase]:
        """Phases after maximum likelihood (SeqGAN's adversarial rounds), built before the optimiser."""

    def evaluate(self, model: nn.Module, device: torch.device, autocast: Any, dist: Distributed) -> Validation:
        """The validation loss, the work shared across processes; every process gets the same answer."""

    def write_samples(self, out: Path, model: nn.Module, train: TrainConfig, step: int, val: float) -> None: ...

    def run_files(self) -> dict[str, Any]:
        """``config.json`` entries beyond the config itself: the data, how to load the model (``load``)."""

    def describe_step(self, train: TrainConfig, block_size: int, world_size: int) -> str: ...

    def resume_command(self, out: Path) -> str: ...


def fit_vocabulary(config: RunConfig, tokenizer: Tokenizer) -> None:
    """``model.vocab_size`` from the tokenizer when it is 0; an error when it is too small for the tokenizer."""
    mcfg = config.model
    if mcfg.vocab_size == 0:
        mcfg.vocab_size = tokenizer.vocab_size
    elif mcfg.vocab_size < tokenizer.vocab_size:
        raise GlmlabError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens", "set model.vocab_size=0 to take it from the data")


class LanguageModelingTask:
    """Maximum likelihood on a data directory made by ``glmlab prepare``: random windows of the token stream,
    or whole ``<bos>``-started sentences (``train.batching``; sentences for families that train on nothing
    else), validated by the NLL of the validation split (and a latent model's KL, active units and mutual
    information). With ``train.fim_rate`` the windows' documents are rearranged to fill in the middle
    (:mod:`glmlab.data.fim`); validation stays plain left-to-right text. With ``init`` the model starts from
    those weights (continued pre-training; :mod:`glmlab.training.initial`)."""

    def __init__(self, data_dir: str | Path, init: InitialWeights | None = None) -> None:
        self.data = open_data_dir(data_dir)
        self.tokenizer = self.data.tokenizer
        self.init = init
        self.starts_from_weights = init is not None
        # prepared for chat (glmlab prepare --chat: the role tokens are in the vocabulary), or the source's
        chat = (self.data.meta.get("options") or {}).get("chat")
        self.chat_template = init.chat_template if init is not None and init.chat_template else \
            CHATML_TEMPLATE if chat else None
        self.notes: list[str] = []
        self.sentences = False
        self.fim_rate = 0.0

    def check(self, config: RunConfig) -> None:
        mcfg, batching = config.model, config.train.batching
        traits = family_traits(mcfg)
        if batching == "windows" and not traits.windows:
            raise GlmlabError(f"model.family={mcfg.family} trains on whole sentences",
                              "drop train.batching=windows (or set train.batching=sentences)")
        self.sentences = batching == "sentences" or (batching == "auto" and not traits.windows)
        self.fim_rate = config.train.fim_rate
        if self.fim_rate > 0:
            self._check_fim(config, traits)
        self._check_tokens(traits.special_tokens)
        if self.init is not None:
            check_tokenizer(self.init, self.tokenizer, self.data.path)
        fit_vocabulary(config, self.tokenizer)
        self.train_tokens = self.data.tokens("train")
        self.val_tokens = self.data.tokens("val")
        if len(self.val_tokens) == 0:
            raise DataError(f"{self.data.path} has an empty validation split",
                            "re-run glmlab prepare with a val fraction")
        if not self.sentences and len(self.val_tokens) < mcfg.block_size + 1:
            raise DataError(f"model.block_size={mcfg.block_size} is larger than the validation split "
                            f"({len(self.val_tokens):,} tokens)", "lower model.block_size or give more validation text")
        self.block_size, self.eval_tokens, self.batch_size = mcfg.block_size, config.train.eval_tokens, \
            config.train.batch_size

    def _check_fim(self, config: RunConfig, traits: Traits) -> None:
        """Fill in the middle rearranges documents of the token stream for a model that predicts the next
        token (not a masked or blank-infilling objective, not a latent-variable model), on windows, not whole
        sentences, and needs the FIM tokens at glmlab's ids."""
        rate, family = config.train.fim_rate, config.model.family
        if traits.objective != "causal" or traits.latent_dim:
            kind = f"its objective is {traits.objective}" if traits.objective != "causal" else "a latent-variable model"
            raise ConfigError(f"train.fim_rate={rate} trains a next-token model on rearranged documents, and "
                              f"model.family={family} is not one ({kind})",
                              "use a family that predicts the next token (gpt, lstm), or set train.fim_rate=0")
        if not traits.windows:
            raise ConfigError(f"train.fim_rate={rate} rearranges the documents of training windows, and "
                              f"model.family={family} trains on whole sentences",
                              "use a family that trains on windows (gpt, lstm), or set train.fim_rate=0")
        if self.sentences:
            raise ConfigError(f"train.fim_rate={rate} rearranges the documents of training windows, and "
                              "train.batching=sentences reads whole sentences",
                              "set train.batching=windows (or auto), or train.fim_rate=0")
        missing = [SPECIAL_TOKENS[ROLES.index(role)] for role in FIM_ROLES
                   if not self.tokenizer.has_role(role, at_glmlab_id=True)]
        if missing:
            raise DataError(f"the tokenizer of {self.data.path} has no fill-in-the-middle tokens at glmlab's ids "
                            f"({', '.join(missing)}): the data was prepared by an older glmlab",
                            f"re-run glmlab prepare for {self.data.path}, or set train.fim_rate=0")

    def _check_tokens(self, model_roles: tuple[str, ...]) -> None:
        """The special tokens the model's own code uses, at the ids glmlab's tokenizers give them, and the
        <bos> and <pad> that sentence batches need."""
        tok = self.tokenizer
        missing = [role for role in model_roles if not tok.has_role(role, at_glmlab_id=True)]
        missing += [role for role in ("bos", "pad") if self.sentences and not tok.has_role(role)]
        if missing:
            raise DataError(f"the tokenizer of {self.data.path} has no <{'>, <'.join(dict.fromkeys(missing))}> token "
                            "where this model and its batches need it",
                            "prepare the data with glmlab prepare (its tokenizers have every special token)")

    def build_model(self, config: RunConfig, fresh: bool) -> nn.Module:
        model = build_model(config.model, sentences=self.sentences)
        if self.init is not None and fresh:
            load_initial(model, self.init)
            self.notes.append(f"starting from the weights of {self.init.source}")
        model.read_vocabulary(self.tokenizer)  # what the family's objective needs to know of the tokens
        return model

    def sampler(self, train: TrainConfig, rank: int, world_size: int) -> Sampler:
        tok = self.tokenizer
        if not self.sentences:
            windows = RandomWindows(self.train_tokens, self.block_size, train.batch_size, train.seed, rank=rank,
                                    world_size=world_size)
            if self.fim_rate > 0:
                return FimWindows(windows, self.fim_rate, train.fim_spm_rate, train.seed)
            return windows
        found = find_sentences(self.train_tokens, tok.eos_id, self.block_size)
        self.val_sentences = find_sentences(self.val_tokens, tok.eos_id, self.block_size)
        cumulative = self.val_sentences.lengths.cumsum()
        self.val_limit = int((cumulative < self.eval_tokens).sum()) + 1 if self.eval_tokens else None
        if found.truncated:
            self.notes.append(f"{found.truncated:,} of {len(found):,} training sentences are longer than "
                              f"model.block_size={self.block_size} and were cut")
        return SentenceBatches(found, train.batch_size, train.seed, tok.bos_id, tok.pad_id, rank=rank,
                               world_size=world_size)

    def loss_module(self, model: nn.Module) -> nn.Module:
        return LossModule(model)

    def some_parameters_unused(self, model: nn.Module) -> bool:
        return bool(model.traits.auxiliary)  # e.g. a seqgan's discriminator: maximum likelihood does not train it

    def later_phases(self, model: nn.Module, sampler: Sampler, device: torch.device,
                     train: TrainConfig) -> list[Phase]:
        if "adversarial" not in model.traits.phases:
            return []
        return [AdversarialPhase(model, sampler.sentences, self.tokenizer.bos_id, device, train.seed,
                                 start=train.max_steps)]

    def _val_batches(self):
        return sentence_batches(self.val_sentences, self.batch_size, self.tokenizer.bos_id, self.tokenizer.pad_id,
                                limit=self.val_limit)

    def evaluate(self, model: nn.Module, device: torch.device, autocast: Any, dist: Distributed) -> Validation:
        """The NLL per token of the first ``train.eval_tokens`` validation tokens (every process scores its
        share of the batches); a latent model's KL, active units and mutual information on the validation
        sentences."""
        shard = (dist.rank, dist.world_size)
        if self.sentences:
            nll, count = sum_nll_batches(model, self._val_batches(), device=device, autocast=autocast, shard=shard)
        else:
            limit = self.eval_tokens or len(self.val_tokens)
            nll, count = sum_nll(model, self.val_tokens[:limit], self.tokenizer.eos_id, batch_size=self.batch_size,
                                 device=device, autocast=autocast, shard=shard)
        nll, count = dist.sum([nll, float(count)], device)
        figures: dict[str, Any] = {}
        if self.sentences and model.traits.latent_dim:
            report = latent_report(model, self._val_batches(), device=device)
            figures = {"kl": report.kl, "active_units": report.active_units, "mutual_info": report.mutual_info}
        return Validation(nll / count, figures)

    def write_samples(self, out: Path, model: nn.Module, train: TrainConfig, step: int, val: float) -> None:
        write_samples(out, model, self.tokenizer, train, step, val)

    def run_files(self) -> dict[str, Any]:
        roles = self.data.meta.get("special_token_roles")  # a tokenizer from elsewhere: which token is which
        return {"data": {"dir": str(self.data.path.resolve()), "tokenizer": self.data.meta["tokenizer"],
                         "vocab_size": self.tokenizer.vocab_size},
                "load": LoadSpec(sentence_level=self.sentences, fim_rate=self.fim_rate).to_dict(),
                **({"special_tokens": roles} if roles else {}),
                **({"init": self.init.describe()} if self.init is not None else {})}

    def describe_step(self, train: TrainConfig, block_size: int, world_size: int) -> str:
        if self.sentences:
            return f"{train.batch_size * train.grad_accum * world_size} sentences/step"
        return f"{train.batch_size * train.grad_accum * block_size * world_size:,} tokens/step"

    def resume_command(self, out: Path) -> str:
        return f"glmlab train --resume --out {out}"
