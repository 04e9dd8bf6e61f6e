"""A run's config: YAML files plus dotted `key=value` overrides, validated with clear errors.

A run's config has two sections. ``model`` is the config dataclass of the chosen family (looked up in
the model registry by ``model.family``); ``train`` is :class:`TrainConfig`. Each field carries its
help text, and optionally ``min``/``max``/``choices``, in its metadata (:mod:`glmlab.schema`), so
validation and ``glmlab train --list-keys`` need no extra tables.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from glmlab.errors import ConfigError
from glmlab.models import FAMILIES, family_config_class
from glmlab.schema import build_section, field, parse_duration, suggest


@dataclasses.dataclass
class TrainConfig:
    """How to train: budget, optimiser, schedule, evaluation, precision and device."""

    batch_size: int = field(32, "sequences per micro-batch", min=1)
    grad_accum: int = field(1, "micro-batches per optimiser step (global batch = batch_size * grad_accum)", min=1)
    max_steps: int = field(2000, "optimiser steps to train for", min=1)
    max_time: float | None = field(None, "wall-clock training budget in seconds (or '90s', '3m', '1h'); "
                                   "none = unlimited", parse=parse_duration, min=1e-9)
    lr: float = field(1e-3, "peak learning rate", min=0.0)
    min_lr: float | None = field(None, "final learning rate of the decay; none = lr / 10", min=0.0)
    lr_schedule: str = field("cosine", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    warmup_steps: int = field(100, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = field(0.1, "decoupled weight decay (AdamW's, and Muon's on its matrices) on matrices and "
                                "embeddings; none on biases and norms", min=0.0)
    optimizer: str = field("adamw", "adamw, or muon: Muon (momentum, orthogonalised updates) on the hidden Linear "
                           "matrices and AdamW on embeddings, heads, norms and biases, at one train.lr",
                           choices=("adamw", "muon"))
    muon_momentum: float = field(0.95, "Muon's (Nesterov) momentum, with train.optimizer=muon", min=0.0, max=0.999999)
    beta1: float = field(0.9, "AdamW beta1", min=0.0, max=0.999999)
    beta2: float = field(0.99, "AdamW beta2", min=0.0, max=0.999999)
    grad_clip: float = field(1.0, "clip the global gradient norm to this value; 0 = no clipping", min=0.0)
    eval_interval: int = field(250, "evaluate on the validation split every N steps", min=1)
    eval_tokens: int = field(65536, "validation tokens scored per evaluation; 0 = the whole split", min=0)
    log_interval: int = field(10, "write a training line to metrics.jsonl every N steps", min=1)
    patience: int = field(0, "stop after N evaluations without a better val loss; 0 = never", min=0)
    checkpoint_interval: int = field(0, "save a crash-safe checkpoint every N steps; 0 = at each evaluation", min=0)
    keep_checkpoints: int = field(2, "checkpoints kept in RUN_DIR/checkpoints (older ones are deleted)", min=1)
    on_nonfinite: str = field("stop", "a NaN/inf loss: stop the run (the last checkpoint stays intact) or skip "
                              "the batch (one host sync per step)", choices=("stop", "skip"))
    precision: str = field("auto", "numeric precision: auto = bf16 autocast where the hardware runs it faster "
                           "(CUDA; a CPU with AMX, or whose bf16 matmuls measure 1.5x fp32's), else fp32",
                           choices=("auto", "fp32", "bf16", "fp16"))
    attention_precision: str = field("auto", "attention's precision under bf16 autocast: auto = fp32 on a CPU where "
                                     "bf16 attention measures 1.25x slower at the run's shape (timed once per run), "
                                     "else bf16; fp32, bf16 = as named, untimed (two runs of one config then attend "
                                     "alike even where the timing is close)", choices=("auto", "fp32", "bf16"))
    compile: str = field("auto", "torch.compile the training step: auto = on CUDA only (on a CPU it measured ~2% "
                         "faster for ~10 s of compiling), true, false", choices=("auto", "true", "false"),
                         parse=lambda v: str(v).lower() if not isinstance(v, bool) else str(v).lower())
    seed: int = field(1337, "seed for initialisation, batch sampling and dropout", min=0)
    device: str = field("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    threads: int = field(0, "CPU threads for PyTorch; 0 = PyTorch's default", min=0)
    sample_tokens: int = field(200, "tokens of sample text written to samples.txt at each evaluation", min=0)
    sample_prompt: str = field("\n", "prompt for the samples written during training")
    batching: str = field("auto", "training examples: random windows of the token stream, or whole sentences "
                          "(one per <eos>, length-bucketed, padded); auto = sentences for sentence-level families "
                          "(vae), windows otherwise", choices=("auto", "windows", "sentences"))
    fim_rate: float = field(0.0, "fraction of documents rearranged to fill in the middle (PSM/SPM, Bavarian et al. "
                            "2022); runs on windows only (gpt, lstm)", min=0.0, max=1.0)
    fim_spm_rate: float = field(0.5, "share of the rearranged documents in SPM order", min=0.0, max=1.0)

    def validate(self) -> None:
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}", "lower train.min_lr")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"train.device={self.device!r} is not a device", "use auto, cpu, cuda or cuda:N")


@dataclasses.dataclass
class RunConfig:
    """The whole resolved config of a run, as saved in the run directory's config.json."""

    model: Any
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}


def parse_overrides(items: typing.Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["model.n_layer=6", "train.lr=3e-4"]`` -> ``{"model": {"n_layer": "6"}, "train": {...}}``.

    Values stay strings (YAML-parsed where that is unambiguous); coercion to the field type
    happens in :func:`build_section`, so ``3e-4`` is a float whatever YAML thinks of it.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} has no '='", "write overrides as section.key=value, "
                              "e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} is not of the form section.key",
                              "e.g. model.n_layer=6 or train.max_steps=500")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict, with clear errors for missing or malformed files."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory, not a YAML file",
                          "give the config file itself (a run's settings are in RUN/config.json: train --init RUN "
                          "or --resume reads them)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0],
                          "fix the syntax (sections model: and train:, two-space indents)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections model: and train:")
    return data


SECTIONS = ("model", "train")


def resolve_config(base: dict[str, Any] | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Merge a config dict (e.g. from YAML) with overrides and validate it into a RunConfig."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for layer in (base or {}, parse_overrides(overrides)):
        for section, values in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section '{section}'", suggest(section, SECTIONS))
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
            merged[section].update(values)
    model_values = dict(merged["model"])
    family = str(model_values.get("family", "gpt"))
    model_cls = family_config_class(family)
    return RunConfig(model=build_section(model_cls, model_values, "model"),
                     train=build_section(TrainConfig, merged["train"], "train"))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from a run directory's config.json contents."""
    return resolve_config({s: data.get(s, {}) for s in SECTIONS})


def describe_keys() -> str:
    """Every config key with its default and help text, for ``glmlab train --list-keys``."""
    lines = []
    sections: list[tuple[str, type]] = [(f"model ({name})", entry.config) for name, entry in FAMILIES.items()]
    sections.append(("train", TrainConfig))
    for title, cls in sections:
        lines.append(f"[{title}]")
        prefix = title.split(" ")[0]
        for f in dataclasses.fields(cls):
            extra = f" (one of: {', '.join(f.metadata['choices'])})" if "choices" in f.metadata else ""
            lines.append(f"  {prefix}.{f.name} = {f.default!r}\n      {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
