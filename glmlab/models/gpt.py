"""Family `gpt`: a decoder-only Transformer in the GPT-2 mould, readable top to bottom.

Token + learned position embeddings, pre-LN blocks of causal self-attention (through
``F.scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm and a weight-tied LM head.
Parameter names and layouts are GPT-2's (``transformer.h.0.attn.c_attn.weight`` of shape
(in, out), as Hugging Face's ``Conv1D`` stores it), so a GPT-2 checkpoint maps on by a plain copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.config import field
from glmlab.errors import ConfigError


@dataclass
class GPTConfig:
    """Shape of a `gpt` model (``model.*`` keys)."""

    family: str = field("gpt", "model family")
    vocab_size: int = field(0, "vocabulary size; 0 = take it from the data's tokenizer", min=0)
    block_size: int = field(256, "context length in tokens", min=1)
    n_layer: int = field(6, "Transformer blocks", min=1)
    n_head: int = field(6, "attention heads per block (must divide n_embd)", min=1)
    n_embd: int = field(384, "embedding width", min=1)
    dropout: float = field(0.2, "dropout on embeddings, attention and residual branches", min=0.0, max=0.99)
    bias: bool = field(True, "biases in linear layers and LayerNorms (GPT-2 has them)")
    layer_norm_epsilon: float = field(1e-5, "LayerNorm epsilon (GPT-2: 1e-5)", min=0.0)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                              "choose n_embd a multiple of n_head, e.g. n_embd=384 with n_head=6")


class Conv1D(nn.Module):
    """A linear layer with GPT-2's weight layout (in_features, out_features): y = x W + b."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, n_head, max_len, head_dim).

    ``length`` is how many positions are filled; a forward pass with a cache appends its keys
    and values there, so the prefix is never re-encoded.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_index = layer_index
        self.dropout = config.dropout
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd, config.bias)  # q, k, v together
        self.c_proj = Conv1D(config.n_embd, config.n_embd, config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        mask, causal = None, True
        if cache is not None:
            start = cache.length
            cache.k[self.layer_index, :, :, start:start + T] = k
            cache.v[self.layer_index, :, :, start:start + T] = v
            k = cache.k[self.layer_index, :, :, :start + T]  # (B, nh, start+T, hs)
            v = cache.v[self.layer_index, :, :, :start + T]
            if start > 0:
                causal = False
                if T > 1:  # query i sees keys up to start + i
                    rows = torch.arange(T, device=x.device)[:, None] + start
                    mask = torch.arange(start + T, device=x.device)[None, :] <= rows
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd, config.bias)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The `gpt` family. ``forward(idx)`` gives next-token logits; ``loss``/``nll`` serve the trainer/evaluator."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set", "build the model from a data directory's tokenizer")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_position_embeddings else n

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with a cache, positions continue after its contents.

        ``last_only`` returns logits for the final position only (B, 1, vocab), which is all that
        decoding needs and saves the LM-head matmul over the prefix.
        """
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over targets ``y`` (positions with -100 are ignored)."""
        logits = self(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood (nats) of the targets ``y``; -100 marks unscored positions."""
        logits = self(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                               reduction="sum")

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype)
