"""Family `bert`: a masked language model (Devlin et al., 2019) — the autoencoding half of glmlab.

It reads a whole window at once (glmlab's Transformer blocks with bidirectional attention, in BERT's post-LN
layout) and reconstructs the tokens hidden from it: 15% of the tokens are chosen (whole words optionally), 80%
of those become ``[MASK]``, 10% a random token and 10% stay, and the loss is the cross-entropy on the chosen
ones. The output head is BERT's (dense → GELU → LayerNorm → the tied embedding matrix + a bias), so
``glmlab export-hf`` writes a ``BertForMaskedLM`` by plain copies.

A masked LM gives no exact likelihood of a text: :meth:`BERT.nll` is the pseudo-log-likelihood (Salazar et al.,
2020; each token masked in turn and scored given all the others), which ``glmlab eval`` labels as PLL, never as
an NLL comparable with a causal model's. It writes text by mask-predict (:mod:`glmlab.generation.mask_predict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.data.tokenizer import EOS_ID, FIRST_TEXT_ID, MASK_ID, PAD_ID, Tokenizer
from glmlab.errors import ConfigError, GlmlabError
from glmlab.models.contract import FamilyModel, Traits
from glmlab.models.transformer import Block, BlockShape, key_padding_mask
from glmlab.schema import field

ADAPTER_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class BertConfig:
    """Shape and masking of a `bert` model (``model.*`` keys)."""

    family: str = field("bert", "model family")
    vocab_size: int = field(0, "vocabulary size; 0 = take it from the data's tokenizer", min=0)
    block_size: int = field(128, "context length in tokens (the window read at once)", min=2)
    n_layer: int = field(4, "Transformer blocks", min=1)
    n_head: int = field(4, "attention heads per block (must divide n_embd)", min=1)
    n_embd: int = field(256, "embedding width", min=1)
    dropout: float = field(0.1, "dropout on embeddings, attention and residual branches", min=0.0, max=0.99)
    layer_norm_epsilon: float = field(1e-12, "LayerNorm epsilon (BERT: 1e-12)", min=0.0)
    mask_prob: float = field(0.15, "share of tokens chosen for prediction in each window", min=0.0, max=1.0)
    mask_token_prob: float = field(0.8, "of the chosen tokens, the share replaced by [MASK] (BERT: 0.8)",
                                   min=0.0, max=1.0)
    random_token_prob: float = field(0.1, "of the chosen tokens, the share replaced by a random token (BERT: 0.1; "
                                     "the rest stay as they are)", min=0.0, max=1.0)
    whole_word: bool = field(False, "choose whole words: every piece of a chosen word is masked with it")

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                              "choose n_embd a multiple of n_head, e.g. n_embd=256 with n_head=4")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ConfigError(f"model.mask_token_prob + model.random_token_prob = "
                              f"{self.mask_token_prob + self.random_token_prob:g} is above 1",
                              "lower one of them (BERT: 0.8 and 0.1)")

    def block_shape(self) -> BlockShape:
        return BlockShape(self.n_embd, self.n_head, self.dropout, True, self.layer_norm_epsilon, causal=False,
                          norm="post", activation="gelu")


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense → GELU → LayerNorm, then the (tied) embedding matrix and a bias."""

    def __init__(self, config: BertConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.decoder.weight = embedding.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h)))) + self.bias


def word_starts(tokenizer: Tokenizer) -> torch.Tensor:
    """(vocab,) True for tokens that begin a word, for whole-word masking: a byte-level BPE token that starts with
    a space or a line break (or a whole word of a word tokenizer, a WordPiece token without ``##``); a char
    tokenizer's whitespace and punctuation (a word then runs from the space before it to its last letter). Special
    tokens begin one of their own."""
    starts = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    if tokenizer.kind == "word":
        return starts
    for i in range(FIRST_TEXT_ID, tokenizer.vocab_size):
        token = tokenizer.hf.id_to_token(i)
        if token is None:
            continue
        if tokenizer.kind == "bpe":
            starts[i] = token[0] in "ĠĊĉ" or not token[0].isalnum()
        elif tokenizer.kind == "wordpiece":  # an imported BERT's: "##" continues a word
            starts[i] = not token.startswith("##")
        else:
            starts[i] = not token.isalnum()
    return starts


def _last_blank(idx: torch.Tensor) -> torch.Tensor:
    """The position of each row's last ``[MASK]``; a row without one is refused."""
    is_blank = idx == MASK_ID
    if not bool(is_blank.any(1).all()):
        raise GlmlabError("a row has no [MASK] to fill", "put [MASK] in the text (a cloze pattern needs one)")
    positions = torch.arange(idx.size(1), device=idx.device)
    return torch.where(is_blank, positions, -1).max(1).values


