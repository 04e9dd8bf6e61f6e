"""The `gpt` family's compiled decoding steps: one new token for rows at one position, or at any positions, and a
server's prefill of prompts into empty cache slots; and the int8 step of ``--decode-weights int8``.

Decoding a small model one token at a time on a CPU costs the overhead of each PyTorch call, not
arithmetic: a 4 x 128 model makes ~70 calls per token at ~4 us each. Run by TorchScript's
interpreter instead of Python, the step takes 0.28 ms instead of 0.31 ms. Each function is plain Python
as well: where scripting is unavailable it runs eagerly and gives the same numbers.

These are derived forms of one forward pass, ``GPT._blocks`` (the module forward): the same arithmetic on
2-D activations with the weights gathered once (:class:`DecodeWeights`), fused bias adds and keys and values
stored with one copy. ``tests/models/test_gpt_fast_paths.py`` checks each against the module forward at every
kind of input it accepts.

(No ``from __future__ import annotations`` here: TorchScript reads the annotations.)
"""

import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LayerWeights(NamedTuple):
    """One block's weights as the decoding steps read them; matrices in GPT-2's (in, out) layout."""

    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor
    attn_weight: torch.Tensor  # c_attn: queries, keys and values together
    attn_bias: torch.Tensor
    attn_proj_weight: torch.Tensor  # attn.c_proj
    attn_proj_bias: torch.Tensor
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor
    fc_weight: torch.Tensor  # mlp.c_fc
    fc_bias: torch.Tensor
    mlp_proj_weight: torch.Tensor  # mlp.c_proj
    mlp_proj_bias: torch.Tensor


class DecodeWeights(NamedTuple):
    """Every weight a decoding step reads, gathered once per generation (``GPT.decode_weights``); a bias-free
    model's biases are zeros, so the maths stay one. ``head`` is (vocab, C)."""

    wte: torch.Tensor
    wpe: torch.Tensor
    ln_f_weight: torch.Tensor
    ln_f_bias: torch.Tensor
    head: torch.Tensor
    layers: list[LayerWeights]
    exact_gelu: bool  # the MLP's GELU: the exact (erf) one, else GPT-2's tanh approximation


