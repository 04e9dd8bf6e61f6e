"""``glmlab finetune classify|sft``: a pre-trained run (or fresh weights) fine-tuned on a downstream task by the
same trainer as pre-training (progress bar, metrics.jsonl, checkpoints, Ctrl-C, resume), then measured.

The run directory is a training run's (config.json, tokenizer.json, checkpoints, best/, metrics.jsonl,
loss.png) plus ``config.json["finetune"]`` (task, init, mode, label set, sources) and ``results.json``
(the best weights measured on val and test: accuracy / macro-F1 / confusion matrix for classify; completion
NLL, exact match, BLEU, ROUGE-L for sft, with the init model's figures before fine-tuning).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from glmlab import atomic
from glmlab.config import RunConfig, parse_overrides, resolve_config, suggest
from glmlab.data.tokenizer import Tokenizer, train_tokenizer
from glmlab.errors import ConfigError, DataError, GlmlabError, RunDirError
from glmlab.finetune.classifier import MODES, POOLINGS, SequenceClassifier, check_backbone, feature_width
from glmlab.finetune.examples import (
    ExampleBatches,
    Examples,
    encode_pairs,
    encode_texts,
    read_labelled,
    read_pairs,
    sort_labels,
)
from glmlab.finetune.lora import add_lora
from glmlab.finetune.metrics import classification_metrics, generation_metrics
from glmlab.finetune.report import RESULTS
from glmlab.models import build_model
from glmlab.runs import BEST_DIR, CONFIG, TOKENIZER, WEIGHTS, file_sha256, load_weights, read_run_config, weights_path
from glmlab.training.trainer import Trainer, TrainResult

TASKS = ("classify", "sft")
# Fine-tuning defaults under the user's --config and overrides: short, evaluated often, early-stopped.
TRAIN_DEFAULTS: dict[str, Any] = {"max_steps": 1000, "warmup_steps": 50, "eval_interval": 100, "patience": 5,
                                  "weight_decay": 0.01, "sample_tokens": 0, "log_interval": 10}
MODE_LR = {"full": 1e-4, "probe": 1e-3, "lora": 1e-3}
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

    def check(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown fine-tuning task {self.task!r}", f"use one of: {', '.join(TASKS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}", f"use one of: {', '.join(MODES)}")
        if self.task == "sft" and self.mode == "probe":
            raise ConfigError("--mode probe trains a classification head on frozen features; sft has no head",
                              "use --mode full or --mode lora")
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
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val fraction {self.val_fraction} is not between 0 and 1", "e.g. 0.1")


def _source(path: str | None) -> dict[str, str] | None:
    return None if path is None else {"path": str(Path(path).resolve()), "sha256": file_sha256(Path(path))}


class Task:
    """A fine-tuning task, read and encoded: tokenizer, examples per split, label set, notes for the user."""

    def __init__(self, options: FinetuneOptions, config: RunConfig, init_raw: dict[str, Any] | None,
                 tokenizer: Tokenizer | None = None, bos: bool | None = None) -> None:
        self.options, self.config = options, config
        self.path = Path(options.train)
        self.notes: list[str] = []
        self.init_raw = init_raw
        self.given_tokenizer = tokenizer  # a resumed run's own
        sentences = bool(init_raw and init_raw.get("train", {}).get("batching") == "sentences")
        self.bos = bos if bos is not None else sentences
        if options.task == "classify":
            self._read_classification()
        else:
            self._read_pairs()

    # --- reading -----------------------------------------------------------------------------------------

    def _tokenizer(self, texts: list[str]) -> Tokenizer:
        if self.given_tokenizer is not None:
            return self.given_tokenizer
        source = self.options.init or self.options.arch
        if source:
            return Tokenizer.from_file(Path(source) / TOKENIZER, (self.init_raw or {}).get("special_tokens"))
        return train_tokenizer(self.options.tokenizer, texts, self.options.vocab_size)

    def _note_cut(self, cut: int, total: int, split: str) -> None:
        if cut:
            self.notes.append(f"{cut:,} of {total:,} {split} texts are longer than the context "
                              f"(model.block_size={self.config.model.block_size}) and were truncated")

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
        index = {label: i for i, label in enumerate(self.labels)}
        self.splits: dict[str, Examples] = {}
        for name, data in splits.items():
            ids, cut = encode_texts(self.tokenizer, data.texts, self.config.model.block_size, self.bos)
            self._note_cut(cut, len(ids), name)
            self.splits[name] = Examples(ids, labels=[index[label] for label in data.labels], truncated=cut)
        counts = np.bincount(self.splits["train"].labels, minlength=len(self.labels))
        self.class_counts = counts.tolist()

    def _read_pairs(self) -> None:
        o = self.options
        pairs = read_pairs(o.train)
        if o.val is not None:
            val = read_pairs(o.val)
        else:
            if len(pairs) < 2:
                raise DataError(f"{o.train} holds a single pair: nothing to hold out for validation",
                                "give more pairs, or a validation file with --val")
            order = np.random.default_rng(0).permutation(len(pairs))
            held = max(1, round(len(pairs) * o.val_fraction))
            val = [pairs[i] for i in sorted(order[:held])]
            pairs = [pairs[i] for i in sorted(order[held:])]
            self.notes.append(f"held out {held:,} of {held + len(pairs):,} pairs for validation (no --val given)")
        splits = {"train": pairs, "val": val}
        if o.test is not None:
            splits["test"] = read_pairs(o.test)
        self.pairs = splits
        self.tokenizer = self._tokenizer([p.prompt + " " + p.completion for p in pairs])
        self.splits = {}
        for name, data in splits.items():
            examples = encode_pairs(self.tokenizer, data, self.config.model.block_size, self.bos)
            self._note_cut(examples.truncated, len(examples), name)
            self.splits[name] = examples

    # --- the model ---------------------------------------------------------------------------------------

    def build_model(self, load_init: bool) -> nn.Module:
        """The model to train: the init run's weights (or fresh ones), as a classifier or an LM, with LoRA."""
        o, config = self.options, self.config
        backbone = build_model(config.model)
        if o.task == "classify":
            check_backbone(backbone, config.model.family)
        if o.init is not None and load_init:
            load_backbone(backbone, Path(o.init), self.init_raw or {})
        self.lora_parameters = add_lora(backbone, o.lora_rank, o.lora_alpha) if o.mode == "lora" else 0
        if o.task == "sft":
            backbone.sentence_level = self.bos
            return backbone
        model = SequenceClassifier(backbone, len(self.labels), o.pooling, self.tokenizer.pad_id,
                                   feature_width(backbone), dropout=getattr(config.model, "dropout", 0.1),
                                   frozen=o.mode == "probe", lm_weight=o.lm_weight)
        if o.class_weights == "balanced":
            counts = torch.tensor(self.class_counts, dtype=torch.float32)
            model.class_weights.copy_(counts.sum() / (len(counts) * counts.clamp(min=1)))
        return model

    def describe(self) -> dict[str, Any]:
        """The finetune section of config.json."""
        out: dict[str, Any] = {**dataclasses.asdict(self.options), "bos": self.bos,
                               "sources": {k: _source(getattr(self.options, k)) for k in ("train", "val", "test")}}
        if self.options.init:
            out["init"] = str(Path(self.options.init).resolve())
        if self.options.task == "classify":
            out.update(labels=self.labels, class_counts=self.class_counts)
        return out


