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
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from glmlab import atomic
from glmlab.config import RunConfig, parse_overrides, resolve_config
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import ConfigError, GlmlabError, RunDirError
from glmlab.finetune.metrics import generation_metrics
from glmlab.finetune.report import RESULTS
from glmlab.finetune.tasks import MODEL_KEYS_TUNABLE, FinetuneOptions, FinetuneTask, evaluate_split
from glmlab.generation.chat import TEMPLATE_FILE
from glmlab.generation.generate import generate_batch
from glmlab.generation.settings import GenerationSettings
from glmlab.models import get_family
from glmlab.runs import BEST_DIR, TOKENIZER, WEIGHTS, LoadSpec, load_weights, read_run_config
from glmlab.schema import suggest
from glmlab.training.trainer import Trainer, TrainResult, config_changes

__all__ = ["FinetuneOptions", "FinetuneTask", "finetune", "measure", "resolve_finetune_config"]

# Fine-tuning defaults under the user's --config and overrides: short, evaluated often, early-stopped.
TRAIN_DEFAULTS: dict[str, Any] = {"max_steps": 1000, "warmup_steps": 50, "eval_interval": 100, "patience": 5,
                                  "weight_decay": 0.01, "sample_tokens": 0, "log_interval": 10}
MODE_LR = {"full": 1e-4, "probe": 1e-3, "lora": 1e-3}


@torch.no_grad()
def score_completions(model: nn.Module, task: FinetuneTask, split: str) -> dict[str, Any]:
    """Greedy completions of up to ``eval_samples`` held-out prompts, scored against their references."""
    pairs = task.pairs[split][: task.options.eval_samples]
    references = [p.completion for p in pairs]
    longest = max(len(task.tokenizer.encode(r)) for r in references)
    limit = task.options.max_new_tokens or longest + 16
    settings = GenerationSettings(max_new_tokens=max(1, min(limit, model.block_size - 1)), temperature=0.0, seed=0,
                                  stop_token_ids=task.stop_token_ids)
    prompts = [task.tokenizer.encode(p.prompt) for p in pairs]
    generated: list[str] = []
    for begin in range(0, len(prompts), 32):
        generated += [c[0].text for c in generate_batch(model, task.tokenizer, prompts[begin:begin + 32], settings)]
    figures = generation_metrics(generated, references, task.options.metric_tokenizer)
    figures["examples_shown"] = [{"prompt": p.prompt, "reference": p.completion, "generated": g}
                                 for p, g in zip(pairs[:5], generated[:5], strict=False)]
    return figures


def measure(model: nn.Module, task: FinetuneTask, batch_size: int, device: torch.device) -> dict[str, Any]:
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
    """The run's config: the init (or --arch) run's model section (for dpo with dropout off), fine-tuning defaults
    for train:, then the user's file and overrides. A pre-trained architecture cannot change (except dropout)."""
    source = options.init or options.arch
    init_raw = None
    layers: dict[str, dict[str, Any]] = {"model": {}, "train": {**TRAIN_DEFAULTS, "lr": MODE_LR[options.mode]}}
    if source:
        _, init_raw = read_run_config(Path(source))
        if LoadSpec.of(init_raw).head == "classifier":
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
    if options.task == "dpo" and source:  # as trl's disable_dropout (its default): dropout would make the log-ratios
        layers["model"]["dropout"] = 0.0  # noisy and biased (the reference runs without); model.dropout sets it
    merged = {s: {**layers[s], **user[s]} for s in ("model", "train")}
    # the language model alone is fine-tuned (a seqgan's generator: no adversarial phase)
    merged["model"].update(get_family(str(merged["model"].get("family", "gpt"))).language_model)
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
        changed = config_changes(config, resolve_config({"model": raw["model"], "train": {}}))
        if changed:
            raise GlmlabError(f"a resumed run cannot change its model ({', '.join(changed)})",
                              "start a new fine-tune with --out NEW_DIR")
        tokenizer = Tokenizer.from_file(out / TOKENIZER, raw.get("special_tokens"))
        template = out / TEMPLATE_FILE
        task = FinetuneTask(options, config, {"special_tokens": raw.get("special_tokens")} if "special_tokens" in raw
                            else {}, tokenizer=tokenizer, bos=bool(saved.get("bos")),
                            chat_template=template.read_text(encoding="utf-8") if template.is_file() else None)
    else:
        options.check()
        config, init_raw = resolve_finetune_config(options, config_file or {}, list(overrides or []))
        task = FinetuneTask(options, config, init_raw)
    before = None
    with Trainer(config, task, out, resume=resume, show_progress=show_progress) as trainer:
        model, device = trainer.model, trainer.device
        zero_shot = options.task in ("sft", "dpo") or options.pattern is not None  # a cloze: before training too
        if zero_shot and options.init and not resume and trainer.dist.is_main:
            before = measure(model, task, config.train.batch_size, device)
        started = time.perf_counter()
        result = trainer.run()
    if not result.main_process or result.stopped_by == "interrupted":
        return result, {}
    best = out / BEST_DIR / WEIGHTS
    if best.is_file():
        load_weights(model, best)
    results = {"task": options.task, "mode": options.mode, "init": options.init, "family": config.model.family,
               **task.parameter_counts, "train_seconds": result.elapsed, "steps": result.step,
               "stopped_by": result.stopped_by, "wall_seconds": time.perf_counter() - started,
               **measure(model, task, config.train.batch_size, device)}
    if options.task == "classify":
        results["labels"] = task.labels
    previous = json.loads((out / RESULTS).read_text()) if resume and (out / RESULTS).is_file() else {}
    if before is not None or "before" in previous:
        results["before"] = before if before is not None else previous["before"]
    atomic.write_json(out / RESULTS, results)
    return result, results
