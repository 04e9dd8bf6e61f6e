"""Fine-tuning tasks: a labelled classification file or prompt/completion pairs, read, encoded and given to the
trainer as a :class:`~glmlab.training.tasks.Task` (its batches, its model — the init run's weights as a
classifier or a language model, LoRA where asked — and its validation), so fine-tuning runs in the
pre-training loop: progress bar, metrics.jsonl, checkpoints, Ctrl-C, resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from glmlab.config import RunConfig, TrainConfig, config_from_dict
from glmlab.data.tokenizer import CHAT_TOKENS, Tokenizer, train_tokenizer
from glmlab.errors import ConfigError, DataError, RunDirError
from glmlab.finetune.classifier import MODES, POOLINGS, SequenceClassifier, padding_of
from glmlab.finetune.cloze import Cloze, ClozeClassifier
from glmlab.finetune.conversations import encode_conversations, is_conversations, pack, read_conversations
from glmlab.finetune.examples import (
    ExampleBatches,
    Examples,
    encode_pairs,
    encode_texts,
    read_labelled,
    read_pairs,
    sort_labels,
)
from glmlab.finetune.metrics import classification_metrics
from glmlab.finetune.preferences import (
    LOSSES,
    PreferenceObjective,
    encode_preferences,
    read_preferences,
    reward_figures,
)
from glmlab.generation.chat import CHATML_TEMPLATE, PLAIN_TEMPLATE, TEMPLATE_FILE, ChatTemplate
from glmlab.models import build_model, family_traits
from glmlab.models.lora import add_lora
from glmlab.runs import TOKENIZER, LoadSpec, file_sha256, load_weights_as_written, read_run_config, weights_path
from glmlab.training.distributed import Distributed
from glmlab.training.phases import Phase
from glmlab.training.tasks import LossModule, Sampler, Validation, fit_vocabulary
from glmlab.training.trainer import config_changes

TASKS = ("classify", "sft", "dpo")


MODEL_KEYS_TUNABLE = ("dropout",)  # what a fine-tune may change in a pre-trained run's model section


@dataclass
class FinetuneOptions:
    """What to fine-tune on what; saved in config.json["finetune"] so ``--resume`` needs only ``--out``."""

    task: str  # classify | sft
    init: str | None  # a run directory, or None: fresh weights
    train: str
    val: str | None = None
    test: str | None = None
    mode: str = "full"  # full | probe | lora
    pooling: str = "last"
    class_weights: str = "none"  # none | balanced
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lm_weight: float = 0.0  # classify: weight of the auxiliary language-modelling loss (GPT-1: 0.5)
    text_column: str | None = None
    label_column: str = "label"
    arch: str | None = None  # with init None: the architecture and tokenizer of this run
    tokenizer: str = "word"  # with init None and no arch: a tokenizer trained on the training texts
    vocab_size: int | None = None
    val_fraction: float = 0.1  # sft without --val: pairs held out for validation
    eval_samples: int = 200  # sft: held-out pairs whose completions are generated and scored
    max_new_tokens: int | None = None  # sft: generation cap (default: longest reference + 16)
    pattern: str | None = None  # classify as a cloze: "{text} ... [MASK] ..." (with verbalizer)
    verbalizer: str | None = None  # "LABEL=WORD,...": the word at the blank for each label
    chat_template: str | None = None  # sft: a Jinja chat template file (default: the init run's, or ChatML)
    pack: bool = False  # sft: join short training examples into rows of up to the context
    beta: float = 0.1  # dpo: strength of the pull toward the reference (the KL penalty's coefficient)
    loss: str = "sigmoid"  # dpo: sigmoid (DPO), ipo, robust or cdpo
    label_smoothing: float = 0.0  # dpo, robust and cdpo: the probability that a pair's preference is wrong
    rpo_alpha: float = 0.0  # dpo: weight of the chosen answers' NLL added to the loss (RPO)
    reference: str | None = None  # dpo: the frozen reference run (None: the init run)
    metric_tokenizer: str = "auto"  # sft: the units of exact match, BLEU and ROUGE-L (text_units)

    def cloze(self) -> Cloze | None:
        """The cloze of ``pattern`` and ``verbalizer``; None for a classifier with a head."""
        return Cloze.parse(self.pattern, self.verbalizer) if self.pattern is not None else None

    def check(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown fine-tuning task {self.task!r}", f"use one of: {', '.join(TASKS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}", f"use one of: {', '.join(MODES)}")
        if self.task in ("sft", "dpo") and self.mode == "probe":
            raise ConfigError(f"--mode probe trains a classification head on frozen features; {self.task} has no head",
                              "use --mode full or --mode lora")
        if self.task == "dpo":
            if self.init is None:
                raise ConfigError("dpo needs --init: the run it starts from is also its frozen reference",
                                  "pass --init SFT_RUN (a run fine-tuned with glmlab finetune sft)")
            if self.beta <= 0 or self.loss not in LOSSES or not 0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"dpo with --beta {self.beta}, --loss {self.loss} and --label-smoothing "
                                  f"{self.label_smoothing}", f"use --beta > 0, --loss one of {', '.join(LOSSES)} and "
                                  "--label-smoothing in [0, 0.5)")
            if not self.rpo_alpha >= 0:
                raise ConfigError(f"--rpo-alpha {self.rpo_alpha}: the weight of the chosen answers' NLL",
                                  "use --rpo-alpha >= 0 (0: DPO alone; 1: RPO's usual weight)")
            if self.label_smoothing and self.loss not in ("robust", "cdpo"):
                raise ConfigError(f"--label-smoothing is the robust and cdpo losses' flip probability, and --loss is "
                                  f"{self.loss}", "add --loss cdpo or --loss robust, or drop --label-smoothing")
            if self.loss == "cdpo" and not self.label_smoothing:
                raise ConfigError("--loss cdpo without --label-smoothing is plain DPO",
                                  "give --label-smoothing ε in (0, 0.5), e.g. 0.1, or use --loss sigmoid")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown --pooling {self.pooling!r}", f"use one of: {', '.join(POOLINGS)}")
        if self.class_weights not in ("none", "balanced"):
            raise ConfigError(f"unknown --class-weights {self.class_weights!r}", "use none or balanced")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ConfigError("--lora-rank must be >= 1 and --lora-alpha > 0", "e.g. --lora-rank 8 --lora-alpha 16")
        if self.lm_weight < 0 or (self.lm_weight > 0 and (self.task != "classify" or self.mode == "probe")):
            raise ConfigError(f"--lm-weight {self.lm_weight}: the auxiliary LM loss is for classify with --mode "
                              "full or lora, and cannot be negative", "drop --lm-weight")
        if self.init is None and self.mode != "full":
            raise ConfigError(f"--mode {self.mode} freezes pre-trained weights, and --init none has none",
                              "use --mode full with --init none")
        if (self.pattern is None) != (self.verbalizer is None):
            raise ConfigError("a cloze needs both --pattern and --verbalizer", 'e.g. --pattern "{text} It was [MASK]." '
                              '--verbalizer "positive=great,negative=terrible"')
        if self.pattern is not None:
            if self.task != "classify" or self.mode == "probe":
                raise ConfigError("--pattern/--verbalizer classify as a cloze: classify with --mode full or lora "
                                  "(a probe would train nothing)", "drop --pattern/--verbalizer, or change --mode")
            if self.lm_weight or self.pooling != "last":
                raise ConfigError("a cloze reads the blank: --pooling and --lm-weight are for a head",
                                  "drop --pooling/--lm-weight, or --pattern/--verbalizer")
            self.cloze()  # refuse a malformed pattern or verbalizer before anything is read
        if self.reference is not None and self.task != "dpo":
            raise ConfigError("--reference is dpo's frozen reference model", "drop --reference")
        if self.task != "sft" and (self.chat_template is not None or self.pack):
            raise ConfigError("--chat-template and --pack are for sft", "drop them")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val fraction {self.val_fraction} is not between 0 and 1", "e.g. 0.1")


def _source(path: str | None) -> dict[str, str] | None:
    return None if path is None else {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}


def load_with_new_tokens(model: nn.Module, config: RunConfig, spec: LoadSpec, path: Path, added: int) -> None:
    """The init run's weights into ``model``, whose vocabulary has ``added`` more tokens: every table with a row
    per token gets new rows at the mean of its rows (a start that neither dominates nor vanishes)."""
    old_vocab = config.model.vocab_size - added
    source = build_model(dataclasses.replace(config.model, vocab_size=old_vocab))
    load_weights_as_written(source, spec, path)
    target = model.state_dict()
    state = {}
    for name, tensor in source.state_dict().items():
        want = target[name]
        if want.shape != tensor.shape and tensor.shape[0] == old_vocab and want.shape[1:] == tensor.shape[1:]:
            tensor = torch.cat([tensor, tensor.mean(0, keepdim=True).expand(added, *tensor.shape[1:])])
        state[name] = tensor
    model.load_state_dict(state)


class FinetuneTask:
    """A fine-tuning task, read and encoded (tokenizer, examples per split, label set, notes for the user), and
    the trainer's :class:`~glmlab.training.tasks.Task` for it."""

    def __init__(self, options: FinetuneOptions, config: RunConfig, init_raw: dict[str, Any] | None,
                 tokenizer: Tokenizer | None = None, bos: bool | None = None,
                 chat_template: str | None = None) -> None:
        self.options, self.config = options, config
        self.path = Path(options.train)
        self.notes: list[str] = []
        self.init_raw = init_raw
        self.starts_from_weights = options.init is not None  # a step-0 checkpoint keeps them for a resume
        self.given_tokenizer = tokenizer  # a resumed run's own
        self.chat_template = chat_template  # the run's chat template (Jinja), written beside its tokenizer
        self.stop_token_ids: list[int] = []  # what ends a reply (the template's end of turn)
        self.added_tokens = 0  # role tokens added to the init run's vocabulary (its embeddings grow)
        # as the init run read its text: <bos>-started sentences (its load section, or its family's only way)
        sentences = LoadSpec.of(init_raw or {}).sentence_level
        self.bos = bos if bos is not None else family_traits(config.model, sentences).sentence_level
        if options.task == "classify":
            self._read_classification()
        elif options.task == "dpo":
            self._check_reference()
            self._read_preferences()
        else:
            self._read_sft()
        self.pad_id = padding_of(self.tokenizer)[0]

    # --- reading -----------------------------------------------------------------------------------------

    def _tokenizer(self, texts: list[str]) -> Tokenizer:
        if self.given_tokenizer is not None:
            return self.given_tokenizer
        source = self.options.init or self.options.arch
        if source:
            return Tokenizer.from_file(Path(source) / TOKENIZER, (self.init_raw or {}).get("special_tokens"))
        return train_tokenizer(self.options.tokenizer, texts, self.options.vocab_size)

    def _note_unknown(self, sequences: list[list[int]], texts: list[str], split: str) -> None:
        note = self.tokenizer.unknown_note(sequences, texts, f"{split} examples")
        if note is not None:
            self.notes.append(note)

    def _note_cut(self, cut: int, total: int, split: str) -> None:
        if cut:
            self.notes.append(f"{cut:,} of {total:,} {split} texts are longer than the context "
                              f"(model.block_size={self.config.model.block_size}) and were truncated")

    @functools.cached_property
    def reference_run(self) -> tuple[Path, dict[str, Any]]:
        """dpo's frozen reference: its run directory and raw config (``--reference``, else the init run)."""
        o = self.options
        if o.reference is None:
            return Path(o.init or ""), self.init_raw or {}
        return Path(o.reference), read_run_config(Path(o.reference))[1]

    def _check_reference(self) -> None:
        """A --reference other than the init run must read text as the init run does: the same model (what a
        fine-tune may change aside), the same tokenizer file, and weights to load. (A resumed run was checked
        when it started.)"""
        o = self.options
        if o.reference is None or self.given_tokenizer is not None:
            return
        path, raw = self.reference_run
        if LoadSpec.of(raw).head == "classifier":
            raise RunDirError(f"--reference {o.reference} is a fine-tuned classifier, not a language model",
                              "give the run the policy was fine-tuned from (e.g. the SFT run)")
        # resolved configs, so that a run written before a key existed compares by that key's default
        changed = [k for k in config_changes(config_from_dict(self.init_raw or {}), config_from_dict(raw))
                   if k.removeprefix("model.") not in MODEL_KEYS_TUNABLE]
        if changed:
            raise RunDirError(f"--reference {o.reference} is another model than --init {o.init} "
                              f"({', '.join(changed)} differ)",
                              "give a reference of the init run's architecture (the run it was fine-tuned from)")
        mine, theirs = Path(o.init or "") / TOKENIZER, path / TOKENIZER
        if not theirs.is_file() or file_sha256(theirs) != file_sha256(mine):
            raise RunDirError(f"--reference {o.reference} reads text with another tokenizer than --init {o.init}",
                              "give a reference that shares the init run's tokenizer.json")
        weights_path(path, "best")  # refuses a run with no weights now, not after the data are read

    def _read_classification(self) -> None:
        o = self.options
        if o.val is None:
            raise DataError("no validation file", "add --val FILE (used for early stopping and model selection)")
        train = read_labelled(o.train, o.text_column, o.label_column)
        self.labels = sort_labels(train.labels)
        if len(self.labels) < 2:
            raise DataError(f"{train.path} has a single class ({self.labels[0]!r}); a classifier needs two or more",
                            f"check --label-column ({o.label_column!r}) and the file")
        splits = {"train": train, "val": read_labelled(o.val, o.text_column, o.label_column)}
        if o.test is not None:
            splits["test"] = read_labelled(o.test, o.text_column, o.label_column)
        for data in splits.values():
            unseen = ", ".join(map(repr, sort_labels(set(data.labels) - set(self.labels))[:5]))
            if unseen:
                raise DataError(f"{data.path} has labels that {train.path} never has: {unseen}",
                                "every label must appear in the training file")
            if data.skipped:
                self.notes.append(f"{data.skipped:,} rows of {data.path.name} have an empty text and were skipped")
        self.tokenizer = self._tokenizer(train.texts)
        cloze = o.cloze()
        self.word_ids = cloze.word_ids(self.tokenizer, self.labels) if cloze is not None else None
        encode = cloze.encode if cloze is not None else encode_texts
        index = {label: i for i, label in enumerate(self.labels)}
        self.splits: dict[str, Examples] = {}
        for name, data in splits.items():
            ids, cut = encode(self.tokenizer, data.texts, self.config.model.block_size, self.bos)
            self._note_cut(cut, len(ids), name)
            self._note_unknown(ids, data.texts, name)
            self.splits[name] = Examples(ids, labels=[index[label] for label in data.labels], truncated=cut)
        counts = np.bincount(self.splits["train"].labels, minlength=len(self.labels))
        self.class_counts = counts.tolist()

    def _read_sft(self) -> None:
        """Prompt/completion pairs, or conversations rendered by the run's chat template (role tokens added to the
        vocabulary for the default ChatML template)."""
        o = self.options
        chat = is_conversations(o.train)
        splits = self._read_splits(read_conversations if chat else read_pairs, "examples")
        data = splits["train"]
        texts = [m["content"] for c in data for m in c.messages] if chat else [p.prompt + " " + p.completion
                                                                               for p in data]
        self.tokenizer = self._tokenizer(texts)
        self.chat_template = self.chat_template or self._template_source(chat)
        if self.chat_template == CHATML_TEMPLATE and self.given_tokenizer is None:
            self.tokenizer = self.tokenizer.with_special_tokens(CHAT_TOKENS)
        template = ChatTemplate(self.chat_template or PLAIN_TEMPLATE, self.tokenizer)
        self.stop_token_ids = list(template.end_ids) if chat else []
        self.pairs = {name: [c.last_turn(template) for c in split] if chat else split for name, split in splits.items()}
        self.splits = {}
        block = self.config.model.block_size
        for name, split in splits.items():
            examples = encode_conversations(self.tokenizer, template, split, block, self.bos) if chat else \
                encode_pairs(self.tokenizer, split, block, self.bos)
            self._note_cut(examples.truncated, len(examples), name)
            self._note_unknown(examples.inputs, [" ".join(m["content"] for m in c.messages) for c in split] if chat
                               else [p.prompt + " " + p.completion for p in split], name)
            if name == "train" and o.pack:
                packed = pack(examples, block)
                self.notes.append(f"packed {len(examples):,} training examples into {len(packed):,} rows")
                examples = packed
            self.splits[name] = examples

    def _read_preferences(self) -> None:
        """Preference pairs, their prompts as text or as messages for the init run's chat template."""
        o = self.options
        splits = self._read_splits(read_preferences, "pairs")
        self.tokenizer = self._tokenizer([])
        self.chat_template = self.chat_template or self._template_source(False)
        chat = [isinstance(p.prompt, list) for part in splits.values() for p in part]
        if any(chat) and not all(chat):
            raise DataError(f"{o.train}: some prompts are text and some are messages",
                            "give every prompt in one form")
        template = ChatTemplate(self.chat_template or PLAIN_TEMPLATE, self.tokenizer) if any(chat) else None
        end_ids = template.end_ids if template is not None else []
        self.splits = {}
        for name, part in splits.items():
            examples = encode_preferences(self.tokenizer, template, part, self.config.model.block_size, self.bos,
                                          end_ids)
            self._note_cut(examples.truncated, len(examples), name)
            prompts = [p.prompt if isinstance(p.prompt, str) else " ".join(m["content"] for m in p.prompt)
                       for p in part]
            self._note_unknown(examples.chosen.inputs + examples.rejected.inputs,
                               [f"{q} {p.chosen}" for q, p in zip(prompts, part, strict=True)]
                               + [f"{q} {p.rejected}" for q, p in zip(prompts, part, strict=True)], name)
            self.splits[name] = examples

    def _read_splits(self, read: Callable[[str], list[Any]], unit: str) -> dict[str, list[Any]]:
        """The training file read by ``read``, the validation file (or a seeded ``val_fraction`` of the training
        examples held out) and the test file if given."""
        o = self.options
        data = read(o.train)
        if o.val is not None:
            val = read(o.val)
        else:
            if len(data) < 2:
                raise DataError(f"{o.train} holds a single one of its {unit}: nothing to hold out for validation",
                                f"give more {unit}, or a validation file with --val")
            order = np.random.default_rng(0).permutation(len(data))
            held = max(1, round(len(data) * o.val_fraction))
            val = [data[i] for i in sorted(order[:held])]
            data = [data[i] for i in sorted(order[held:])]
            self.notes.append(f"held out {held:,} of {held + len(data):,} {unit} for validation (no --val given)")
        splits = {"train": data, "val": val}
        if o.test is not None:
            splits["test"] = read(o.test)
        return splits

    def _template_source(self, chat: bool) -> str | None:
        """The chat template the run will carry: --chat-template's file, else the init run's, else ChatML for
        conversations (None: a run without one, which chats with the plain template)."""
        o = self.options
        if o.chat_template is not None:
            path = Path(o.chat_template)
            if not path.is_file():
                raise DataError(f"chat template {path} does not exist", "give a Jinja file to --chat-template")
            return path.read_text(encoding="utf-8")
        source = o.init or o.arch
        if source and (Path(source) / TEMPLATE_FILE).is_file():
            return (Path(source) / TEMPLATE_FILE).read_text(encoding="utf-8")
        return CHATML_TEMPLATE if chat else None

    # --- the trainer's task --------------------------------------------------------------------------------

    def check(self, config: RunConfig) -> None:
        if config.train.fim_rate > 0:
            raise ConfigError(f"train.fim_rate={config.train.fim_rate} rearranges pre-training windows; fine-tuning "
                              "reads examples", "drop train.fim_rate")
        self.added_tokens = max(0, self.tokenizer.vocab_size - config.model.vocab_size) \
            if self.given_tokenizer is None and self.options.init is not None else 0
        if self.added_tokens:  # the role tokens: the init run's embeddings grow by as many rows
            config.model.vocab_size = self.tokenizer.vocab_size
            self.notes.append(f"added {self.added_tokens} chat role token(s) to the vocabulary (new embedding rows "
                              "start at the mean of the others)")
        fit_vocabulary(config, self.tokenizer)
        self.batch_size = config.train.batch_size

    def build_model(self, config: RunConfig, fresh: bool) -> nn.Module:
        """The model to train: the init run's weights (or fresh ones; a resume loads its checkpoint), as a
        classifier or an LM, with LoRA."""
        o = self.options
        backbone = build_model(config.model, sentences=self.bos)
        if o.init is not None and fresh:
            spec = LoadSpec.of(self.init_raw or {})
            if self.added_tokens:
                load_with_new_tokens(backbone, config, spec, weights_path(Path(o.init), "best"), self.added_tokens)
            else:
                load_weights_as_written(backbone, spec, weights_path(Path(o.init), "best"))
        self.lora_parameters = add_lora(backbone, o.lora_rank, o.lora_alpha) if o.mode == "lora" else 0
        model: nn.Module = backbone
        if o.task == "classify" and self.word_ids is not None:
            model = ClozeClassifier(backbone, self.word_ids)
        elif o.task == "classify":
            pad_id, pad_ends_texts = padding_of(self.tokenizer)
            model = SequenceClassifier(backbone, len(self.labels), o.pooling, pad_id, dropout=config.model.dropout,
                                       frozen=o.mode == "probe", lm_weight=o.lm_weight, pad_ends_texts=pad_ends_texts)
            if o.class_weights == "balanced":
                counts = torch.tensor(self.class_counts, dtype=torch.float32)
                model.class_weights.copy_(counts.sum() / (len(counts) * counts.clamp(min=1)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.parameter_counts = {"trainable_parameters": trainable, "total_parameters": total}
        start = f"from {o.init}" if o.init else "from scratch"
        self.notes.append(f"finetune {o.task} ({o.mode}, {start}): {trainable:,} of {total:,} parameters trainable")
        return model

    def sampler(self, train: TrainConfig, rank: int, world_size: int) -> Sampler:
        return ExampleBatches(self.splits["train"], train.batch_size, train.seed, self.pad_id, rank=rank,
                              world_size=world_size)

    def loss_module(self, model: nn.Module) -> nn.Module:
        """The model's own loss; for dpo, the preference loss against a frozen copy of the reference run (by
        default the init run)."""
        if self.options.task != "dpo":
            return LossModule(model)
        o = self.options
        source, raw = self.reference_run
        reference = build_model(self.config.model, sentences=self.bos)
        load_weights_as_written(reference, LoadSpec.of(raw), weights_path(source, "best"))
        self.objective = PreferenceObjective(model, reference.to(next(model.parameters()).device), o.beta, o.loss,
                                             o.label_smoothing, o.rpo_alpha)
        return self.objective

    def some_parameters_unused(self, model: nn.Module) -> bool:
        return self.options.task == "classify"  # e.g. the language model's output bias

    def later_phases(self, model: nn.Module, sampler: Sampler, device: torch.device,
                     train: TrainConfig) -> list[Phase]:
        return []

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Any, dist: Distributed) -> Validation:
        """The loss on the validation split (every process scores all of it), and accuracy / macro-F1."""
        figures = evaluate_split(model, self, "val", self.batch_size, device, autocast)
        kept = ("accuracy", "macro_f1", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected",
                "chosen_nll")
        return Validation(figures["loss"], {k: figures[k] for k in kept if k in figures})

    def write_samples(self, out: Path, model: nn.Module, train: TrainConfig, step: int, val: float) -> None:
        pass  # completions are scored once, with the best weights (results.json)

    def run_files(self) -> dict[str, Any]:
        init_raw = self.init_raw or {}
        o = self.options
        adapters = [{"kind": "lora", "rank": o.lora_rank, "alpha": o.lora_alpha}] if o.mode == "lora" else []
        return {
            # dir: the pre-training data, so glmlab eval / compare score what fine-tuning kept of it
            "data": {"dir": (init_raw.get("data") or {}).get("dir"), "tokenizer": self.tokenizer.kind,
                     "vocab_size": self.tokenizer.vocab_size, "init_data": init_raw.get("data")},
            **({"special_tokens": init_raw["special_tokens"]} if "special_tokens" in init_raw else {}),
            "finetune": {**self.describe(), **self.parameter_counts},
            "load": LoadSpec(sentence_level=self.bos, adapters=adapters,
                             head="classifier" if o.task == "classify" else "lm").to_dict()}

    def describe_step(self, train: TrainConfig, block_size: int, world_size: int) -> str:
        unit = "pairs" if self.options.task == "dpo" else "examples"
        return f"{train.batch_size * train.grad_accum * world_size} {unit}/step"

    def resume_command(self, out: Path) -> str:
        return f"glmlab finetune {self.options.task} --resume --out {out}"

    def describe(self) -> dict[str, Any]:
        """The finetune section of config.json."""
        sources = dataclasses.asdict(self.options)
        out: dict[str, Any] = {**sources, "bos": self.bos,
                               "sources": {k: _source(sources[k]) for k in ("train", "val", "test")}}
        if self.options.init:
            out["init"] = str(Path(self.options.init).resolve())
        if self.options.task == "classify":
            out.update(labels=self.labels, class_counts=self.class_counts)
        return out


@torch.no_grad()
def evaluate_split(model: nn.Module, task: FinetuneTask, split: str, batch_size: int, device: torch.device,
                   amp: Any = None) -> dict[str, Any]:
    """Loss on a split (mean cross-entropy per example for classify, per completion token for sft), plus
    accuracy / macro-F1 / confusion matrix for classify."""
    if task.options.task == "dpo":
        return preference_figures(model, task, split, batch_size, device, amp)
    examples = task.splits[split]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predicted = np.zeros(len(examples), dtype=np.int64)
    try:
        for rows, x, y in examples.batches(batch_size, task.pad_id):
            x, y = x.to(device), y.to(device)
            with amp or nullcontext():
                if task.options.task == "classify":
                    logits = model(x).float()
                    total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                    predicted[rows] = logits.argmax(-1).cpu().numpy()
                    count += len(rows)
                else:
                    total += float(model.nll(x, y))
                    count += int((y != -100).sum())
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"loss": total / max(count, 1)}
    if task.options.task == "classify":
        out.update(classification_metrics(np.array(examples.labels), predicted, len(task.labels)))
    else:
        out.update(completion_nll=total / len(examples), tokens=count, ppl=math.exp(min(out["loss"], 50)))
    return out