def load_backbone(model: nn.Module, run_dir: Path, raw: dict[str, Any], checkpoint: str = "best") -> None:
    """Load a run's weights into ``model`` (a LoRA fine-tune's weights are merged into plain ones)."""
    lora = raw.get("finetune", {})
    if lora.get("mode") == "lora":
        from glmlab.finetune.lora import merge_lora

        add_lora(model, int(lora["lora_rank"]), float(lora["lora_alpha"]))
        load_weights(model, weights_path(run_dir, checkpoint))
        merge_lora(model)
        model.requires_grad_(True)
        return
    load_weights(model, weights_path(run_dir, checkpoint))


class FinetuneTrainer(Trainer):
    """The pre-training loop on a :class:`Task`: its batches, its model, its validation metrics."""

    def __init__(self, config: RunConfig, task: Task, out: str | Path, resume: bool = False,
                 show_progress: bool = True) -> None:
        self.task = task
        super().__init__(config, task, out, resume=resume, show_progress=show_progress)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        self.parameter_counts = {"trainable_parameters": trainable, "total_parameters": total}
        o = task.options
        start = f"from {o.init}" if o.init else "from scratch"
        self.notes.extend(task.notes)
        self.notes.append(f"finetune {o.task} ({o.mode}, {start}): {trainable:,} of {total:,} parameters trainable")

    def _open_data(self, task: Task) -> None:
        self.data = task
        self.tokenizer = task.tokenizer

    def _check_data(self) -> None:
        self.sentence_mode = False
        if self.mcfg.vocab_size == 0:
            self.mcfg.vocab_size = self.tokenizer.vocab_size

    def _build_model(self) -> nn.Module:
        return self.task.build_model(load_init=not self.resume)

    def _make_sampler(self) -> None:
        self.sampler = ExampleBatches(self.task.splits["train"], self.cfg.batch_size, self.cfg.seed,
                                      self.tokenizer.pad_id, rank=self.dist.rank, world_size=self.dist.world_size)

    def _step_description(self, tokens_per_step: int) -> str:
        return f"{self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size} examples/step"

    def _resume_command(self) -> str:
        return f"glmlab finetune {self.task.options.task} --resume --out {self.out}"

    @torch.no_grad()
    def _evaluate(self) -> float:
        figures = evaluate_split(self.model, self.task, "val", self.cfg.batch_size, self.device, self.amp)
        self.eval_extras = {k: figures[k] for k in ("accuracy", "macro_f1") if k in figures}
        return figures["loss"]

    def _write_samples(self, val: float) -> None:
        pass

    def _write_run_files(self) -> None:
        kept: dict[str, Any] = {}
        if self.resume:
            kept = json.loads((self.out / CONFIG).read_text(encoding="utf-8"))
        else:
            self.tokenizer.save(self.out / TOKENIZER)
        init_raw = self.task.init_raw or {}
        atomic.write_json(self.out / CONFIG, {
            **kept, **self.config.to_dict(),
            # dir: the pre-training data, so glmlab eval / compare score what fine-tuning kept of it
            "data": {"dir": (init_raw.get("data") or {}).get("dir"), "tokenizer": self.tokenizer.kind,
                     "vocab_size": self.tokenizer.vocab_size, "init_data": init_raw.get("data")},
            **({"special_tokens": init_raw["special_tokens"]} if "special_tokens" in init_raw else {}),
            "finetune": {**self.task.describe(), **self.parameter_counts},
            "world_size": self.dist.world_size})


