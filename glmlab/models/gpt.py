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

from glmlab.errors import ConfigError
from glmlab.models.contract import FAST_PATHS, FamilyModel, Traits
from glmlab.models.gpt_aot import CompiledDecodeStep, compiled_batch_sizes, compiled_decode_step, covers
from glmlab.models.gpt_decode import (
    DecodeWeights,
    Int8Linear,
    LayerWeights,
    decode_rows_int8,
    int8_weights,
    scripted_decode_layers,
    scripted_decode_rows,
    scripted_prefill_rows,
    unoptimised_graphs,
)
from glmlab.models.transformer import ACTIVATIONS, Block, BlockShape, SelfAttention
from glmlab.schema import field


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
    activation: str = field("gelu_tanh", "MLP activation: gelu_tanh (GPT-2's tanh approximation) or gelu (the "
                            "exact erf GELU, as nanoGPT and BERT have it: about 3x cheaper on CPU)",
                            choices=tuple(ACTIVATIONS))

    def block_shape(self) -> BlockShape:
        return BlockShape(self.n_embd, self.n_head, self.dropout, self.bias, self.layer_norm_epsilon,
                          activation=self.activation)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                              "choose n_embd a multiple of n_head, e.g. n_embd=384 with n_head=6")


class KVCache:
    """Preallocated keys and values for every layer: ``k`` and ``v`` are (n_layer, B, n_head, max_len, head_dim)
    views of one tensor, so a decoding step stores a layer's key and value with one copy.

    Each row (slot) has its own fill level in ``lengths`` (a Python list, so reading it never waits
    for a device); a forward pass with a cache writes its keys and values after each row's contents,
    so the prefix is never re-encoded. Rows leave with :meth:`select`, beams reorder with it too.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.kv = torch.zeros((n_layer, batch_size, 2, n_head, max_len, head_dim), device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch_size
        self.weights: DecodeWeights | None = None  # the model's weights, gathered once for fast decoding
        # --compile-decode's steps for this cache, by batch size: those ready at its first step (all of them, after
        # GPT.prepare_compiled_decode), or the cache's own size, compiled then
        self.compiled: dict[int, CompiledDecodeStep] | None = None
        self._split_layers()

    def _split_layers(self) -> None:
        self.k, self.v = self.kv[:, :, 0], self.kv[:, :, 1]
        self.layers = list(self.kv.unbind(0))  # per layer: (B, 2, n_head, max_len, head_dim)
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {(0, len(self.lengths)): self.layers}

    def slot_views(self, first: int, count: int) -> list[torch.Tensor]:
        """Per layer, a view of slots ``first`` to ``first + count`` (made once, reused every step)."""
        views = self._views.get((first, count))
        if views is None:
            views = self._views[first, count] = [layer.narrow(0, first, count) for layer in self.layers]
        return views

    def select(self, rows: list[int]) -> None:
        """Keep (or repeat, for beams) the given rows, in that order."""
        self.kv = self.kv.index_select(1, torch.tensor(rows, device=self.kv.device))
        self.lengths = [self.lengths[r] for r in rows]
        self.compiled = None  # (chosen for the old batch size)
        self._split_layers()

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Move slot ``src``'s keys and values to slot ``dst`` (free); ``src`` becomes empty."""
        n = self.lengths[src]
        self.kv[:, dst, :, :, :n] = self.kv[:, src, :, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0


@dataclass
class KVCacheStep:
    """Where one forward pass reads and writes the cache; worked out once, used by every layer."""

    cache: KVCache
    rows: torch.Tensor | None  # cache slots of the batch rows; None = every slot, in order
    start: int | None  # the common start position, when all rows start at the same place
    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    span: int  # keys to attend to: max(start + T)
    mask: torch.Tensor | None  # (B, 1, T, span) True = may attend; None when is_causal or unmasked
    causal: bool

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys/values (B, nh, T, hs); return all keys/values to attend to (B, nh, span, hs)."""
        c = self.cache
        T = k.size(2)
        if self.rows is None and self.start is not None:  # the common case: views, no copies
            c.k[layer, :, :, self.start:self.start + T] = k
            c.v[layer, :, :, self.start:self.start + T] = v
            return c.k[layer, :, :, :self.span], c.v[layer, :, :, :self.span]
        rows = self.rows if self.rows is not None else torch.arange(k.size(0), device=k.device)
        c.k[layer, rows[:, None], :, self.positions] = k.transpose(1, 2)
        c.v[layer, rows[:, None], :, self.positions] = v.transpose(1, 2)
        if self.rows is None:
            return c.k[layer, :, :, :self.span], c.v[layer, :, :, :self.span]
        return c.k[layer, self.rows, :, :self.span], c.v[layer, self.rows, :, :self.span]


CausalSelfAttention = SelfAttention  # its name before the families shared one block (glmlab.models.transformer)

# The projections LoRA adapts: attention (c_attn, c_proj) and MLP (c_fc, c_proj).
ADAPTER_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DECODE_WEIGHTS = ("native", "int8")


class GPT(FamilyModel):
    """The `gpt` family. ``forward(idx)`` gives next-token logits; ``loss``/``nll`` serve the trainer/evaluator."""

    def __init__(self, config: GPTConfig) -> None:
        if config.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set", "build the model from a data directory's tokenizer")
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config.block_shape(), i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.decode_weight_format = "native"
        self._int8_cache: tuple | None = None
        self.decode_compiled = False  # set_decode_compiled: the decoding step compiled ahead of time
        self._compiled_steps: dict[tuple, tuple] = {}  # key -> (step, the parameters and storages it was made of)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def declare(cls, config: GPTConfig) -> Traits:
        return Traits(family="gpt", feature_width=config.n_embd, adapter_targets=ADAPTER_TARGETS,
                      fast_paths=frozenset(FAST_PATHS), decode_weights=DECODE_WEIGHTS,
                      compiled_decode=True, hf_architecture="GPT2LMHeadModel")

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_position_embeddings else n

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        With a ``cache``, each row continues after what its cache slot holds (``rows`` picks the slots
        when the batch is a subset of them); ``valid`` gives each row's real length when rows are
        right-padded to a common T. ``last_only`` returns only each row's last real position
        (B, 1, vocab), all that decoding needs.
        """
        B, T = idx.size()
        if cache is not None and T == 1 and rows is None:
            logits = self.decode_rows(idx[:, 0], cache, list(range(B)))
            if logits is not None:
                return logits[:, None]
        step = None
        if cache is None:
            positions = self._positions(T, idx.device)
        else:
            step = self._cache_step(cache, rows, B, T, idx.device)
            positions = step.positions
        x = self._blocks(idx, positions, step)  # (B, T, C)
        if cache is not None:
            slots = rows if rows is not None else range(B)
            for i, slot in enumerate(slots):
                cache.lengths[slot] += valid[i] if valid is not None else T
        if last_only:
            if valid is not None:
                last = torch.tensor(valid, device=idx.device) - 1
                x = x[torch.arange(B, device=idx.device), last][:, None]
            else:
                x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) after the last layer norm: what the LM head reads, and what a
        fine-tuned classifier pools."""
        return self.transformer.ln_f(self._blocks(idx, self._positions(idx.size(1), idx.device), None))

    def _positions(self, T: int, device: torch.device) -> torch.Tensor:
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        return torch.arange(T, dtype=torch.long, device=device)[None]

    def _blocks(self, idx: torch.Tensor, positions: torch.Tensor, step: KVCacheStep | None) -> torch.Tensor:
        """The Transformer (B, T, C) before the final layer norm: the one definition of the forward pass that
        ``forward`` and ``features`` share and the compiled steps of :mod:`glmlab.models.gpt_decode` are tested
        against (``tests/models/test_gpt_fast_paths.py``)."""
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, step)
        return x

    def features_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def decode_rows(self, tokens: torch.Tensor, cache: KVCache, rows: list[int]) -> torch.Tensor | None:
        """Logits (B, vocab) for one new token in each of the cache slots ``rows``, which may sit at
        different positions (a server's continuous batch), through the compiled steps of
        :mod:`glmlab.models.gpt_decode` (or the int8 one, or with :meth:`set_decode_compiled` the step compiled
        ahead of time, :mod:`glmlab.models.gpt_aot`); None when the general ``forward`` is needed
        (training, a slot that is full)."""
        starts = [cache.lengths[r] for r in rows]
        if self.training or cache.weights is None or max(starts) + 1 > cache.max_len:
            return None
        logits = self._decode_compiled(tokens, cache, rows, starts) if self.decode_compiled else None
        if logits is None:
            logits = self._decode_scripted(tokens, cache, rows, starts)
        for r in rows:
            cache.lengths[r] += 1
        return logits

    def _decode_scripted(self, tokens: torch.Tensor, cache: KVCache, rows: list[int], starts: list[int]
                         ) -> torch.Tensor:
        """:meth:`decode_rows` through the TorchScript steps (or the int8 one)."""
        c, weights = self.config, cache.weights
        first, count = rows[0], len(rows)
        if isinstance(weights.head, Int8Linear):
            logits = decode_rows_int8(tokens, rows, starts, cache.layers, weights, c.n_head, c.layer_norm_epsilon)
        elif starts.count(starts[0]) == count and (count == 1 or rows == list(range(first, first + count))):
            # one position, consecutive slots: the plain step on a view of those slots (no mask, no gather)
            with unoptimised_graphs():
                logits = scripted_decode_layers()(tokens, starts[0], cache.slot_views(first, count), weights,
                                                  c.n_head, c.layer_norm_epsilon)
        else:
            device = tokens.device
            with unoptimised_graphs():
                logits = scripted_decode_rows()(tokens, torch.tensor(rows, device=device),
                                                torch.tensor(starts, device=device), max(starts) + 1, cache.layers,
                                                weights, c.n_head, c.layer_norm_epsilon)
        return logits

    def _decode_compiled(self, tokens: torch.Tensor, cache: KVCache, rows: list[int], starts: list[int]
                         ) -> torch.Tensor | None:
        """Logits for ``rows`` through a step compiled ahead of time: the one of the smallest batch size ready for
        this cache that spans slots 0 .. max(rows) (else the whole cache's, compiled now). Slots in that span but not
        in ``rows`` (free, or not decoding this step) ride along with token 0 at their next free position, which
        nothing reads before the slot writes it again; their logits are dropped and their lengths kept. None where no
        compiled step fits (repeated rows, a position the step was not built for, another dtype or device)."""
        if len(set(rows)) != len(rows):
            return None
        steps = self._compiled_steps_for(cache, build_full=False)
        if steps is None:
            return None
        top = max(rows) + 1
        size = min((n for n in steps if n >= top), default=len(cache.lengths))
        positions = cache.lengths[:size]
        for r, s in zip(rows, starts, strict=True):
            positions[r] = s
        if not covers(positions, cache.max_len):  # (asked before anything is compiled)
            return None
        step = steps.get(size) or self._compiled_steps_for(cache, build_full=True)[size]
        if rows == list(range(size)):
            return step(tokens, positions, cache.slot_views(0, size))
        every = torch.zeros(size, dtype=tokens.dtype, device=tokens.device)
        every[rows] = tokens
        return step(every, positions, cache.slot_views(0, size))[rows]

    def _step_key(self, cache: KVCache, size: int) -> tuple:
        params = list(self.parameters())
        state = tuple((id(p), p.data_ptr(), p._version) for p in params)
        return (size, cache.max_len, cache.kv.dtype, torch.get_num_threads(), state)

    def _compiled_steps_for(self, cache: KVCache, build_full: bool) -> dict[int, CompiledDecodeStep] | None:
        """The compiled steps this cache decodes with, by batch size (None when its dtype or device is not the
        weights'): chosen at its first step among those in memory for these weights, cache length and thread count
        (each parameter's identity, storage and in-place version: the steps kept hold on to those storages, so no new
        weights can reuse their addresses), and dropped by ``KVCache.select``. ``build_full``: make sure the one for
        the whole cache is among them, compiling it (or loading it from the disk cache, keyed by the weights'
        bytes) if need be."""
        weights = cache.weights
        if cache.kv.dtype != weights.ln_f_weight.dtype or cache.kv.device.type != "cpu":
            return None
        if cache.compiled is None or (build_full and len(cache.lengths) not in cache.compiled):
            full = self._step_key(cache, len(cache.lengths))
            if build_full:
                self._load_compiled_step(full, weights)
            ready = {key[0]: value[0] for key, value in self._compiled_steps.items()  # (none wider than the cache)
                     if key[1:] == full[1:] and key[0] <= len(cache.lengths)}
            cache.compiled = ready
        return cache.compiled

    def _load_compiled_step(self, key: tuple, weights: DecodeWeights) -> None:
        """Compile (or load from the disk cache) the step of ``key`` into the steps kept in memory, which keep
        only those of the current weights."""
        if key in self._compiled_steps:
            return
        state = key[4]
        self._compiled_steps = {k: v for k, v in self._compiled_steps.items() if k[4] == state}  # same weights
        c = self.config
        step = compiled_decode_step(weights, c.n_head, c.layer_norm_epsilon, key[0], key[1])
        params = list(self.parameters())
        self._compiled_steps[key] = (step, params, [p.detach() for p in params])

    def prepare_compiled_decode(self, slots: int) -> list[int]:
        """Compile (or load) the decoding step for every batch size a continuous batch of ``slots`` slots steps
        with: 1, 2, 4, ... below ``slots``, and ``slots`` (a server's, before it takes requests, so that no request
        waits for a compilation; :meth:`set_decode_compiled` first). A batch then runs the smallest that spans its
        rows' slots. Returns the sizes."""
        if not self.decode_compiled:
            raise ConfigError("prepare_compiled_decode prepares --compile-decode's steps", "set_decode_compiled first")
        if slots < 1:
            raise ConfigError(f"a batch of {slots} slots holds nothing", "use at least 1 slot")
        sizes = compiled_batch_sizes(slots)
        cache = self.new_cache(1, self.transformer.wte.weight.device)
        for size in sizes:
            self._load_compiled_step(self._step_key(cache, size), cache.weights)
        return sizes

    def prefill_rows(self, idx: torch.Tensor, cache: KVCache, rows: list[int], valid: list[int]) -> torch.Tensor | None:
        """Logits (B, vocab) at the last real token of each right-padded prompt in idx (B, T) (``valid``:
        the real lengths), encoded into the empty cache slots ``rows``; None when the general
        ``forward`` is needed (training, int8 decode weights — a prompt is encoded at full precision —, a
        slot that is not empty, a prompt too long)."""
        weights = cache.weights
        if self.training or weights is None or isinstance(weights.head, Int8Linear) or \
                idx.size(1) > cache.max_len or any(cache.lengths[r] for r in rows):
            return None
        c = self.config
        device = idx.device
        with unoptimised_graphs():
            logits = scripted_prefill_rows()(idx, torch.tensor(rows, device=device), torch.tensor(valid, device=device),
                                             cache.layers, weights, c.n_head, c.layer_norm_epsilon)
        for r, n in zip(rows, valid, strict=True):
            cache.lengths[r] = n
        return logits

    def decode_weights(self) -> DecodeWeights:
        """Every weight the decoding steps need, looked up once per generation rather than per step.

        With :meth:`set_decode_weights` ("int8"), the matrices come as :class:`Int8Linear`, quantized
        once and kept until the weights change.
        """
        if self.decode_weight_format == "int8":
            key = tuple((p.data_ptr(), p._version) for p in self.parameters())
            if self._int8_cache is None or self._int8_cache[0] != key:
                self._int8_cache = (key, int8_weights(self._native_weights()))
            return self._int8_cache[1]
        return self._native_weights()

    def _native_weights(self) -> DecodeWeights:
        t = self.transformer

        def bias(module: nn.Module) -> torch.Tensor:  # zeros for a bias-free model: the step's maths stay one
            b = module.bias
            return b if b is not None else torch.zeros_like(module.weight[-1] if module.weight.dim() == 2
                                                            else module.weight)

        layers = [LayerWeights(b.ln_1.weight, bias(b.ln_1), b.attn.c_attn.weight, bias(b.attn.c_attn),
                               b.attn.c_proj.weight, bias(b.attn.c_proj), b.ln_2.weight, bias(b.ln_2),
                               b.mlp.c_fc.weight, bias(b.mlp.c_fc), b.mlp.c_proj.weight, bias(b.mlp.c_proj))
                  for b in t.h]
        return DecodeWeights(t.wte.weight, t.wpe.weight, t.ln_f.weight, bias(t.ln_f), self.lm_head.weight, layers,
                             self.config.activation == "gelu")

    def set_decode_weights(self, fmt: str) -> None:
        """``"native"`` (the model's own dtype) or ``"int8"`` (int8 matrices for token-by-token decoding on a
        CPU; the prompt is still encoded at full precision)."""
        if fmt not in DECODE_WEIGHTS:
            raise ConfigError(f"decode weights {fmt!r} are not supported", "use native or int8")
        if fmt == "int8" and self.transformer.wte.weight.device.type != "cpu":
            raise ConfigError("int8 decode weights run on a CPU (PyTorch's quantized kernels)",
                              "use native decode weights on this device")
        if fmt == "int8" and self.decode_compiled:
            raise ConfigError("--compile-decode compiles the native-weight step, not the int8 one",
                              "choose one of --compile-decode and --decode-weights int8")
        self.decode_weight_format = fmt

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickling) leaves the compiled steps behind: they are loaded libraries, and
        made again (from the disk cache) at the copy's first generation."""
        return {**super().__getstate__(), "_compiled_steps": {}}

    def set_decode_compiled(self, enabled: bool = True) -> None:
        """Decode with the step compiled ahead of time (:mod:`glmlab.models.gpt_aot`; a C++ compiler, seconds to a
        minute at the first generation per batch size, then cached on disk), on a CPU, native weights. A step runs
        the rows of the smallest compiled batch that spans them, at any positions (a generation's rows after some
        ended included); repeated rows (beams that have not been reordered yet) and the first and last positions of
        the cache run the scripted steps. :meth:`prepare_compiled_decode` compiles the smaller batch sizes a
        server's continuous batch uses."""
        if enabled and self.transformer.wte.weight.device.type != "cpu":
            raise ConfigError("--compile-decode compiles a CPU step", "drop --compile-decode on this device")
        if enabled and self.decode_weight_format == "int8":
            raise ConfigError("--compile-decode compiles the native-weight step, not the int8 one",
                              "choose one of --compile-decode and --decode-weights int8")
        self.decode_compiled = enabled

    def _cache_step(self, cache: KVCache, rows: list[int] | None, B: int, T: int,
                    device: torch.device) -> KVCacheStep:
        slots = list(range(B)) if rows is None else list(rows)
        starts = [cache.lengths[s] for s in slots]
        span = max(starts) + T
        if span > cache.max_len:
            raise ValueError(f"sequence of {span} tokens exceeds block_size {self.config.block_size}")
        offsets = torch.arange(T, dtype=torch.long, device=device)
        uniform = all(s == starts[0] for s in starts)
        rows_t = None if rows is None else torch.tensor(slots, device=device)
        if uniform:
            start: int | None = starts[0]
            positions = (offsets + starts[0])[None].expand(B, T)
            if T == 1:  # one new query per row: it may see every cached key
                return KVCacheStep(cache, rows_t, start, positions, span, None, False)
            if start == 0:  # a fresh prefill: plain causal attention
                return KVCacheStep(cache, rows_t, start, positions, span, None, True)
        else:
            start = None
            positions = torch.tensor(starts, device=device)[:, None] + offsets
        mask = (torch.arange(span, device=device)[None, None, :] <= positions[:, :, None])[:, None]
        return KVCacheStep(cache, rows_t, start, positions, span, mask, False)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over targets ``y`` (positions with -100 are ignored)."""
        logits = self(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood (nats) of the targets ``y``; -100 marks unscored positions."""
        logits = self(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                               reduction="sum")

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        dtype = dtype or self.transformer.wte.weight.dtype
        cache = KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype)
        cache.weights = self.decode_weights()
        return cache
