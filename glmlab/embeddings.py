"""Text embeddings: one vector per text, from any family that has them (``/v1/embeddings``, ``LoadedRun.embed``).

- A model with per-token features (``traits.feature_width``: gpt, lstm, seqgan) reads the text as a prompt
  (after its start token when it was trained on sentences) and pools the final hidden states of the text's
  tokens: their mean (``pooling="mean"``, the default) or the last one's (``"last"``: in a causal model the
  only state that has read the whole text).
- A latent-variable model (``traits.latent_dim``: vae) gives the mean of q(z|x), the posterior over its
  latent space; no pooling applies.

Vectors are scaled to unit length unless ``normalize=False`` (so a dot product is the cosine similarity, as
with OpenAI's embeddings). A text longer than the context is refused, not cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import start_id
from glmlab.models.contract import LanguageModel

POOLINGS = ("mean", "last")
BATCH = 32  # texts per forward pass


class TextTooLong(GlmlabError):
    """A text longer than the model embeds whole."""


def embedding_width(model: LanguageModel) -> int:
    """The length of this model's embeddings; 0 when it has none."""
    return model.traits.latent_dim or model.traits.feature_width


def max_embedding_tokens(model: LanguageModel) -> int:
    """The longest text, in tokens, this model embeds whole."""
    if model.traits.latent_dim:
        return max(1, model.block_size - 2)  # the encoder reads the words and <eos>, as in training
    return model.block_size - (model.traits.sentence_level and 1)


def encode_inputs(model: LanguageModel, tokenizer: Tokenizer, texts: Sequence[str | list[int]]) -> list[list[int]]:
    """Each text's token ids, checked: not empty, encodable, within the vocabulary and the context."""
    if not embedding_width(model):
        raise GlmlabError(f"a {model.traits.family} model has no embeddings",
                          "use a run whose family has features (gpt, lstm, seqgan) or a latent space (vae)")
    out = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if not text:
                raise GlmlabError(f"input {i} is empty", "give text to embed")
            ids = tokenizer.encode_checked(text, f"input {i}")
        else:
            ids = [int(t) for t in text]
            bad = [t for t in ids if not 0 <= t < model.vocab_size]
            if not ids or bad:
                raise GlmlabError(f"input {i} has no token ids or ids outside the vocabulary ({bad[:5]})",
                                  f"give ids in 0..{model.vocab_size - 1}")
        if len(ids) > max_embedding_tokens(model):
            raise TextTooLong(f"input {i} has {len(ids)} tokens; this model embeds at most "
                              f"{max_embedding_tokens(model)} (its context, max_model_len, is {model.block_size})",
                              "shorten it or split it")
        out.append(ids)
    return out


def embed_ids(model: LanguageModel, tokenizer: Tokenizer, ids: list[list[int]], pooling: str = "mean",
              normalize: bool = True) -> torch.Tensor:
    """Embeddings (N, width) of checked token ids (:func:`encode_inputs`), as float32 on the CPU."""
    check_pooling(model, pooling)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [_batch(model, tokenizer, ids[i:i + BATCH], pooling) for i in range(0, len(ids), BATCH)]
    finally:
        model.train(was_training)
    vectors = torch.cat(parts).float().cpu()
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


def check_pooling(model: LanguageModel, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise GlmlabError(f"unknown pooling {pooling!r}", f"use one of: {', '.join(POOLINGS)}")
    if model.traits.latent_dim and pooling != "mean":
        raise GlmlabError(f"a {model.traits.family} model's embedding is its posterior mean: no pooling applies",
                          "leave pooling at its default")


def embed(model: LanguageModel, tokenizer: Tokenizer, texts: str | Sequence[str | list[int]], pooling: str = "mean",
          normalize: bool = True) -> torch.Tensor:
    """Embeddings (N, width) of texts (or token id lists); see the module docstring."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return embed_ids(model, tokenizer, encode_inputs(model, tokenizer, texts), pooling, normalize)


def _batch(model: LanguageModel, tokenizer: Tokenizer, ids: list[list[int]], pooling: str) -> torch.Tensor:
    device = next(model.parameters()).device
    if model.traits.latent_dim:
        rows = [seq + [tokenizer.eos_id] for seq in ids]
        y = torch.full((len(rows), max(map(len, rows))), IGNORE_INDEX, dtype=torch.long)
        for r, seq in enumerate(rows):
            y[r, : len(seq)] = torch.tensor(seq)
        return model.encode(y.to(device))[0]
    start = start_id(model, tokenizer)
    head = [] if start is None else [start]
    rows = [head + seq for seq in ids]
    x = torch.full((len(rows), max(map(len, rows))), tokenizer.eos_id, dtype=torch.long)  # right padding
    real = torch.zeros(x.shape, dtype=torch.bool)
    for r, seq in enumerate(rows):
        x[r, : len(seq)] = torch.tensor(seq)
        real[r, len(head): len(seq)] = True  # the text's own tokens: not the start token, not the padding
    h = model.features(x.to(device)).float()
    real = real.to(device)
    if pooling == "last":
        return h[torch.arange(len(rows), device=device), real.sum(1) + len(head) - 1]
    return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
