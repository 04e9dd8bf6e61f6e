"""samples.txt: a short sample from the current weights at each evaluation, so progress can be read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from glmlab import atomic
from glmlab.config import TrainConfig
from glmlab.generation.generate import GenerationSettings, generate
from glmlab.runs import SAMPLES
from glmlab.training.checkpoint import write_error


def write_samples(out: Path, model: nn.Module, tokenizer: Any, cfg: TrainConfig, step: int, val: float) -> None:
    """samples.txt: a short sample from the current weights, so progress can be read, not just plotted.
    A model of sentences writes three sentences started from ``<bos>`` (a VAE's from the centre of its prior)."""
    if cfg.sample_tokens == 0:
        return
    if model.traits.sentence_level:
        settings = GenerationSettings(max_new_tokens=min(cfg.sample_tokens, model.block_size - 1), temperature=0.8,
                                      seed=cfg.seed, num_return_sequences=3)
        texts = generate(model, tokenizer, "", settings)
        body, prompt = "\n".join(texts), ""
    else:
        prompt = cfg.sample_prompt if not tokenizer.unencodable(cfg.sample_prompt) else ""
        length = cfg.sample_tokens
        if not model.traits.left_to_right:  # a masked LM writes a text that fits its window, all at once
            length = max(1, min(length, model.block_size - len(tokenizer.encode(prompt)) - 1))
        settings = GenerationSettings(max_new_tokens=length, temperature=0.8, seed=cfg.seed)
        body = prompt + generate(model, tokenizer, prompt, settings)[0]
    try:
        atomic.write_text(out / SAMPLES, f"# step {step}, val loss {val:.4f}, temperature 0.8, seed {cfg.seed}, "
                                         f"prompt {prompt!r}\n{body}\n")
    except OSError as exc:
        raise write_error(out / SAMPLES, exc) from None
