"""Structured output: decoding constrained token by token to a JSON schema, any JSON object or a GBNF grammar
(llama.cpp's format), with llguidance (Microsoft's Rust grammar engine: exact masks, no dependencies, a few
microseconds per token; see benchmarks/README.md for why it was chosen and what it costs).

A :class:`Grammar` (kind and source) rides on :class:`~glmlab.generation.settings.GenerationSettings`; each
row decoding under it holds a :class:`RowGrammar`, which masks the tokens the grammar does not allow next and
ends the row when the grammar is complete. JSON is compact (no free whitespace, which a small model would
otherwise write forever) and an object schema admits only the properties it names (OpenAI's strict mode).

Tokenizers: byte-level BPE (glmlab's, or an imported GPT-2's) and char tokenizers; a word tokenizer's tokens do
not concatenate to its text, so it is refused. A tokenizer that cannot spell what a grammar needs (a char
tokenizer trained on text without ``{``) is refused when the grammar is compiled, or, when that only shows
later, the row ends with an error that says so.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError

KINDS = ("json_object", "json_schema", "gbnf")
COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """What the output must follow: ``kind`` "json_object" (any JSON object), "json_schema" (``source``: the
    schema as JSON text) or "gbnf" (``source``: a llama.cpp GBNF grammar whose start rule is ``root``)."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GlmlabError(f"unknown grammar kind {self.kind!r}", f"use one of: {', '.join(KINDS)}")


class GrammarError(GlmlabError):
    """A grammar that cannot be compiled, or that this tokenizer cannot write."""


def strict_schema(schema: Any) -> Any:
    """``additionalProperties: false`` on every object schema that does not say otherwise (OpenAI's strict
    mode): a free model would otherwise keep adding properties."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


class Compiler:
    """llguidance's view of one tokenizer at one model vocabulary, and the grammars compiled for it (cached:
    each row takes a copy of a compiled matcher, about a microsecond)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import llguidance as llg  # not llguidance.torch: it compiles kernels at import

        self.llg, self.tokenizer, self.vocab_size = llg, tokenizer, vocab_size
        if tokenizer.kind == "bpe":
            self.lltok = llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id)
        elif tokenizer.kind == "char":
            self.lltok = llg.LLTokenizer(llg.TokenizerWrapper(_CharTokens(tokenizer, vocab_size)),
                                         eos_token=tokenizer.eos_id)
        else:
            raise GrammarError(f"structured output needs a char or bpe tokenizer; this run's is {tokenizer.kind} "
                               "(its tokens do not join into its text)", "prepare the data with --tokenizer bpe")
        self._lock = threading.Lock()
        self._compiled: dict[Grammar, Any] = {}

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh matcher for ``grammar`` (compiled once)."""
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is None:
                pristine = self._compiled[grammar] = self._compile(grammar)
                if len(self._compiled) > 256:
                    self._compiled.pop(next(iter(self._compiled)))
            return pristine.deep_copy()

    def _compile(self, grammar: Grammar) -> Any:
        llg = self.llg
        try:
            if grammar.kind == "json_object":
                text = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=COMPACT)
            elif grammar.kind == "json_schema":
                text = llg.LLMatcher.grammar_from_json_schema(strict_schema(json.loads(grammar.source)),
                                                              overrides=COMPACT)
            else:
                text = llg.grammar_from("gbnf", grammar.source)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise GrammarError(f"the {grammar.kind} cannot be compiled: {_first_line(exc)}") from None
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.lltok)
        if failed:
            raise GrammarError(f"the {grammar.kind} cannot be compiled: {_first_line(messages[0])}")
        matcher = llg.LLMatcher(self.lltok, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the {grammar.kind} cannot be compiled: {_first_line(matcher.get_error())}")
        allowed = _allowed(matcher, self.vocab_size)
        allowed[self.tokenizer.eos_id] = False
        if not allowed.any():
            if matcher.is_accepting() or self.tokenizer.kind == "bpe":  # a byte-level BPE spells any text
                raise GrammarError(f"the {grammar.kind} allows no output but the empty one (or none at all)",
                                   "give a grammar whose start rule produces some text")
            raise GrammarError(f"this run's {self.tokenizer.kind} tokenizer cannot write the start of what the "
                               f"{grammar.kind} asks for",
                               "prepare the data with --tokenizer bpe, which spells any text")
        return matcher


@functools.lru_cache(maxsize=8)
def compiler(tokenizer: Tokenizer, vocab_size: int) -> Compiler:
    """The compiler of a tokenizer at a model's vocabulary size (built once: a 50k vocabulary takes 0.3 s)."""
    return Compiler(tokenizer, vocab_size)