def gelu_rows(h: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """GPT-2's tanh GELU of ``h`` (rows, features), or the exact one. From 8 rows on, the tanh GELU is computed as
    h * sigmoid(2u) (the same function: 0.5 * (1 + tanh(u)) = sigmoid(2u)), whose vectorised kernels beat this
    PyTorch build's tanh-GELU kernel: 11.5 vs 17.9 us at 16 x 512, 30 vs 68 us at 64 x 512 (one thread, this
    CPU)."""
    if exact:
        return F.gelu(h)
    if h.size(0) < 8:
        return F.gelu(h, approximate="tanh")
    k = 1.5957691216057308  # 2 * sqrt(2 / pi), a literal: TorchScript reads no module constants
    return torch.addcmul(torch.full([1], k, dtype=h.dtype, device=h.device), h, h, value=k * 0.044715) \
        .mul_(h).sigmoid_().mul_(h)


def _mlp(x: torch.Tensor, w: LayerWeights, eps: float, exact_gelu: bool) -> torch.Tensor:
    """The block's second half: x + MLP(ln_2(x)), on 2-D activations."""
    h = gelu_rows(torch.addmm(w.fc_bias, torch.layer_norm(x, [x.size(1)], w.ln_2_weight, w.ln_2_bias, eps),
                              w.fc_weight), exact_gelu)
    return torch.addmm(w.mlp_proj_bias, h, w.mlp_proj_weight).add_(x)


def decode_layers(tokens: torch.Tensor, pos: int, kv_layers: list[torch.Tensor], w: DecodeWeights, n_head: int,
                  eps: float) -> torch.Tensor:
    """Logits (B, vocab) for one new token per row, every row at position ``pos``; stores each layer's
    key and value at ``pos`` of its (B, 2, n_head, max_len, head_dim) cache in ``kv_layers`` (a view of the
    rows' slots)."""
    B, C, end = tokens.size(0), w.wte.size(1), pos + 1
    x = (w.wte[tokens] + w.wpe[pos]).to(w.ln_f_weight.dtype)  # (B, C)
    for i in range(len(w.layers)):
        layer, kv = w.layers[i], kv_layers[i]
        qkv = torch.addmm(layer.attn_bias, torch.layer_norm(x, [C], layer.ln_1_weight, layer.ln_1_bias, eps),
                          layer.attn_weight).view(B, 3, n_head, 1, C // n_head)
        kv.narrow(3, pos, 1).copy_(qkv.narrow(1, 1, 2))  # k and v stored together
        k, v = kv.narrow(3, 0, end).unbind(1)  # (fewer view calls than indexing: ~4% of a one-row step)
        y = F.scaled_dot_product_attention(qkv.select(1, 0), k, v)
        x = _mlp(torch.addmm(layer.attn_proj_bias, y.view(B, C), layer.attn_proj_weight).add_(x), layer, eps,
                 w.exact_gelu)
    return F.linear(torch.layer_norm(x, [C], w.ln_f_weight, w.ln_f_bias, eps), w.head)


def decode_rows(tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, span: int,
                kv_layers: list[torch.Tensor], w: DecodeWeights, n_head: int, eps: float) -> torch.Tensor:
    """:func:`decode_layers` for rows at different positions in any cache slots (continuous batching):
    row i is cache slot ``slots[i]`` and its new token sits at ``positions[i]`` (each < ``span``, the
    keys attended to). When ``slots`` is 0..B-1 in order the cache is read in place, else gathered.
    Logits (B, vocab)."""
    B, C = tokens.size(0), w.wte.size(1)
    hs = C // n_head
    in_place = bool((slots == torch.arange(B, device=slots.device)).all())
    x = (w.wte[tokens] + w.wpe[positions]).to(w.ln_f_weight.dtype)  # (B, C)
    mask = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None]).view(B, 1, 1, span)
    # where each row's new key and value go, as rows of a (slots * 2 * n_head * max_len, hs) view of a
    # layer's cache: one index_copy_ per layer (cheaper than indexing four dimensions)
    max_len = kv_layers[0].size(3)
    heads = torch.arange(2 * n_head, device=slots.device)[None, :]
    where = ((slots[:, None] * (2 * n_head) + heads) * max_len + positions[:, None]).reshape(-1)
    for i in range(len(w.layers)):
        layer, kv = w.layers[i], kv_layers[i]
        qkv = torch.addmm(layer.attn_bias, torch.layer_norm(x, [C], layer.ln_1_weight, layer.ln_1_bias, eps),
                          layer.attn_weight).view(B, 3, n_head, 1, hs)
        kv.view(-1, hs).index_copy_(0, where, qkv[:, 1:].reshape(-1, hs).to(kv.dtype))  # k and v together
        keys = kv.narrow(0, 0, B).narrow(3, 0, span) if in_place else kv.narrow(3, 0, span).index_select(0, slots)
        k, v = keys.unbind(1)
        y = F.scaled_dot_product_attention(qkv.select(1, 0), k, v, attn_mask=mask)
        x = _mlp(torch.addmm(layer.attn_proj_bias, y.view(B, C), layer.attn_proj_weight).add_(x), layer, eps,
                 w.exact_gelu)
    return F.linear(torch.layer_norm(x, [C], w.ln_f_weight, w.ln_f_bias, eps), w.head)


