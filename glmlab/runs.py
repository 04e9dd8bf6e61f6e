"""The run directory, the unit everything exchanges, and ``glmlab.load``.

Layout (every file written atomically)::

    RUN_DIR/config.json         resolved config + data provenance
    RUN_DIR/tokenizer.json      the data's tokenizer (Hugging Face format)
    RUN_DIR/checkpoints/step-N/ the newest checkpoints (weights, trainer state, checksum manifest)
    RUN_DIR/model.safetensors   weights of the newest checkpoint (a hard link into checkpoints/)
    RUN_DIR/trainer_state.pt    optimiser, schedule, step, data position, RNG states (weights_only)
    RUN_DIR/best/model.safetensors  weights with the best validation loss so far
    RUN_DIR/**/model.safetensors.sha256  the checksum written with each weights file (``sha256sum -c`` reads it)
    RUN_DIR/metrics.jsonl       one JSON record per log line / evaluation
    RUN_DIR/loss.png            training and validation loss curves
    RUN_DIR/samples.txt         text sampled at the latest evaluation

``config.json``'s ``load`` section says how to load the model it describes (:class:`LoadSpec`): whether it
reads sentences, which adapters to merge, which head it has. Runs written before that section existed are
read from the fields their writers left (``train.batching``, ``finetune``).

Every weights file is checked before it is loaded (:func:`load_weights`) against the checksum written with it
(its ``.sha256`` file, or a checkpoint's manifest): a changed or damaged file is refused with the other copies
to load instead; weights written before checksums existed load with a note (:class:`UncheckedWeights`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

import glmlab.generation.generate as generation
from glmlab import atomic, embeddings
from glmlab.config import RunConfig, config_from_dict
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError, RunDirError
from glmlab.generation import fill_mask, latent
from glmlab.generation.chat import ChatTemplate, run_template
from glmlab.generation.settings import GenerationSettings
from glmlab.models import FamilyModel, build_model
from glmlab.models.lora import add_lora, merge_lora

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
BEST_DIR = "best"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SAMPLES = "samples.txt"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"
CHECKSUM_SUFFIX = ".sha256"


class UncheckedWeights(UserWarning):
    """Weights loaded without a check: no checksum was written with them (an older glmlab wrote the run)."""


def save_weights(model: nn.Module, path: Path) -> str:
    """Write weights as safetensors (tied weights stored once) and their checksum; returns the sha256."""
    checksum_path(path).unlink(missing_ok=True)  # a checksum never vouches for weights written after it
    atomic.write_with(path, lambda tmp: save_model(model, str(tmp)))
    digest = file_sha256(path)
    write_checksum(path, digest)
    return digest


def checksum_path(weights: Path) -> Path:
    return weights.with_name(weights.name + CHECKSUM_SUFFIX)


def write_checksum(weights: Path, digest: str) -> None:
    """``weights``'s checksum beside it, in ``sha256sum``'s format."""
    atomic.write_text(checksum_path(weights), f"{digest}  {weights.name}\n")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Committed-looking checkpoint directories (``checkpoints/step-N``), newest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    n = len(CHECKPOINT_PREFIX)
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[n:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[n:]), reverse=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(path: Path) -> str | None:
    """The checksum written with a weights file: its ``.sha256`` file, or its checkpoint's manifest; None when
    there is neither (weights an older glmlab wrote)."""
    sidecar = checksum_path(path)
    if sidecar.is_file():
        digest = sidecar.read_text(encoding="utf-8", errors="replace").split(maxsplit=1)[:1]
        if not digest or len(digest[0]) != 64:
            raise RunDirError(f"{sidecar} is damaged (it holds no sha256)", _other_copies(path))
        return digest[0].lower()
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text(encoding="utf-8"))["files"][path.name]["sha256"]
        except (ValueError, KeyError, TypeError):
            raise RunDirError(f"{manifest} is damaged", _other_copies(path)) from None
    return None


def verify_weights(path: Path) -> None:
    """Refuse a weights file that differs from the checksum written with it; note one that has none."""
    expected = expected_sha256(path)
    if expected is None:
        warnings.warn(f"{path} has no checksum (an older glmlab wrote it): loaded without a check",
                      UncheckedWeights, stacklevel=3)
        return
    if file_sha256(path) != expected:
        raise RunDirError(f"{path} does not match the checksum written with it: the file was damaged or "
                          "overwritten after it was saved, so it is not loaded", _other_copies(path))


def _other_copies(path: Path) -> str:
    """The fix for a damaged weights file: the run's other copies, as --checkpoint values."""
    parent = path.parent
    run_dir = parent.parent.parent if parent.parent.name == CHECKPOINTS else \
        parent.parent if parent.name == BEST_DIR else parent
    def other(candidate: Path) -> bool:  # another file, not a hard link to this one (the top-level weights are)
        return candidate.is_file() and not os.path.samefile(candidate, path)

    options = ["--checkpoint last"] if other(run_dir / WEIGHTS) else []
    options += ["--checkpoint best"] if other(run_dir / BEST_DIR / WEIGHTS) else []
    options += [f"--checkpoint {d.name}" for d in checkpoint_dirs(run_dir) if other(d / WEIGHTS)][:3]
    if not options:
        return "restore the file from a copy, or retrain"
    return f"load another copy of the weights ({', '.join(options)}), or restore the file from a copy"