class _CharTokens:
    """A char tokenizer as llguidance's ``TokenizerWrapper`` reads it: each token's bytes (special tokens and
    ids past the tokenizer, marked special, are never allowed) and an exact encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        pieces = tokenizer.pieces or []
        special = {i for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)
                   if i is not None} | set(range(len(pieces), vocab_size))
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, None
        self.special_token_ids = sorted(special)
        self.tokens = [b"\xff<[%d]>" % i if i in special else pieces[i].encode("utf-8") for i in range(vocab_size)]
        self._ids = {p: i for i, p in enumerate(pieces) if i not in special and p}

    def __call__(self, text: str | bytes) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return [self._ids[c] for c in text]  # a character it cannot encode fails (never <unk>)


class RowGrammar:
    """One row's place in its grammar."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.matcher = compiler(tokenizer, vocab_size).matcher(grammar)
        self.kind = grammar.kind
        self.error: str | None = None

    def allowed(self, vocab: int) -> np.ndarray:
        """Which of ``vocab`` token ids the grammar allows next (bool array)."""
        return _allowed(self.matcher, vocab)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; True when the grammar is complete (nothing but the end can follow)."""
        if not self.matcher.consume_token(token):
            self.error = f"the output left the {self.kind}: {_first_line(self.matcher.get_error())}"
            return True
        return self.matcher.is_stopped()


def constrain(logits: torch.Tensor, grammars: list[RowGrammar | None], eos_id: int) -> torch.Tensor:
    """``logits`` (B, V) with every token a row's grammar forbids at -inf (a copy; rows without a grammar are
    left alone). A row whose grammar allows nothing this tokenizer can write gets an error and only ``<eos>``."""
    rows = [(i, g) for i, g in enumerate(grammars) if g is not None]
    vocab = logits.size(-1)
    words = np.zeros((len(rows), (vocab + 31) // 32), dtype=np.int32)  # llguidance's bitmasks, one row each
    for k, (_, g) in enumerate(rows):
        g.matcher.unsafe_compute_mask_ptr(words[k].ctypes.data, words.shape[1] * 4)
        if g.matcher.is_error() or not words[k].any():
            why = _first_line(g.matcher.get_error()) if g.matcher.is_error() else "no token fits"
            g.error = g.error or f"this run's tokenizer cannot write anything the {g.kind} allows next ({why})"
            words[k] = 0
            words[k, eos_id // 32] = np.int32(np.uint32(1 << (eos_id % 32)).view(np.int32))
    forbidden = np.unpackbits((~words).view(np.uint8), axis=-1, count=vocab, bitorder="little").view(bool)
    forbidden = torch.from_numpy(forbidden).to(logits.device)
    if len(rows) == len(grammars):
        return logits.masked_fill(forbidden, float("-inf"))
    out = logits.clone()
    for k, (i, _) in enumerate(rows):
        out[i].masked_fill_(forbidden[k], float("-inf"))
    return out


def _allowed(matcher: Any, vocab: int) -> np.ndarray:
    words = (vocab + 31) // 32
    mask = np.zeros(words, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, words * 4)
    return np.unpackbits(mask.view(np.uint8), count=vocab, bitorder="little").view(bool)


def _first_line(value: Any) -> str:
    return str(value).strip().splitlines()[0] if str(value).strip() else "unknown error"