def prefill_rows(idx: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, kv_layers: list[torch.Tensor],
                 w: DecodeWeights, n_head: int, eps: float) -> torch.Tensor:
    """Encode right-padded prompts idx (B, T) of ``lengths`` real tokens into empty cache slots ``slots``
    (their keys and values at positions 0..T-1; a padded row's extra positions are overwritten before
    anything reads them) and return the logits (B, vocab) at each prompt's last token: a server's
    prefill of joining requests, with :func:`decode_layers`' per-call savings over the module-by-module
    forward. The matrix products, which are most of the work, run on the real tokens only (packed, one
    row per token); attention, which needs each prompt on its own, runs on the padded layout."""
    B, T, C = idx.size(0), idx.size(1), w.wte.size(1)
    real = (torch.arange(T, device=idx.device)[None, :] < lengths[:, None]).reshape(B * T)
    padded = int(real.sum()) < B * T
    packed = real.nonzero().squeeze(1)  # padded cell of each real token, (N,)
    unpack = packed  # each padded cell's packed row; padding cells read row N, a zero row appended for them
    if padded:
        unpack = torch.where(real, real.long().cumsum(0) - 1, torch.full_like(packed[:1], packed.size(0)))
    x = (w.wte[idx.reshape(B * T)[packed]] + w.wpe[packed % T]).to(w.ln_f_weight.dtype)  # (N, C)
    for i in range(len(w.layers)):
        layer, kv = w.layers[i], kv_layers[i]
        qkv = torch.addmm(layer.attn_bias, torch.layer_norm(x, [C], layer.ln_1_weight, layer.ln_1_bias, eps),
                          layer.attn_weight)
        if padded:
            qkv = torch.cat([qkv, qkv.new_zeros(1, 3 * C)]).index_select(0, unpack)
        qkv = qkv.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        kv.narrow(3, 0, T).index_copy_(0, slots, qkv[1:].transpose(0, 1).to(kv.dtype))  # k and v together
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B * T, C)
        if padded:
            y = y.index_select(0, packed)
        x = _mlp(torch.addmm(layer.attn_proj_bias, y, layer.attn_proj_weight).add_(x), layer, eps,
                 w.exact_gelu)
    x = x.index_select(0, lengths.cumsum(0) - 1)  # each prompt's last token
    return F.linear(torch.layer_norm(x, [C], w.ln_f_weight, w.ln_f_bias, eps), w.head)


class Int8Linear:
    """An (out, in) matrix and its bias as int8 for PyTorch's quantized CPU kernels (fbgemm / oneDNN):
    per-row int8 weights, activations quantized on the fly, int8 dot products (VNNI), fp32 out.
    A quarter of fp32's bytes per token, which is what bounds decoding a large model on a CPU.

    Activations are quantized to 7 bits (``reduce_range``), as PyTorch's own dynamic ``Linear`` does: on
    x86 CPUs without VNNI (AVX2 only) fbgemm sums pairs of int8 x uint8 products in 16 bits, which
    saturates with 8-bit activations (measured on an AVX2 EPYC: 23% error on a 64 x 64 product, 1.3%
    with 7 bits)."""

    __slots__ = ("packed",)

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight_out_in.detach().float().contiguous()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # PyTorch marks quantized tensors deprecated; their kernels still ship
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales, torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)  # reduce_range


def int8_weights(w: DecodeWeights) -> DecodeWeights:
    """``w`` with every matrix as an :class:`Int8Linear` holding its bias (the bias fields then unused)."""
    def quantized(layer: LayerWeights) -> LayerWeights:
        return layer._replace(attn_weight=Int8Linear(layer.attn_weight.t(), layer.attn_bias),
                              attn_proj_weight=Int8Linear(layer.attn_proj_weight.t(), layer.attn_proj_bias),
                              fc_weight=Int8Linear(layer.fc_weight.t(), layer.fc_bias),
                              mlp_proj_weight=Int8Linear(layer.mlp_proj_weight.t(), layer.mlp_proj_bias))

    return w._replace(head=Int8Linear(w.head, None), layers=[quantized(layer) for layer in w.layers])