def load_weights(model: nn.Module, path: Path, verify: bool = True) -> None:
    """Weights into ``model``, checked first against their checksum (``verify=False``: the caller checked)."""
    if verify:
        verify_weights(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise RunDirError(f"{path} cannot be read as model weights ({str(exc).splitlines()[0]})",
                          "the checkpoint is damaged; resume from another run or retrain") from None
    if missing or unexpected:
        raise RunDirError(f"{path} does not match the model in config.json "
                          f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})",
                          "check that config.json and the weights come from the same run")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order: what is readable of it (none if it is missing; a line cut
    short by a kill, or otherwise not JSON, is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@dataclass(frozen=True)
class LoadSpec:
    """How to load the model a run holds: ``config.json["load"]``, written by whatever wrote the run."""

    sentence_level: bool = False  # it read <bos>-started sentences: prompt it the same way
    adapters: list[dict[str, Any]] = field(default_factory=list)  # [{"kind": "lora", "rank", "alpha"}]: merged
    head: str = "lm"  # "lm", or "classifier" (a fine-tuned classifier: glmlab.finetune.load_classifier)
    fim_rate: float = 0.0  # > 0: a gpt trained to fill in the middle (train.fim_rate), so it can infill

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> LoadSpec:
        """The spec of a run's config.json, including runs written before the ``load`` section."""
        if isinstance(raw.get("load"), dict):
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw["load"].items() if k in known})
        tuned = raw.get("finetune") or {}
        lora = [{"kind": "lora", "rank": int(tuned["lora_rank"]), "alpha": float(tuned["lora_alpha"])}] \
            if tuned.get("mode") == "lora" else []
        return cls(sentence_level=(raw.get("train") or {}).get("batching") == "sentences" or bool(tuned.get("bos")),
                   adapters=lora, head="classifier" if tuned.get("task") == "classify" else "lm")


def add_adapters(model: nn.Module, spec: LoadSpec) -> None:
    """Attach the spec's adapters to ``model`` (built from the run's config), as they were when it trained."""
    for adapter in spec.adapters:
        if adapter.get("kind") != "lora":
            raise RunDirError(f"an adapter of kind {adapter.get('kind')!r} is not one glmlab knows",
                              "load the run with the glmlab version that wrote it")
        add_lora(model, int(adapter["rank"]), float(adapter["alpha"]))


def load_weights_as_written(model: nn.Module, spec: LoadSpec, path: Path) -> None:
    """Weights saved with the spec's adapters into ``model``, the adapters merged into plain weights."""
    add_adapters(model, spec)
    load_weights(model, path)
    if spec.adapters:
        merge_lora(model)
        model.requires_grad_(True)


def read_run_config(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The run's RunConfig and the raw config.json dict (which also holds data provenance)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist",
                          "train one with: glmlab train --data DATA_DIR --out RUN_DIR")
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a glmlab run directory (no {CONFIG})",
                          "point to a directory written by glmlab train")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunDirError(f"{path} is corrupted (not JSON)", "restore it from a backup or retrain") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{path} holds JSON of the wrong shape ({type(raw).__name__}, not an object of config "
                          "sections)", "restore it from a backup or retrain")
    try:
        return config_from_dict(raw), raw
    except GlmlabError as exc:
        raise RunDirError(f"{path} holds an invalid config: {exc.problem}", "restore it or retrain") from None