@torch.no_grad()
def evaluate_split(model: nn.Module, task: Task, split: str, batch_size: int, device: torch.device,
                   amp: Any = None) -> dict[str, Any]:
    """Loss on a split (mean cross-entropy per example for classify, per completion token for sft), plus
    accuracy / macro-F1 / confusion matrix for classify."""
    examples = task.splits[split]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predicted = np.zeros(len(examples), dtype=np.int64)
    try:
        for rows, x, y in examples.batches(batch_size, task.tokenizer.pad_id):
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
def score_completions(model: nn.Module, task: Task, split: str) -> dict[str, Any]:
    """Greedy completions of up to ``eval_samples`` held-out prompts, scored against their references."""
    from glmlab.generation.generate import GenerationSettings, generate_batch

    pairs = task.pairs[split][: task.options.eval_samples]
    references = [p.completion for p in pairs]
    longest = max(len(task.tokenizer.encode(r)) for r in references)
    limit = task.options.max_new_tokens or longest + 16
    settings = GenerationSettings(max_new_tokens=max(1, min(limit, model.block_size - 1)), temperature=0.0, seed=0)
    prompts = [task.tokenizer.encode(p.prompt) for p in pairs]
    generated: list[str] = []
    for begin in range(0, len(prompts), 32):
        generated += [c[0].text for c in generate_batch(model, task.tokenizer, prompts[begin:begin + 32], settings)]
    figures = generation_metrics(generated, references)
    figures["examples_shown"] = [{"prompt": p.prompt, "reference": p.completion, "generated": g}
                                 for p, g in zip(pairs[:5], generated[:5], strict=False)]
    return figures