def decode_rows_int8(tokens: torch.Tensor, slots: list[int], positions: list[int], kv_layers: list[torch.Tensor],
                     w: DecodeWeights, n_head: int, eps: float) -> torch.Tensor:
    """:func:`decode_layers` / :func:`decode_rows` with :func:`int8_weights` (which TorchScript cannot take), run
    eagerly: a large model's decoding is bound by arithmetic, not by this loop. Row i is cache slot
    ``slots[i]`` at ``positions[i]``. Logits (B, vocab)."""
    B, C = tokens.size(0), w.wte.size(1)
    hs, shape = C // n_head, [C]
    first, pos = slots[0], positions[0]
    same = positions == [pos] * B and slots == list(range(first, first + B))
    span = max(positions) + 1
    x = (w.wte[tokens] + w.wpe[torch.tensor(positions, device=tokens.device)]).to(w.ln_f_weight.dtype)  # (B, C)
    mask = None
    if not same:
        at = torch.tensor(positions, device=tokens.device)
        mask = (torch.arange(span, device=tokens.device)[None, :] <= at[:, None]).view(B, 1, 1, span)
    for i in range(len(w.layers)):
        layer, kv = w.layers[i], kv_layers[i]
        qkv = layer.attn_weight(torch.layer_norm(x, shape, layer.ln_1_weight, layer.ln_1_bias, eps))
        qkv = qkv.view(B, 3, n_head, 1, hs)
        if same:  # one position, consecutive slots: a view of them, as decode_layers reads
            rows = kv.narrow(0, first, B)
            rows[:, :, :, pos:pos + 1] = qkv[:, 1:]  # k and v stored together
            keys = rows[:, :, :, :span]
        else:
            for r in range(B):
                kv[slots[r], :, :, positions[r]] = qkv[r, 1:, :, 0]
            keys = kv[slots, :, :, :span]
        y = F.scaled_dot_product_attention(qkv[:, 0], keys[:, 0], keys[:, 1], attn_mask=mask)
        x = layer.attn_proj_weight(y.view(B, C)).add_(x)
        h = F.gelu(layer.fc_weight(torch.layer_norm(x, shape, layer.ln_2_weight, layer.ln_2_bias, eps)),
                   approximate="none" if w.exact_gelu else "tanh")
        x = layer.mlp_proj_weight(h).add_(x)
    return w.head(torch.layer_norm(x, shape, w.ln_f_weight, w.ln_f_bias, eps))


class _UnoptimisedGraphs:
    """``torch.jit.optimized_execution(False)`` as a plain object (its generator costs ~3 us a step): the
    compiled steps run without TorchScript's graph optimisation, whose re-specialisation made them slower."""

    def __enter__(self) -> None:
        self.previous = torch._C._get_graph_executor_optimize()
        torch._C._set_graph_executor_optimize(False)

    def __exit__(self, *exc: object) -> None:
        torch._C._set_graph_executor_optimize(self.previous)


def unoptimised_graphs() -> _UnoptimisedGraphs:
    """Run compiled steps inside this (``with unoptimised_graphs():``)."""
    return _UnoptimisedGraphs()


@functools.cache
def _script(fn):
    """``fn`` compiled by TorchScript once per process; ``fn`` itself where TorchScript is unavailable or
    refuses it (the same code, run eagerly, gives the same numbers)."""
    try:
        with warnings.catch_warnings():  # PyTorch marks TorchScript deprecated; its interpreter still ships
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 — any scripting failure just means running the same code eagerly
        return fn


def scripted_decode_layers():
    """:func:`decode_layers`, compiled (see :func:`_script`)."""
    return _script(decode_layers)


def scripted_decode_rows():
    """:func:`decode_rows`, compiled (see :func:`_script`)."""
    return _script(decode_rows)


def scripted_prefill_rows():
    """:func:`prefill_rows`, compiled (see :func:`_script`)."""
    return _script(prefill_rows)