def weights_path(run_dir: Path, checkpoint: str) -> Path:
    """The weights file of ``checkpoint``: ``best`` (falls back to last when no evaluation has run yet),
    ``last``, or a checkpoint's name (``step-250`` or ``step-00000250``, in ``RUN_DIR/checkpoints``)."""
    if checkpoint.startswith(CHECKPOINT_PREFIX):
        return _named_checkpoint(run_dir, checkpoint)
    if checkpoint not in ("best", "last"):
        raise RunDirError(f"unknown checkpoint {checkpoint!r}", "use best, last or a checkpoint's name (step-N)")
    best = run_dir / BEST_DIR / WEIGHTS
    last = run_dir / WEIGHTS
    path = best if checkpoint == "best" and best.is_file() else last
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no model weights ({WEIGHTS}); training has not saved a checkpoint yet",
                          "train longer, or resume with: glmlab train --resume --out " + str(run_dir))
    return path


def _named_checkpoint(run_dir: Path, name: str) -> Path:
    step, n = name[len(CHECKPOINT_PREFIX):], len(CHECKPOINT_PREFIX)
    numeric = step.isascii() and step.isdigit()
    found = [d for d in checkpoint_dirs(run_dir) if numeric and int(d.name[n:]) == int(step)]
    if not found or not (found[0] / WEIGHTS).is_file():
        names = ", ".join(d.name for d in checkpoint_dirs(run_dir)) or "none"
        raise RunDirError(f"{run_dir} has no checkpoint {name!r} (its checkpoints: {names})",
                          "use best, last or one of its checkpoints' names")
    return found[0] / WEIGHTS


