"""Family `glm`: autoregressive blank infilling (Du et al., 2022, "GLM: General Language Model Pretraining with
Autoregressive Blank Infilling") — one model that reads bidirectionally and writes left to right.

A training window is corrupted into two parts. **Part A** is the text with spans replaced by a blank token,
read bidirectionally; **Part B** holds the spans, shuffled, each opened by ``<|startofpiece|>`` and written left
to right (closed by ``<|endofpiece|>``) while attending to all of Part A and to the pieces before it. Positions
are 2-D: a token's place in Part A (a piece's tokens take their blank's), and its place inside its piece (0 in
Part A). Three objectives, mixed per window by ``model.*_weight``: spans (Poisson λ = 3 lengths until 15% of the
tokens are blanked, ``[MASK]``), sentences (whole sentences covering 15%, ``[sMASK]``) and the document (one
suffix of 50-100% of the window, ``[gMASK]``). GLM's own code draws one objective per batch instead; measured
on WikiText-2 (2 x 128, 300 steps, seed 7), per-batch draws gave 6.06 nats per token infilling and 6.02 left to
right against 5.88 and 5.74 per window (benchmarks/README.md), so each window draws its own.

Read with the blank at the end and nothing before it (Part A = ``[gMASK]``), Part B is a left-to-right language
model: ``forward(idx)`` gives next-token logits as a `gpt`'s does, and with a cache the engine decodes it token
by token. A prompt framed as Part A + ``<|startofpiece|>`` (:func:`frame`) is read bidirectionally and the piece
written after it: that is how glm continues a text and fills a blank between a prefix and a suffix. :meth:`GLM.nll`
scores each window's targets as one piece after the context it may see (Part A), so ``glmlab eval`` reports an
exact NLL on the same accounting as a `gpt`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmlab.data.tokenizer import BLANKS, EOP_ID, FIRST_TEXT_ID, GMASK_ID, MASK_ID, PAD_ID, SMASK_ID, SOP_ID, Tokenizer
from glmlab.errors import ConfigError, GlmlabError
from glmlab.models.contract import FamilyModel, Traits
from glmlab.models.gpt import KVCache, KVCacheStep
from glmlab.models.transformer import Block, BlockShape
from glmlab.schema import field

ADAPTER_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FRAME = 2  # tokens a left-to-right reading adds before the text: [gMASK] <|startofpiece|>


@dataclass
class GLMConfig:
    """Shape and objectives of a `glm` model (``model.*`` keys)."""

    family: str = field("glm", "model family")
    vocab_size: int = field(0, "vocabulary size; 0 = take it from the data's tokenizer", min=0)
    block_size: int = field(256, "context length in text tokens (Part A and Part B add up to block_size + 2)",
                            min=2)
    n_layer: int = field(6, "Transformer blocks", min=1)
    n_head: int = field(6, "attention heads per block (must divide n_embd)", min=1)
    n_embd: int = field(384, "embedding width", min=1)
    dropout: float = field(0.2, "dropout on embeddings, attention and residual branches", min=0.0, max=0.99)
    bias: bool = field(True, "biases in linear layers and LayerNorms")
    layer_norm_epsilon: float = field(1e-5, "LayerNorm epsilon", min=0.0)
    mask_ratio: float = field(0.15, "share of a window's tokens blanked by the span and sentence objectives",
                              min=0.01, max=0.9)
    span_lambda: float = field(3.0, "mean span length of the span objective (Poisson λ)", min=0.1)
    span_weight: float = field(0.5, "weight of the span objective ([MASK]) in the mix", min=0.0)
    sentence_weight: float = field(0.0, "weight of the sentence objective ([sMASK]: whole sentences)", min=0.0)
    document_weight: float = field(0.5, "weight of the document objective ([gMASK]: one suffix of 50-100%)",
                                   min=0.0)

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                              "choose n_embd a multiple of n_head, e.g. n_embd=384 with n_head=6")
        if self.span_weight + self.sentence_weight + self.document_weight <= 0:
            raise ConfigError("model.span_weight, sentence_weight and document_weight are all 0",
                              "give at least one objective a positive weight (GLM: span 0.5, document 0.5)")

    def block_shape(self) -> BlockShape:
        return BlockShape(self.n_embd, self.n_head, self.dropout, self.bias, self.layer_norm_epsilon)


@dataclass
class Layout:
    """One row in GLM's layout: Part A then Part B, with 2-D positions and the targets of Part B."""

    tokens: list[int]
    positions: list[int]
    piece_positions: list[int]
    targets: list[int]  # -100 where nothing is predicted (Part A)
    part_a: int  # tokens in Part A