@torch.no_grad()
def preference_figures(model: nn.Module, task: FinetuneTask, split: str, batch_size: int, device: torch.device,
                       amp: Any = None) -> dict[str, Any]:
    """The preference loss on a split's pairs and its figures: mean rewards of the chosen and rejected answers,
    their margin and how often the chosen one is ahead (preference accuracy)."""
    objective = task.objective
    was_training = model.training
    model.eval()
    losses, chosen, rejected, logps, tokens = [], [], [], [], []
    try:
        for _, x, y in task.splits[split].batches(batch_size, task.pad_id):
            with amp or nullcontext():
                loss, c, r, logp, n = objective.pair_losses(x.to(device), y.to(device))
            for kept, value in zip((losses, chosen, rejected, logps, tokens), (loss, c, r, logp, n), strict=True):
                kept.append(value.float().cpu())
    finally:
        model.train(was_training)
    loss_t, chosen_t, rejected_t = torch.cat(losses), torch.cat(chosen), torch.cat(rejected)
    figures = {k: float(v) for k, v in reward_figures(chosen_t, rejected_t).items()}
    total, nll = objective.total(loss_t, torch.cat(logps), torch.cat(tokens))
    if nll is not None:
        figures["chosen_nll"] = float(nll)
    return {"loss": float(total), **figures, "pairs": len(loss_t)}