@dataclass
class LoadedRun:
    """A trained model with its tokenizer and config, ready to generate or evaluate.

    Unpacks as ``model, tokenizer = glmlab.load(run_dir)``.
    """

    model: FamilyModel
    tokenizer: Tokenizer
    config: RunConfig
    run_dir: Path
    raw_config: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        """The run's chat template (``chat_template.jinja``; the plain one for a base model)."""
        return run_template(self.run_dir, self.tokenizer)

    def generate(self, prompt: str = "", **settings: Any) -> list[str]:
        """Continuations of ``prompt`` (``num_return_sequences`` of them); settings as in
        :class:`glmlab.generation.settings.GenerationSettings` (``num_samples`` is accepted as an alias)."""
        return generation.generate(self.model, self.tokenizer, prompt, _settings(settings))

    def complete(self, prompts: str | list[str], **settings: Any) -> list[list[Any]]:
        """Completions (text, token ids, finish reason, logprobs, ...) for one prompt or a batch of them."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return generation.generate_batch(self.model, self.tokenizer, prompts, _settings(settings))

    def embed(self, texts: str | list[str], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
        """One vector per text (N, width): pooled hidden states, or a vae's posterior mean; unit length unless
        ``normalize=False``. See :mod:`glmlab.embeddings`."""
        return embeddings.embed(self.model, self.tokenizer, texts, pooling, normalize)

    def fill(self, text: str, top_k: int = 5) -> list[fill_mask.Candidate] | list[list[fill_mask.Candidate]]:
        """The ``top_k`` likeliest tokens for each ``[MASK]`` in ``text`` (a bert or glm run), in the shape of
        Hugging Face's ``pipeline("fill-mask")``: dicts with ``score``, ``token``, ``token_str`` and ``sequence``;
        a list for one mask, a list per mask for several. See :mod:`glmlab.generation.fill_mask`."""
        return fill_mask.fill_mask(self.model, self.tokenizer, text, top_k)

    def stream(self, prompt: str = "", **settings: Any) -> Iterator[str]:
        """Text deltas of one continuation as they are generated (never half a character)."""
        return generation.stream(self.model, self.tokenizer, prompt, _settings(settings))

    def use_decode_weights(self, fmt: str) -> None:
        """Decode with ``native`` or ``int8`` weights (gpt runs; ``--decode-weights``)."""
        if fmt == "native":
            return
        if fmt not in self.model.traits.decode_weights:
            raise GlmlabError(f"--decode-weights {fmt} is not available for this run's family, "
                              f"{self.config.model.family}", "drop --decode-weights")
        self.model.set_decode_weights(fmt)

    def use_compiled_decode(self) -> None:
        """Decode through the step compiled ahead of time (gpt runs on a CPU; ``--compile-decode``): a C++
        compiler and ~15-30 s for a small model (~45 s for GPT-2 small) at the first generation per batch size, then
        cached (:mod:`glmlab.models.gpt_aot`)."""
        if not self.model.traits.compiled_decode:
            raise GlmlabError(f"--compile-decode is not available for this run's family, {self.config.model.family}",
                              "drop --compile-decode")
        self.model.set_decode_compiled(True)

    # --- a sentence VAE's latent tools (model.family=vae; glmlab.generation.latent) ---------------------

    def sample_prior(self, n: int = 1, seed: int | None = None, **settings: Any) -> list[str]:
        """``n`` sentences decoded from z ~ p(z), the model's prior. Words are sampled (temperature 1.0)
        unless settings say otherwise (``temperature=0``: greedy; ``num_beams``); ``seed`` draws z and the
        words (None = random)."""
        return latent.sample_prior(self.model, self.tokenizer, n, seed=seed,
                                   settings=_settings({"seed": seed, **settings}))

    def reconstruct(self, sentences: str | list[str], sample: bool = False, seed: int | None = None,
                    **settings: Any) -> list[str]:
        """Each sentence encoded and decoded again, greedily unless settings say otherwise: from the mean of
        q(z|x), or from a z ~ q(z|x) with ``sample`` (drawn from ``seed``; None = random)."""
        sentences = [sentences] if isinstance(sentences, str) else sentences
        return latent.reconstruct(self.model, self.tokenizer, sentences, sample=sample, seed=seed,
                                  settings=_settings({"temperature": 0.0, "seed": seed, **settings}))

    def interpolate(self, start: str, end: str, steps: int = 5, **settings: Any) -> list[str]:
        """``steps`` sentences decoded (greedily unless settings say otherwise) along the line from the
        latent mean of ``start`` to that of ``end``, both ends included."""
        return latent.interpolate(self.model, self.tokenizer, start, end, steps=steps,
                                  settings=_settings({"temperature": 0.0, **settings}))


def _settings(values: dict[str, Any]) -> GenerationSettings:
    values = dict(values)
    if "num_samples" in values:
        values["num_return_sequences"] = values.pop("num_samples")
    try:
        return GenerationSettings(**values)
    except TypeError as exc:
        known = [f.name for f in dataclasses.fields(GenerationSettings)]
        raise GlmlabError(f"unknown generation setting: {exc}", "use one of: " + ", ".join(known)) from None


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run directory's model (``best`` or ``last`` weights) and tokenizer, in eval mode."""
    run_dir = Path(run_dir)
    config, raw = read_run_config(run_dir)
    tokenizer = Tokenizer.from_file(run_dir / TOKENIZER, raw.get("special_tokens"))
    spec = LoadSpec.of(raw)
    if spec.head == "classifier":
        raise RunDirError(f"{run_dir} is a classifier (glmlab finetune classify), not a language model",
                          f"predict with: glmlab predict {run_dir} --text '...' "
                          "(Python: glmlab.finetune.load_classifier)")
    model = build_model(config.model, sentences=spec.sentence_level)
    if spec.fim_rate > 0:
        model.traits = model.traits.filling_in_the_middle()
    if tokenizer.vocab_size > model.vocab_size:  # its ids past the model's would fail mid-request, not here
        raise RunDirError(f"{run_dir / TOKENIZER} has {tokenizer.vocab_size} ids but the model's vocabulary has "
                          f"{model.vocab_size}: the two do not belong together",
                          "restore the run's own tokenizer.json (the data directory it was trained on has it)")
    load_weights_as_written(model, spec, weights_path(run_dir, checkpoint))
    model.to(device).eval()
    return LoadedRun(model, tokenizer, config, run_dir, raw)
