"""Family `lstm`: an LSTM language model (embedding, n-layer LSTM, dropout, optional tied softmax).

The recurrent network (:class:`LSTMNet`) is also the decoder of the sentence VAE (which conditions
it on z through its initial state and an extra input at every step) and the SeqGAN generator. For
generation the "cache" is the recurrent state, one slot per row (:class:`LSTMState`), so the shared
engine drives this family exactly as it drives `gpt`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.errors import ConfigError
from glmlab.models.contract import FamilyModel, Traits
from glmlab.schema import field


@dataclass
class LSTMConfig:
    """Shape of an `lstm` model (``model.*`` keys)."""

    family: str = field("lstm", "model family")
    vocab_size: int = field(0, "vocabulary size; 0 = take it from the data's tokenizer", min=0)
    block_size: int = field(128, "longest sequence trained on, in tokens (sentences are cut there); the "
                            "generation context", min=2)
    n_embd: int = field(256, "word embedding width", min=1)
    n_hidden: int = field(512, "LSTM hidden units per layer", min=1)
    n_layer: int = field(1, "LSTM layers", min=1)
    dropout: float = field(0.3, "dropout on embeddings, between layers and before the softmax", min=0.0, max=0.99)
    tie_weights: bool = field(True, "share the input embedding with the softmax (a projection to n_embd is added "
                                    "when n_hidden differs)")

    def validate(self) -> None:
        pass


class LSTMState:
    """The recurrent state of every row, the LSTM families' generation cache: h and c are
    (n_layer, B, n_hidden); ``lengths`` counts the tokens each row has read."""

    def __init__(self, h: torch.Tensor, c: torch.Tensor, cond: torch.Tensor | None = None) -> None:
        self.h, self.c, self.cond = h, c, cond
        self.initial = (h.clone(), c.clone())  # what a row starts from (a VAE's state from z)
        self.lengths = [0] * h.size(1)
        self.max_len = 1 << 30

    def select(self, rows: list[int]) -> None:
        """Keep (or repeat, for beams) the given rows, in that order."""
        index = torch.tensor(rows, device=self.h.device)
        self.h, self.c = self.h.index_select(1, index), self.c.index_select(1, index)
        self.initial = (self.initial[0].index_select(1, index), self.initial[1].index_select(1, index))
        if self.cond is not None:
            self.cond = self.cond.index_select(0, index)
        self.lengths = [self.lengths[r] for r in rows]

    def reset_row(self, row: int) -> None:
        self.h[:, row], self.c[:, row] = self.initial[0][:, row], self.initial[1][:, row]
        self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Move slot ``src``'s state (and its starting state and z) to slot ``dst``; ``src`` is reset."""
        for t in (self.h, self.c, *self.initial):
            t[:, dst] = t[:, src]
        if self.cond is not None:
            self.cond[dst] = self.cond[src]
        self.lengths[dst] = self.lengths[src]
        self.reset_row(src)


class LSTMNet(nn.Module):
    """Embedding -> dropout -> n-layer LSTM -> dropout -> (projection) -> softmax weights.

    ``cond_dim`` > 0 concatenates a conditioning vector (a VAE's z) to every input embedding.
    """

    def __init__(self, vocab_size: int, n_embd: int, n_hidden: int, n_layer: int, dropout: float,
                 tie_weights: bool, cond_dim: int = 0) -> None:
        super().__init__()
        self.n_layer, self.n_hidden = n_layer, n_hidden
        self.embedding = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(n_embd + cond_dim, n_hidden, n_layer, batch_first=True,
                            dropout=dropout if n_layer > 1 else 0.0)
        self.proj = nn.Linear(n_hidden, n_embd, bias=False) if tie_weights and n_hidden != n_embd else None
        self.head = nn.Linear(n_embd if self.proj is not None else n_hidden, vocab_size)
        if tie_weights:
            self.head.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def zero_state(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.n_layer, batch, self.n_hidden)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def features(self, idx: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                 cond: torch.Tensor | None = None, lengths: list[int] | None = None,
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """LSTM outputs (B, T, n_hidden) and the final state; with ``lengths`` each row's state is taken
        after its own last real token (right-padded rows)."""
        x = self.drop(self.embedding(idx))
        if cond is not None:
            x = torch.cat([x, cond[:, None, :].expand(-1, x.size(1), -1)], dim=-1)
        if lengths is not None and min(lengths) < idx.size(1):
            packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            out, state = self.lstm(packed, state)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=idx.size(1))
        else:
            out, state = self.lstm(x, state)
        return out, state

    def decode(self, idx: torch.Tensor, cache: LSTMState | None = None, rows: list[int] | None = None,
               valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """The generation protocol's step: logits (B, T, vocab) continuing the state of cache slots ``rows``
        (default: all, in order) and the conditioning vector they hold, if any; ``valid`` gives the real
        length of each right-padded row, ``last_only`` keeps each row's last real position."""
        state = cond = None
        if cache is not None:
            slots = torch.tensor(rows if rows is not None else range(idx.size(0)), device=idx.device)
            state = (cache.h.index_select(1, slots), cache.c.index_select(1, slots))
            cond = cache.cond.index_select(0, slots) if cache.cond is not None else None
        out, (h, c) = self.features(idx, state, cond=cond, lengths=valid)
        if cache is not None:
            cache.h[:, slots], cache.c[:, slots] = h, c
            for i, slot in enumerate(slots.tolist()):
                cache.lengths[slot] += valid[i] if valid is not None else idx.size(1)
        if last_only:
            if valid is not None:
                last = torch.tensor(valid, device=idx.device) - 1
                out = out[torch.arange(idx.size(0), device=idx.device), last][:, None]
            else:
                out = out[:, -1:]
        return self.logits(out)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return self.head(out)


def token_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (B, T) in nats; positions whose target is IGNORE_INDEX count 0."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none")  # over the last dimension: 2x faster than a transposed (B, V, T) view
    return flat.view(y.shape)


class LSTMLM(FamilyModel):
    """An LSTM language model with the families' protocol (``loss``, ``nll``, ``forward`` with a cache); it trains
    on random windows unless ``train.batching=sentences``."""

    def __init__(self, config: LSTMConfig) -> None:
        if config.vocab_size < 1:
            raise ConfigError("model.vocab_size is 0", "train on a data directory, which sets it from its tokenizer")
        super().__init__(config)
        self.net = LSTMNet(config.vocab_size, config.n_embd, config.n_hidden, config.n_layer, config.dropout,
                           config.tie_weights)

    @classmethod
    def declare(cls, config: LSTMConfig) -> Traits:
        return Traits(family="lstm", feature_width=config.n_hidden)

    def forward(self, idx: torch.Tensor, cache: LSTMState | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab); with a ``cache`` each row continues from its slot's state."""
        return self.net.decode(idx, cache, rows, valid, last_only)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> LSTMState:
        return LSTMState(*self.net.zero_state(batch_size, device))

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """LSTM outputs (B, T, n_hidden) from a zero state: what a fine-tuned classifier pools."""
        return self.net.features(idx)[0]

    def features_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.logits(h)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over targets ``y`` (IGNORE_INDEX positions are skipped)."""
        logits = self(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed NLL (nats) of the targets ``y``."""
        return token_nll(self(x), y).sum()