class BERT(FamilyModel):
    """The `bert` family: ``forward(idx)`` gives logits for every position of a bidirectionally read window."""

    host_work = ("corrupt",)

    def __init__(self, config: BertConfig) -> None:
        if config.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set", "build the model from a data directory's tokenizer")
        super().__init__(config)
        self.embeddings = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            ln=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            drop=nn.Dropout(config.dropout),
        ))
        self.h = nn.ModuleList([Block(config.block_shape(), i) for i in range(config.n_layer)])
        self.head = MaskedLMHead(config, self.embeddings.wte)
        self.apply(self._init_weights)
        self.register_buffer("word_starts", torch.ones(config.vocab_size, dtype=torch.bool), persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def declare(cls, config: BertConfig) -> Traits:
        return Traits(family="bert", feature_width=config.n_embd, adapter_targets=ADAPTER_TARGETS,
                      special_tokens=("pad", "mask", "cls", "sep"), hf_architecture="BertForMaskedLM",
                      objective="masked", infilling="mask_predict")

    def read_vocabulary(self, tokenizer: Tokenizer) -> None:
        """Which tokens begin a word (whole-word masking needs it; nothing is saved)."""
        if self.config.whole_word:
            self.word_starts.copy_(word_starts(tokenizer)[: self.config.vocab_size])

    # --- the forward pass ----------------------------------------------------------------------------------

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) of the window read at once (padding, ``<pad>``, is not attended)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        e = self.embeddings
        positions = torch.arange(T, device=idx.device)[None]
        x = e.drop(e.ln(e.wte(idx) + e.wpe(positions)))
        mask = key_padding_mask(idx, PAD_ID)
        for block in self.h:
            x = block(x, mask=mask)
        return x

    def features_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def forward(self, idx: torch.Tensor, cache: object | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for every position: what each token (a ``[MASK]`` above all) is, given the rest."""
        if cache is not None:
            raise GlmlabError("a bert model reads a whole text at once and has no decoding cache",
                              "generate with mask-predict (glmlab generate does for a bert run)")
        logits = self.head(self.features(idx))
        return logits[:, -1:] if last_only else logits

    def blank_logits(self, idx: torch.Tensor, blank_at: list[int] | None = None) -> torch.Tensor:
        """Logits (B, vocab) of what stands at the last ``[MASK]`` of each right-padded row (a cloze's answer), or at
        position ``blank_at[i]`` of row i."""
        at = _last_blank(idx) if blank_at is None else torch.tensor(blank_at, device=idx.device)
        return self(idx)[torch.arange(idx.size(0), device=idx.device), at]

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> object:
        raise GlmlabError("a bert model does not decode left to right",
                          "generate with mask-predict (glmlab generate does for a bert run)")

    # --- training: BERT's masking ------------------------------------------------------------------------

    def corrupt(self, seq: torch.Tensor, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's masking of token ids (B, T): the inputs and the targets (-100 where nothing is predicted).
        Padding and special tokens other than ``<eos>`` are never chosen. Draws from ``generator`` (the global
        generator by default, which checkpoints save, so a resumed run masks as the uninterrupted one); eager under
        torch.compile (``host_work``), whose own random numbers would mask other tokens than the eager run."""
        c = self.config
        maskable = (seq >= FIRST_TEXT_ID) | (seq == EOS_ID)
        draw = torch.rand(seq.shape, generator=generator, device=seq.device)
        if c.whole_word:  # a word is chosen by the draw at its first piece
            T = seq.size(1)
            starts = self.word_starts[seq] | (torch.arange(T, device=seq.device) == 0)
            first = torch.where(starts, torch.arange(T, device=seq.device), 0).cummax(dim=1).values
            draw = draw.gather(1, first)
        chosen = (draw < c.mask_prob) & maskable
        how = torch.rand(seq.shape, generator=generator, device=seq.device)
        random_ids = torch.randint(FIRST_TEXT_ID, c.vocab_size, seq.shape, generator=generator, device=seq.device)
        inputs = torch.where(chosen & (how < c.mask_token_prob), MASK_ID, seq)
        swap = chosen & (how >= c.mask_token_prob) & (how < c.mask_token_prob + c.random_token_prob)
        inputs = torch.where(swap, random_ids, inputs)
        return inputs, torch.where(chosen, seq, -100)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy on the chosen tokens of the windows ``x`` (``y``, the next-token targets, is not
        used: a masked LM reconstructs its input)."""
        inputs, targets = self.corrupt(x)
        logits = self(inputs).float()
        total = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100,
                                reduction="sum")
        return total / (targets != -100).sum().clamp(min=1)

    # --- scoring: the pseudo-log-likelihood --------------------------------------------------------------

    def nll(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Summed pseudo-negative-log-likelihood (nats) of the targets ``y`` (-100: not scored): each scored
        token is replaced by ``[MASK]`` in a copy of its window and scored given every other token there.

        Target ``y[t]`` is the token after ``x[t]``: for t < T-1 it sits at position t+1 of ``x``; the last
        one is read in the window shifted by one (``x[1:]`` then ``y[-1]``), so every target has a full
        window of context, as a causal model's has. ``chunk``: masked copies per forward pass."""
        B, T = x.size()
        real = y != -100
        last = torch.where(real[:, -1], y[:, -1], PAD_ID)
        shifted = torch.cat([x[:, 1:], last[:, None]], dim=1)
        rows, cols = real.nonzero(as_tuple=True)
        in_shifted = cols == T - 1
        windows = torch.where(in_shifted[:, None], shifted[rows], x[rows])  # (N, T): each scored token's window
        where = torch.where(in_shifted, T - 1, cols + 1)
        targets = y[rows, cols]
        total = torch.zeros((), device=x.device)
        for start in range(0, len(rows), chunk):
            w = windows[start:start + chunk].clone()
            at = where[start:start + chunk]
            n = torch.arange(len(w), device=x.device)
            w[n, at] = MASK_ID
            h = self.features(w)[n, at]  # (n, C): only the masked position is scored
            logits = self.head(h).float()
            total = total + F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
        return total