def piece_layout(part_a: list[int], pieces: list[tuple[int, list[int]]]) -> Layout:
    """Part A followed by each piece ``(blank position in Part A, tokens)``, opened by ``<|startofpiece|>`` and
    trained to end with ``<|endofpiece|>``."""
    tokens, positions, piece_positions, targets = list(part_a), list(range(len(part_a))), [0] * len(part_a), \
        [-100] * len(part_a)
    for blank, piece in pieces:
        tokens += [SOP_ID, *piece]
        positions += [blank] * (len(piece) + 1)
        piece_positions += list(range(1, len(piece) + 2))
        targets += [*piece, EOP_ID]
    return Layout(tokens, positions, piece_positions, targets, len(part_a))


class GLMCache(KVCache):
    """A KV cache whose slots also remember their Part A: its length, the blank its piece fills and how far
    the piece has got (the 2-D positions of the next token)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n = len(self.lengths)
        self.part_a, self.blank, self.piece = [0] * n, [0] * n, [0] * n

    def select(self, rows: list[int]) -> None:
        super().select(rows)
        self.part_a, self.blank, self.piece = ([m[r] for r in rows] for m in (self.part_a, self.blank, self.piece))

    def reset_row(self, row: int) -> None:
        super().reset_row(row)
        self.part_a[row] = self.blank[row] = self.piece[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        super().move_row(src, dst)
        for m in (self.part_a, self.blank, self.piece):
            m[dst], m[src] = m[src], 0


def frame(part_a: list[int]) -> list[int]:
    """The prompt that makes glm write the piece of Part A's last blank: Part A, then ``<|startofpiece|>``."""
    if not any(t in BLANKS for t in part_a):
        raise GlmlabError("a glm prompt's Part A has no blank to fill", "end it with [gMASK], or put a [MASK] in it")
    return [*part_a, SOP_ID]


def sentence_ends(tokenizer: Tokenizer) -> torch.Tensor:
    """(vocab,) True for tokens that end a sentence (their text ends with . ! ? or a line break; ``<eos>``)."""
    ends = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    if tokenizer.eos_id is not None:
        ends[tokenizer.eos_id] = True
    for i in range(FIRST_TEXT_ID, tokenizer.vocab_size):
        text = tokenizer.decode([i]).rstrip(" ")
        ends[i] = bool(text) and text[-1] in ".!?\n"
    return ends


