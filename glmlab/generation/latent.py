"""Latent tools of a sentence VAE: sample from the prior, reconstruct sentences, interpolate between two.

Every decode goes through the shared generation engine (greedy, sampling or beam search, with all
of its controls) on the model's decoder given z (``given(z)``, a language model whose row i decodes from z[i]).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import row_seed
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models.contract import LanguageModel, LatentModel


def _require_vae(model: LanguageModel) -> LatentModel:
    if not model.traits.latent_dim:
        raise GlmlabError(f"latent tools need a vae run, and this run's family is {model.traits.family}",
                          "train one with model.family=vae")
    return model


def _device(model: LatentModel) -> torch.device:
    return next(model.parameters()).device


def decode_latents(model: LatentModel, tokenizer: Tokenizer, z: torch.Tensor,
                   settings: GenerationSettings | None = None) -> list[str]:
    """One sentence decoded from each row of ``z`` (N, latent_dim); greedy unless settings say otherwise."""
    model = _require_vae(model)
    settings = settings or GenerationSettings(temperature=0.0)
    if settings.max_new_tokens > model.block_size - 1:
        settings = replace(settings, max_new_tokens=model.block_size - 1)
    if settings.num_beams > 1:  # beam search decodes one prompt at a time: one z at a time
        return [generate_batch(model.given(z[i:i + 1]), tokenizer, [""], replace(
            settings, num_return_sequences=1))[0][0].text for i in range(z.size(0))]
    settings = replace(settings, num_return_sequences=1)
    # one settings per row, each with its own seed: rows sharing one seed would draw the same random
    # numbers at every step (each row here is its own prompt, so its sample index is 0)
    per_row = [settings if settings.seed is None else replace(settings, seed=row_seed(settings.seed, i))
               for i in range(z.size(0))]
    rows = generate_batch(model.given(z), tokenizer, [""] * z.size(0), per_row)
    return [completions[0].text for completions in rows]


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator from ``seed`` (a fresh random seed when None), leaving the global one alone."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_prior(model: LatentModel, tokenizer: Tokenizer, n: int, seed: int | None = 0,
                 settings: GenerationSettings | None = None) -> list[str]:
    """``n`` sentences decoded from z ~ p(z), the model's prior (drawn from ``seed``; None = a random seed)."""
    model = _require_vae(model)
    if n < 1:
        raise GlmlabError(f"asked for {n} samples", "ask for at least 1")
    z = model.sample_prior(n, _generator(seed))
    return decode_latents(model, tokenizer, z, settings)


def encode_sentences(model: LatentModel, tokenizer: Tokenizer, sentences: Sequence[str]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """(mu, logvar) of q(z|x) for each sentence (words, then ``<eos>``; cut to the model's length).

    With a word tokenizer, words outside the vocabulary are read as ``<unk>`` (as in training data), with
    a warning that names them; with other tokenizers, characters they cannot encode are an error."""
    model = _require_vae(model)
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise GlmlabError("no sentences given", "give at least one sentence")
    ids = []
    unknown: list[str] = []
    for s in sentences:
        if not s.strip():
            raise GlmlabError("an empty sentence cannot be encoded", "give sentences with words in them")
        if tokenizer.kind == "word":
            unknown += [w for w in tokenizer.unencodable(s.strip()) if w not in unknown]
            encoded = tokenizer.encode(s.strip())
        else:
            encoded = tokenizer.encode_checked(s.strip(), "sentence")
        ids.append(encoded[: model.block_size - 2] + [tokenizer.eos_id])
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:10]) + (f" and {len(unknown) - 10} more"
                                                             if len(unknown) > 10 else "")
        warnings.warn(f"words outside the vocabulary were read as <unk>: {shown}", stacklevel=3)
    width = max(len(i) for i in ids)
    y = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(ids):
        y[row, : len(seq)] = torch.tensor(seq)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.encode(y.to(_device(model)))
    finally:
        model.train(was_training)


def reconstruct(model: LatentModel, tokenizer: Tokenizer, sentences: Sequence[str], sample: bool = False,
                seed: int | None = 0, settings: GenerationSettings | None = None) -> list[str]:
    """Each sentence encoded and decoded again: from the posterior mean, or from a z ~ q(z|x) with ``sample``
    (drawn from ``seed``; None = a random seed)."""
    mu, logvar = encode_sentences(model, tokenizer, sentences)
    z = mu
    if sample:
        z = mu + torch.randn(mu.shape, generator=_generator(seed)).to(mu.device) * (0.5 * logvar).exp()
    return decode_latents(model, tokenizer, z, settings)


def interpolate(model: LatentModel, tokenizer: Tokenizer, start: str, end: str, steps: int = 5,
                settings: GenerationSettings | None = None) -> list[str]:
    """Homotopy (Bowman et al.): sentences decoded from z = (1 - t) mu(start) + t mu(end) for ``steps``
    evenly spaced t from 0 to 1, both ends included."""
    if steps < 2:
        raise GlmlabError(f"--steps {steps} gives no path between two sentences", "use at least 2 steps")
    mu, _ = encode_sentences(model, tokenizer, [start, end])
    t = torch.linspace(0, 1, steps, device=mu.device)[:, None]
    return decode_latents(model, tokenizer, (1 - t) * mu[0] + t * mu[1], settings)
