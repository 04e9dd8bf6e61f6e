"""The Transformer block every Transformer family builds on: self-attention and an MLP, each a residual branch.

One block serves three readings of a text: causal (``gpt``: each token sees the ones before it), bidirectional
(``bert``: every token sees every other) and a mask of the family's own (``glm``: Part A bidirectional, Part B
causal after it). Layer norm goes before each branch (GPT-2) or after the residual sum (BERT's post-LN layout,
which ``glmlab export-hf`` maps onto ``BertForMaskedLM`` by a plain copy). Weights use GPT-2's layout
(:class:`Conv1D`), whatever the family.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("pre", "post")
ACTIVATIONS = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
               "gelu": F.gelu}  # BERT's exact GELU


class Conv1D(nn.Module):
    """A linear layer with GPT-2's weight layout (in_features, out_features): y = x W + b."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)


@dataclass(frozen=True)
class BlockShape:
    """What a block is made of: widths, dropout, and how it reads and normalises."""

    n_embd: int
    n_head: int
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    causal: bool = True  # without a mask: each token sees only those before it (False: every token)
    norm: str = "pre"  # "pre": LN before each branch (GPT-2); "post": LN after each residual sum (BERT)
    activation: str = "gelu_tanh"


class CacheStep(Protocol):
    """Where one forward pass with a cache reads and writes keys and values (a family's decoding state)."""

    mask: torch.Tensor | None
    causal: bool

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys/values (B, nh, T, hs); return all keys/values to attend to."""


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``; q, k and v from one projection."""

    def __init__(self, shape: BlockShape, layer_index: int) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.n_embd = shape.n_embd
        self.layer_index = layer_index
        self.dropout = shape.dropout
        self.causal = shape.causal
        self.c_attn = Conv1D(shape.n_embd, 3 * shape.n_embd, shape.bias)  # q, k, v together
        self.c_proj = Conv1D(shape.n_embd, shape.n_embd, shape.bias)
        self.resid_dropout = nn.Dropout(shape.dropout)
        self.attend_in_fp32 = False  # bf16 q, k, v attended in fp32 (where measured faster: the trainer)

    def forward(self, x: torch.Tensor, step: CacheStep | None = None, mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """``mask`` (B, 1, T, T) True = may attend, replacing the block's own reading; ``step``: a cache's."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        causal = self.causal and mask is None
        if step is not None:
            k, v = step.write_and_read(self.layer_index, k, v)  # (B, nh, span, hs)
            mask, causal = step.mask, step.causal
        dropout = self.dropout if self.training else 0.0
        if self.attend_in_fp32 and q.dtype == torch.bfloat16:
            with torch.autocast(q.device.type, enabled=False):  # autocast would cast q, k and v back to bf16
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   dropout_p=dropout, is_causal=causal).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout,
                                               is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, shape: BlockShape) -> None:
        super().__init__()
        self.c_fc = Conv1D(shape.n_embd, 4 * shape.n_embd, shape.bias)
        self.c_proj = Conv1D(4 * shape.n_embd, shape.n_embd, shape.bias)
        self.dropout = nn.Dropout(shape.dropout)
        self.act = ACTIVATIONS[shape.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, shape: BlockShape, layer_index: int) -> None:
        super().__init__()
        self.post_norm = shape.norm == "post"
        self.ln_1 = nn.LayerNorm(shape.n_embd, eps=shape.layer_norm_epsilon, bias=shape.bias)
        self.attn = SelfAttention(shape, layer_index)
        self.ln_2 = nn.LayerNorm(shape.n_embd, eps=shape.layer_norm_epsilon, bias=shape.bias)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, step: CacheStep | None = None, mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, step, mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), step, mask)
        return x + self.mlp(self.ln_2(x))


def bf16_attention_slowdown(batch: int, heads: int, length: int, head_size: int, dropout: float = 0.0) -> float:
    """How many times longer causal self-attention (``F.scaled_dot_product_attention``, forward and backward, with
    ``dropout``) takes on bf16 q/k/v than through :class:`SelfAttention`'s fp32 branch (cast up, attend, cast back)
    on this CPU at this shape: once per process, shape and thread count. PyTorch's CPU flash-attention kernel can be
    far slower in bf16 at short sequences and narrow heads (3.4 against 1.2 ms at 12 x 4 heads x 64 x 32 on a
    2-core AVX512-BF16 EPYC) and faster at long ones (0.74x at 1 x 12 x 1024 x 64), so it is measured."""
    return _bf16_attention_slowdown(batch, heads, length, head_size, dropout, torch.get_num_threads())


@functools.cache
def _bf16_attention_slowdown(batch: int, heads: int, length: int, head_size: int, dropout: float,
                             threads: int) -> float:
    """The measurement: best of three timings of each way, alternating (after a first round that allocates and
    picks kernels); enough rows of the batch to keep every thread busy stand in for all of it (the cost is per row
    and head). The random numbers it draws (inputs, dropout) leave the global generator as it was: a run's
    dropout masks, and a resumed run's, do not depend on whether this process measured before."""
    rows = max(1, min(batch, -(-4 * threads // heads)))
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        q, k, v = (torch.randn(rows, heads, length, head_size, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(rows, heads, length, head_size, dtype=torch.bfloat16)

        def in_bf16() -> None:
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True).backward(grad)

        def in_fp32() -> None:
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout, is_causal=True)
            y.to(torch.bfloat16).backward(grad)

        best = {in_bf16: math.inf, in_fp32: math.inf}
        for attempt in range(4):
            for way in (in_fp32, in_bf16):
                start = time.perf_counter()
                way()
                if attempt:
                    best[way] = min(best[way], time.perf_counter() - start)
    return best[in_bf16] / max(best[in_fp32], 1e-9)


SLOW_BF16_ATTENTION = 1.25  # bf16 attention this many times slower than fp32 (measured) runs in fp32: only a clear
# win, so that shapes timed near even (0.9-1.1) do not switch between runs of one config on a busy machine


def attention_layers(module: nn.Module) -> list[SelfAttention]:
    return [m for m in module.modules() if isinstance(m, SelfAttention)]


def measured_attention_slowdown(module: nn.Module, batch: int, length: int) -> float | None:
    """The largest :func:`bf16_attention_slowdown` over ``module``'s attention layers (their heads, head sizes and
    dropout; ``batch`` rows of ``length`` tokens, causal), None when it has none."""
    shapes = {(layer.n_head, layer.n_embd // layer.n_head, layer.dropout) for layer in attention_layers(module)}
    return max((bf16_attention_slowdown(batch, heads, length, size, dropout) for heads, size, dropout in shapes),
               default=None)


def attend_in_fp32(module: nn.Module, on: bool) -> None:
    """Let every attention layer of ``module`` attend bf16 q, k, v in fp32 (on) or as they are (off)."""
    for layer in attention_layers(module):
        layer.attend_in_fp32 = on


def key_padding_mask(idx: torch.Tensor, pad_id: int) -> torch.Tensor | None:
    """(B, 1, 1, T) True where a key is a real token, for bidirectional reading of right-padded rows; None when
    no row is padded (the unmasked kernel is faster)."""
    real = idx != pad_id
    if bool(real.all()):
        return None
    return real[:, None, None, :]