def measure(model: nn.Module, task: Task, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Every split but train, with the weights ``model`` holds now."""
    out = {}
    for split in ("val", "test"):
        if split not in task.splits:
            continue
        figures = evaluate_split(model, task, split, batch_size, device)
        if task.options.task == "sft" and task.options.eval_samples > 0:  # 0: completion NLL only
            figures.update(score_completions(model, task, split))
        out[split] = figures
    return out


def resolve_finetune_config(options: FinetuneOptions, base: dict[str, Any], overrides: list[str],
                            ) -> tuple[RunConfig, dict[str, Any] | None]:
    """The run's config: the init (or --arch) run's model section, fine-tuning defaults for train:, then
    the user's file and overrides. A pre-trained architecture cannot change (except dropout)."""
    source = options.init or options.arch
    init_raw = None
    layers: dict[str, dict[str, Any]] = {"model": {}, "train": {**TRAIN_DEFAULTS, "lr": MODE_LR[options.mode]}}
    if source:
        _, init_raw = read_run_config(Path(source))
        if init_raw.get("finetune", {}).get("task") == "classify":
            raise RunDirError(f"{source} is a fine-tuned classifier, not a language model",
                              "pass --init a run trained by glmlab train (or an sft fine-tune)")
        layers["model"] = dict(init_raw["model"])
    user: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for layer in (base, parse_overrides(overrides)):
        for section, values in layer.items():
            if section not in user:  # a misspelt section must not be ignored
                raise ConfigError(f"unknown config section '{section}'", suggest(section, user))
            user[section].update(values)
    if source:
        fixed = [k for k in user["model"] if k not in MODEL_KEYS_TUNABLE]
        if fixed:
            raise ConfigError(f"model.{fixed[0]} comes from the pre-trained run {source} and cannot change",
                              f"drop it (only model.{', model.'.join(MODEL_KEYS_TUNABLE)} may be set)")
    merged = {s: {**layers[s], **user[s]} for s in ("model", "train")}
    if merged["model"].get("family") == "seqgan":
        merged["model"]["adv_rounds"] = 0  # its generator is fine-tuned as a language model, no adversarial phase
    return resolve_config(merged), init_raw


def finetune(options: FinetuneOptions, out: str | Path, config_file: dict[str, Any] | None = None,
             overrides: list[str] | None = None, resume: bool = False,
             show_progress: bool = True) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune and measure; returns the training result and the results (also in RUN_DIR/results.json)."""
    out = Path(out)
    if resume:
        if config_file:
            raise GlmlabError("--config cannot be combined with --resume (the run keeps its own config.json)",
                              "give changes as key=value overrides, e.g. train.max_steps=2000")
        _, raw = read_run_config(out)
        if "finetune" not in raw:
            raise RunDirError(f"{out} is not a fine-tuning run", "resume it with glmlab train --resume")
        saved = raw["finetune"]
        known = {f.name for f in dataclasses.fields(FinetuneOptions)}
        options = FinetuneOptions(**{k: v for k, v in saved.items() if k in known})
        config = resolve_config({"model": raw["model"], "train": raw["train"]}, overrides or [])
        from glmlab.training.trainer import config_changes

        changed = config_changes(config, resolve_config({"model": raw["model"], "train": {}}))
        if changed:
            raise GlmlabError(f"a resumed run cannot change its model ({', '.join(changed)})",
                              "start a new fine-tune with --out NEW_DIR")
        tokenizer = Tokenizer.from_file(out / TOKENIZER, raw.get("special_tokens"))
        task = Task(options, config, {"special_tokens": raw.get("special_tokens")} if "special_tokens" in raw
                    else {}, tokenizer=tokenizer, bos=bool(saved.get("bos")))
    else:
        options.check()
        config, init_raw = resolve_finetune_config(options, config_file or {}, list(overrides or []))
        task = Task(options, config, init_raw)
    if config.model.vocab_size == 0:
        config.model.vocab_size = task.tokenizer.vocab_size
    trainer = FinetuneTrainer(config, task, out, resume=resume, show_progress=show_progress)
    before = None
    if options.task == "sft" and options.init and not resume and trainer.dist.is_main:
        before = measure(trainer.model, task, config.train.batch_size, trainer.device)
    started = time.perf_counter()
    result = trainer.run()
    if not result.main_process or result.stopped_by == "interrupted":
        return result, {}
    best = out / BEST_DIR / WEIGHTS
    if best.is_file():
        load_weights(trainer.model, best)
    results = {"task": options.task, "mode": options.mode, "init": options.init, "family": config.model.family,
               **trainer.parameter_counts, "train_seconds": result.elapsed, "steps": result.step,
               "stopped_by": result.stopped_by, "wall_seconds": time.perf_counter() - started,
               **measure(trainer.model, task, config.train.batch_size, trainer.device)}
    if options.task == "classify":
        results["labels"] = task.labels
    previous = json.loads((out / RESULTS).read_text()) if resume and (out / RESULTS).is_file() else {}
    if before is not None or "before" in previous:
        results["before"] = before if before is not None else previous["before"]
    atomic.write_json(out / RESULTS, results)
    return result, results