class GLM(FamilyModel):
    """The `glm` family. ``forward(idx)`` reads ``idx`` as a piece after an empty Part A (next-token logits);
    a prompt that holds ``<|startofpiece|>`` is read as Part A and the piece it opens."""

    host_work = ("_corrupted", "_layout_tensors")

    def __init__(self, config: GLMConfig) -> None:
        if config.vocab_size <= 0:
            raise ConfigError("model.vocab_size is not set", "build the model from a data directory's tokenizer")
        super().__init__(config)
        length = config.block_size + FRAME
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(length, config.n_embd),  # the position in Part A
            wbpe=nn.Embedding(length, config.n_embd),  # the position inside a piece (0 in Part A)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config.block_shape(), i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / (2 * config.n_layer) ** 0.5)
        self.register_buffer("sentence_end", torch.zeros(config.vocab_size, dtype=torch.bool), persistent=False)

    @classmethod
    def declare(cls, config: GLMConfig) -> Traits:
        return Traits(family="glm", feature_width=config.n_embd, adapter_targets=ADAPTER_TARGETS,
                      special_tokens=("pad", "mask", "smask", "gmask", "sop", "eop"),
                      objective="blank_infilling", infilling="blank")

    def read_vocabulary(self, tokenizer: Tokenizer) -> None:
        """Which tokens end a sentence (the sentence objective needs it; nothing is saved)."""
        self.sentence_end.copy_(sentence_ends(tokenizer)[: self.config.vocab_size])

    # --- the forward pass -----------------------------------------------------------------------------

    def _hidden(self, idx: torch.Tensor, positions: torch.Tensor, pieces: torch.Tensor,
                mask: torch.Tensor | None, step: KVCacheStep | None = None) -> torch.Tensor:
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(positions) + t.wbpe(pieces))
        for block in t.h:
            x = block(x, step, mask)
        return t.ln_f(x)

    def _left_to_right(self, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, C) of ``idx`` read as one piece after Part A = ``[gMASK]``: plain causal attention
        (the one Part A token is before every query)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        framed = torch.cat([idx.new_tensor([GMASK_ID, SOP_ID]).expand(B, FRAME), idx], dim=1)
        positions = torch.zeros_like(framed)  # the piece fills the blank at position 0
        pieces = torch.arange(T + FRAME, device=idx.device)[None].expand(B, -1)  # [gMASK] 0, then 1, 2, ...
        return self._hidden(framed, positions, pieces, None)[:, FRAME:]  # no mask: causal

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        return self._left_to_right(idx)

    def features_to_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def layout_logits(self, rows: list[Layout]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, vocab) and targets (B, L) of rows in GLM's layout, right-padded."""
        idx, positions, pieces, part_a, targets = self._layout_tensors(rows)
        return self._layout_forward(idx, positions, pieces, part_a), targets

    def _layout_tensors(self, rows: list[Layout]) -> tuple[torch.Tensor, ...]:
        """Rows in GLM's layout as right-padded tensors on the model's device: tokens, positions, piece positions,
        Part A's lengths and targets. Host work from Python lists (``host_work``: eager under torch.compile)."""
        device = self.lm_head.weight.device
        L = max(len(r.tokens) for r in rows)

        def padded(name: str, fill: int) -> torch.Tensor:
            return torch.tensor([getattr(r, name) + [fill] * (L - len(r.tokens)) for r in rows], device=device)

        part_a = torch.tensor([r.part_a for r in rows], device=device)
        return padded("tokens", PAD_ID), padded("positions", 0), padded("piece_positions", 0), part_a, \
            padded("targets", -100)

    def _layout_forward(self, idx: torch.Tensor, positions: torch.Tensor, pieces: torch.Tensor,
                        part_a: torch.Tensor) -> torch.Tensor:
        """Logits of padded layout tensors: Part A attends to itself both ways, Part B to Part A and causally."""
        j = torch.arange(idx.size(1), device=idx.device)
        mask = (j[None, None, :] < part_a[:, None, None]) | (j[None, None, :] <= j[None, :, None])  # (B, L, L)
        return self.lm_head(self._hidden(idx, positions, pieces, mask[:, None]))

    def blank_logits(self, idx: torch.Tensor, blank_at: list[int] | None = None) -> torch.Tensor:
        """Logits (B, vocab) of the first token of the piece for the last blank of each right-padded row (read
        as Part A): a cloze's answer. ``blank_at``: the blank to fill in each row, by position, instead of the last
        (the other blanks stay in Part A)."""
        rows = []
        for row, ids in enumerate(idx.tolist()):
            while ids and ids[-1] == PAD_ID:
                ids.pop()
            blanks = [i for i, t in enumerate(ids) if t in BLANKS]
            if not blanks:
                raise GlmlabError("a row has no blank to fill", "put [MASK] in the text (a cloze pattern needs one)")
            if blank_at is not None and blank_at[row] not in blanks:
                raise ValueError(f"position {blank_at[row]} of row {row} holds no blank")
            rows.append(piece_layout(ids, [(blanks[-1] if blank_at is None else blank_at[row], [])]))
        logits, _ = self.layout_logits(rows)
        at = torch.tensor([r.part_a for r in rows], device=logits.device)  # <|startofpiece|>
        return logits[torch.arange(len(rows), device=logits.device), at]

    def forward(self, idx: torch.Tensor, cache: GLMCache | None = None, rows: list[int] | None = None,
                valid: list[int] | None = None, last_only: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, vocab). Without a cache, ``idx`` is read left to right (one piece after an
        empty Part A). With one, a row that starts an empty slot is read as Part A + a piece when it holds
        ``<|startofpiece|>`` (Part A ends at the first: the piece of Part A's last blank), else left to right; a row
        that continues its slot continues its piece."""
        if cache is None:
            logits = self.lm_head(self._left_to_right(idx))
            return logits[:, -1:] if last_only else logits
        return self._cached(idx, cache, rows, valid, last_only)

    def _cached(self, idx: torch.Tensor, cache: GLMCache, rows: list[int] | None, valid: list[int] | None,
                last_only: bool) -> torch.Tensor:
        B, T = idx.size()
        device = idx.device
        slots = list(range(B)) if rows is None else list(rows)
        lengths = valid if valid is not None else [T] * B
        seqs, positions, pieces, offsets, starts = [], [], [], [], []
        for r, slot in enumerate(slots):
            tokens = idx[r, :lengths[r]].tolist()
            start = cache.lengths[slot]
            offset = 0
            if start == 0:
                if SOP_ID in tokens:
                    a = tokens.index(SOP_ID)  # Part A holds none: a piece may (a random model writes anything)
                    blanks = [i for i, t in enumerate(tokens[:a]) if t in BLANKS]
                    if not blanks:
                        raise GlmlabError("a glm prompt's Part A has no blank to fill",
                                          "end it with [gMASK], or put a [MASK] in it")
                    cache.part_a[slot], cache.blank[slot] = a, blanks[-1]
                else:  # left to right: Part A = [gMASK]
                    tokens, a, offset = [GMASK_ID, SOP_ID, *tokens], 1, FRAME
                    cache.part_a[slot], cache.blank[slot] = 1, 0
                in_a = list(range(a))
                n_b = len(tokens) - a
                positions.append(in_a + [cache.blank[slot]] * n_b)
                pieces.append([0] * a + list(range(1, n_b + 1)))
                cache.piece[slot] = n_b
            else:
                n_b = len(tokens)
                positions.append([cache.blank[slot]] * n_b)
                pieces.append(list(range(cache.piece[slot] + 1, cache.piece[slot] + n_b + 1)))
                cache.piece[slot] += n_b
            seqs.append(tokens)
            offsets.append(offset)
            starts.append(start)
        m = max(len(s) for s in seqs)
        span = max(s + len(q) for s, q in zip(starts, seqs, strict=True))
        if max(starts) + m > cache.max_len or span > cache.max_len:
            raise ValueError(f"sequence of {max(starts) + m} tokens exceeds the context of {cache.max_len}")
        pad = [m - len(s) for s in seqs]
        tokens_t = torch.tensor([s + [PAD_ID] * p for s, p in zip(seqs, pad, strict=True)], device=device)
        pos_t = torch.tensor([q + [0] * p for q, p in zip(positions, pad, strict=True)], device=device)
        piece_t = torch.tensor([q + [0] * p for q, p in zip(pieces, pad, strict=True)], device=device)
        starts_t = torch.tensor(starts, device=device)
        where = starts_t[:, None] + torch.arange(m, device=device)  # (B, m) cache indices
        real_end = starts_t + torch.tensor([len(s) for s in seqs], device=device)
        part_a = torch.tensor([cache.part_a[s] for s in slots], device=device)
        j = torch.arange(span, device=device)[None, None, :]
        mask = (j < real_end[:, None, None]) & ((j < part_a[:, None, None]) | (j <= where[:, :, None]))
        mask = mask | (j == 0)  # a padded query still sees something (its output is dropped)
        step = KVCacheStep(cache, torch.tensor(slots, device=device), None, where, span, mask[:, None], False)
        h = self._hidden(tokens_t, pos_t, piece_t, None, step)
        for slot, s in zip(slots, seqs, strict=True):
            cache.lengths[slot] += len(s)
        offsets_t = torch.tensor(offsets, device=device)
        if last_only:
            last = offsets_t + torch.tensor(lengths, device=device) - 1
            return self.lm_head(h[torch.arange(B, device=device), last][:, None])
        gather = (offsets_t[:, None] + torch.arange(T, device=device)).clamp(max=m - 1)
        return self.lm_head(h[torch.arange(B, device=device)[:, None], gather])

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype | None = None) -> GLMCache:
        c = self.config
        dtype = dtype or self.transformer.wte.weight.dtype
        return GLMCache(c.n_layer, batch_size, c.n_head, c.block_size + FRAME, c.n_embd // c.n_head, device, dtype)

    # --- training: the blank-infilling objectives ----------------------------------------------------------

    def corrupt(self, text: list[int], generator: torch.Generator | None = None) -> Layout:
        """One window in GLM's layout under an objective drawn by the weights (from ``generator``; the global
        one by default, which checkpoints save). The layout is at most ``block_size + 2`` tokens: text that does
        not fit after the blanks' extra tokens is left out."""
        c = self.config
        weights = torch.tensor([c.span_weight, c.sentence_weight, c.document_weight])
        objective = int(torch.multinomial(weights, 1, generator=generator))
        budget = c.block_size + FRAME
        if objective == 1:
            layout = self._sentences(text, budget, generator)
            if layout is not None:
                return layout
        if objective == 2:
            return self._document(text, budget, generator)
        return self._spans(text, budget, generator)

    def _document(self, text: list[int], budget: int, generator: torch.Generator | None) -> Layout:
        text = text[: budget - FRAME]
        n = len(text)
        low = max(1, (n + 1) // 2)
        length = int(torch.randint(low, n + 1, (1,), generator=generator))
        prefix = text[: n - length]
        return piece_layout([*prefix, GMASK_ID], [(len(prefix), text[n - length:])])

    def _spans(self, text: list[int], budget: int, generator: torch.Generator | None) -> Layout:
        c = self.config
        lengths: list[int] = []
        while True:
            room = min(len(text), budget - 2 * len(lengths))
            if lengths and sum(lengths) >= c.mask_ratio * room:
                break
            draw = int(torch.poisson(torch.tensor([c.span_lambda]), generator=generator))
            lengths.append(max(1, draw))
        room = min(len(text), budget - 2 * len(lengths))
        while sum(lengths) + len(lengths) > room and len(lengths) > 1:  # keep a gap before each span
            lengths.pop()
        lengths[-1] = max(1, min(lengths[-1], room - len(lengths) - sum(lengths[:-1])))
        text = text[:room]
        free = room - sum(lengths)
        gaps = sorted(torch.randperm(free + 1, generator=generator)[: len(lengths)].tolist())
        part_a, pieces, cursor, consumed = [], [], 0, 0
        for gap, length in zip(gaps, lengths, strict=True):
            begin = gap + consumed
            part_a += text[cursor:begin]
            pieces.append((len(part_a), text[begin:begin + length]))
            part_a.append(MASK_ID)
            cursor, consumed = begin + length, consumed + length
        part_a += text[cursor:]
        order = torch.randperm(len(pieces), generator=generator).tolist()  # GLM shuffles the pieces
        return piece_layout(part_a, [pieces[i] for i in order])

    def _sentences(self, text: list[int], budget: int, generator: torch.Generator | None) -> Layout | None:
        """Whole sentences blanked with ``[sMASK]`` until ``mask_ratio`` of the text is; None if the window holds
        fewer than two sentence ends."""
        ends = [i + 1 for i, t in enumerate(text) if bool(self.sentence_end[t])]
        bounds = [0, *ends] if ends and ends[-1] == len(text) else [0, *ends, len(text)]
        sentences = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        if len(sentences) < 2:
            return None
        chosen: list[tuple[int, int]] = []
        for i in torch.randperm(len(sentences), generator=generator).tolist():
            room = min(len(text), budget - 2 * (len(chosen) + 1))
            a, b = sentences[i]
            if b > room or sum(e - s for s, e in chosen) + (b - a) >= room:
                continue
            chosen.append((a, b))
            if sum(e - s for s, e in chosen) >= self.config.mask_ratio * room:
                break
        if not chosen:
            return None
        room = min(len(text), budget - 2 * len(chosen))
        text = text[:room]
        part_a, pieces, cursor = [], [], 0
        for a, b in sorted(chosen):
            part_a += text[cursor:a]
            pieces.append((len(part_a), text[a:b]))
            part_a.append(SMASK_ID)
            cursor = b
        part_a += text[cursor:]
        order = torch.randperm(len(pieces), generator=generator).tolist()
        return piece_layout(part_a, [pieces[i] for i in order])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the pieces of each window (``x`` then ``y``'s last token), corrupted by the
        objectives; padding of a sentence batch (``<pad>`` / -100) is left out of the text."""
        idx, positions, pieces, part_a, targets = self._corrupted(x, y)
        logits = self._layout_forward(idx, positions, pieces, part_a)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)

    def _corrupted(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The windows corrupted row by row in Python, as layout tensors (``host_work``: under torch.compile the
        draws and the layout stay eager, their branches differ per batch; only the forward pass is compiled)."""
        texts = torch.cat([x, y[:, -1:].clamp(min=0)], dim=1).tolist()
        real = torch.cat([torch.ones_like(x[:, :1], dtype=torch.bool), y != -100], dim=1).tolist()
        return self._layout_tensors([self.corrupt([t for t, r in zip(row, keep, strict=True) if r])
                                     for row, keep in zip(texts, real, strict=True)])

    # --- scoring: an exact NLL ------------------------------------------------------------------------

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed NLL (nats) of the targets ``y``: each row's scored targets are one piece written after Part A =
        the tokens before them (the context its window gives, read bidirectionally) and ``[gMASK]``; the piece's
        closing ``<|endofpiece|>`` is not scored, so the accounting is a `gpt`'s."""
        rows = []
        for xr, yr in zip(x.tolist(), y.tolist(), strict=True):
            scored = [i for i, t in enumerate(yr) if t != -100]
            if not scored:
                continue
            s = scored[0]
            inputs = [t if t != -100 else PAD_ID for t in yr[s:-1]]
            layout = piece_layout([*xr[: s + 1], GMASK_ID], [(s + 1, inputs)])
            layout.targets = [-100] * layout.part_a + yr[s:]  # the window's targets, not <|endofpiece|>
            rows.append(layout)
        if not rows:
            return torch.zeros((), device=x.device)
        logits, targets = self.layout_logits(rows)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100,
                               reduction="sum")
