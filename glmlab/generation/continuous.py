"""The decoding loop: rows join a running batch between steps and leave it when they finish.

Every generation path runs it: ``generate_batch`` and ``stream`` admit all their rows at once and step until
they are done; the server's scheduler admits requests as slots free up. A fixed number of cache slots is
allocated once; a new row is prefilled into a free slot, every active row advances one token per
:meth:`ContinuousBatch.step`, and a finished or cancelled row frees its slot (``reset_row``: nothing is
copied). Rows keep the engine's per-row settings, generators and incremental text
(:class:`~glmlab.generation.engine.Row`), so a row's tokens are the same whatever else is in the batch, and
whenever it joined.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import Completion, Controls, Row, TokenLogprob, context_tail, next_tokens
from glmlab.generation.infill import end_id, slides
from glmlab.generation.settings import GenerationSettings


@dataclass(slots=True)
class RowEvent:
    """What one row did in one step: new text, new tokens (and their log-probabilities), and, on its
    last step, the finished :class:`Completion`."""

    key: Hashable
    delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion: Completion | None = None


class _Slot:
    """An active row and where it lives: its cache slot and the logits of its next token."""

    __slots__ = ("key", "row", "slot", "started")

    def __init__(self, key: Hashable, row: Row, slot: int) -> None:
        self.key, self.row, self.slot = key, row, slot
        self.started = False  # prefilled


class ContinuousBatch:
    """A running batch of at most ``slots`` rows over one preallocated cache.

    :meth:`add` reserves a slot (the row is prefilled at the next step), :meth:`cancel` frees one,
    :meth:`step` advances every row by one token. ``deltas``: every row keeps its text for streaming (rows with
    stop strings always do). Not thread-safe: one thread owns it (and the model).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, slots: int, deltas: bool = True) -> None:
        if slots < 1:
            raise GlmlabError(f"a batch of {slots} slots holds nothing", "use at least 1 slot")
        self.model, self.tokenizer, self.capacity, self.deltas = model, tokenizer, slots, deltas
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(slots, self.device)
        self.end_id = end_id(model, tokenizer)  # <eos>, or a glm piece's <|endofpiece|>
        self._fast_prefill = "prefill_rows" in model.traits.fast_paths
        self._fast_decode = "decode_rows" in model.traits.fast_paths
        self._free = list(range(slots - 1, -1, -1))  # a stack: the lowest slot is reused first
        self._active: list[_Slot] = []  # in the order of self._logits' rows
        self._waiting: list[_Slot] = []  # added, not yet prefilled
        self._logits: torch.Tensor | None = None
        self._by_key: dict[Hashable, _Slot] = {}
        self._roster: tuple[list[Row], Controls] | None = None  # the active rows and their controls

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def busy(self) -> bool:
        """Whether any row is in the batch (active, or waiting for its prefill)."""
        return bool(self._by_key)

    @property
    def slots_in_use(self) -> list[int]:
        """The cache slots the rows in the batch hold, in order (0..n-1 once finished rows' slots are reused)."""
        return sorted(e.slot for e in self._by_key.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def add(self, key: Hashable, prompt_ids: list[int], settings: GenerationSettings, index: int = 0) -> None:
        """Reserve a slot for a row (``index``: its sample index, which seeds its generator with the
        settings' seed); it is prefilled, and makes its first token, at the next :meth:`step`."""
        if not self._free:
            raise GlmlabError("every slot of the batch is taken", "wait for a row to finish")
        if key in self._by_key:
            raise GlmlabError(f"row {key!r} is already in the batch", "give each row its own key")
        if not prompt_ids:
            raise GlmlabError("an empty prompt has nothing to continue", "encode it with encode_prompt")
        sliding = slides(self.model, prompt_ids)
        limit = self.model.block_size if sliding else self.cache.max_len
        if len(prompt_ids) >= limit and limit > 1:
            raise GlmlabError(f"a prompt of {len(prompt_ids)} tokens does not fit the context of {limit}",
                              "cut it with encode_prompt")
        row = Row(prompt_ids, settings, index, self.tokenizer, self.device, self.deltas, self.model.vocab_size)
        row.slides = sliding
        if not sliding:  # it ends when its context is full
            row.max_new_tokens = min(row.max_new_tokens, self.cache.max_len - len(prompt_ids))
        entry = _Slot(key, row, self._free.pop())
        self._by_key[key] = entry
        self._waiting.append(entry)

    def cancel(self, key: Hashable) -> bool:
        """Drop a row now and free its slot; False if it is not in the batch."""
        entry = self._by_key.pop(key, None)
        if entry is None:
            return False
        if entry.started:
            keep = [i for i, e in enumerate(self._active) if e is not entry]
            self._active = [self._active[i] for i in keep]
            if self._logits is not None:
                self._logits = self._logits[keep] if keep else None
            self._roster = None
        else:
            self._waiting.remove(entry)
        self._release(entry)
        return True

    def _release(self, entry: _Slot) -> None:
        self.cache.reset_row(entry.slot)
        self._free.append(entry.slot)
        self._free.sort(reverse=True)  # the lowest free slot is taken first

    def step(self, publish: Callable[[list[RowEvent]], None] | None = None) -> list[RowEvent]:
        """Prefill the rows added since the last step, then give every active row its next token.
        Returns one event per row that produced something (text, a token or its end).

        ``publish``, when given, receives the events as soon as they are made, before the model computes
        the next step's logits, so they reach clients one decode earlier. (Whether another thread's work on
        them overlaps that computation depends on Python's GIL: in one process it mostly does not, which is
        why ``glmlab serve`` runs the model in a process of its own; see benchmarks/README.md.)"""
        if torch.is_inference_mode_enabled():  # a caller stepping in a loop enters it once (generate_batch)
            return self._step(publish)
        with torch.inference_mode():
            return self._step(publish)

    def _step(self, publish: Callable[[list[RowEvent]], None] | None) -> list[RowEvent]:
        if self._waiting:
            self._prefill()
        if not self._active:
            return []
        entries = self._active
        if self._roster is None:  # worked out again only when rows join or leave
            rows = [e.row for e in entries]
            self._roster = rows, Controls.of(rows)
        rows, controls = self._roster
        chosen, tokens = next_tokens(self._logits, rows, self.tokenizer, controls, self.end_id)
        events, now, finished = [], time.perf_counter(), False
        eos = self.end_id
        for entry, row, token in zip(entries, rows, tokens, strict=True):
            event = RowEvent(entry.key, row.accept(token, eos, now), [token], [])  # <eos> too: it was generated
            if row.logprobs is not None:
                event.logprobs = row.take_logprobs()
            if row.done:
                event.completion, tail, late = self._finish(entry)
                event.delta += tail  # text held back (a possible stop string) that no delta has shown yet
                event.logprobs += late
                finished = True
            events.append(event)
        if finished:  # in slot order: when the slots in use are 0..n-1, a fast path reads the cache in place
            self._active = sorted((e for e in entries if not e.row.done), key=lambda e: e.slot)
            self._roster = None
            self._compact()
            where = {id(e): i for i, e in enumerate(entries)}  # the surviving rows' tokens, in their new order
            chosen = chosen[torch.tensor([where[id(e)] for e in self._active], dtype=torch.long, device=chosen.device)]
        if publish is not None and events:
            publish(events)
        self._logits = self._decode(self._active, chosen) if self._active else None
        return events

    def _compact(self) -> None:
        """Keep the rows in the lowest slots (0..n-1): a row that sits above them moves down into a slot a
        finished row freed (one copy of its cache), so decoding reads the cache in place instead of
        gathering scattered slots."""
        holders = len(self._by_key)  # active rows and rows waiting for their prefill
        if all(e.slot < holders for e in self._by_key.values()):
            return
        low = sorted(s for s in self._free if s < holders)
        for entry in sorted(self._by_key.values(), key=lambda e: e.slot, reverse=True):
            if entry.slot < holders:
                break
            target = low.pop(0)
            if entry.started:
                self.cache.move_row(entry.slot, target)
            else:
                self.cache.reset_row(entry.slot)
            self._free.remove(target)
            self._free.append(entry.slot)
            entry.slot = target
        self._free.sort(reverse=True)  # the lowest free slot is taken first
        self._active.sort(key=lambda e: e.slot)

    def _finish(self, entry: _Slot) -> tuple[Completion, str, list[TokenLogprob]]:
        """Free the row's slot; its completion, the text the deltas have not shown yet, and the logprobs
        entries not reported yet."""
        self._by_key.pop(entry.key, None)
        self._release(entry)
        return entry.row.finish(self.tokenizer)

    def _prefill(self) -> None:
        """Encode the prompts of newly added rows into their slots, in one forward pass."""
        new, self._waiting = self._waiting, []
        lengths = [len(e.row.prompt_ids) for e in new]
        idx = torch.full((len(new), max(lengths)), self.tokenizer.eos_id, dtype=torch.long)
        for i, e in enumerate(new):
            idx[i, : lengths[i]] = torch.tensor(e.row.prompt_ids)
        idx, slots = idx.to(self.device), [e.slot for e in new]
        logits = self.model.prefill_rows(idx, self.cache, slots, lengths) if self._fast_prefill else None
        if logits is None:
            logits = self.model(idx, self.cache, rows=slots, valid=lengths, last_only=True)[:, -1]
        logits = logits.float()
        for e in new:
            e.started = True
        self._active = self._active + new
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._roster = None

    def _decode(self, entries: list[_Slot], newest: torch.Tensor) -> torch.Tensor:
        """Logits of the next token of every row, after feeding each its newest token (``newest``, (B,))."""
        model, cache, block = self.model, self.cache, self.model.block_size
        for e in entries:
            if cache.lengths[e.slot] >= block and e.row.slides:  # context full: re-encode the row's last half,
                # then go on (a row that may not slide ends before its context is full: add() caps it)
                row = e.row
                row.context = context_tail(row.context, block)
                cache.reset_row(e.slot)
                if len(row.context) > 1:
                    model(torch.tensor([row.context[:-1]], device=self.device), cache, rows=[e.slot],
                          last_only=True)
        slots = [e.slot for e in entries]
        logits = model.decode_rows(newest, cache, slots) if self._fast_decode else None
        if logits is None:
            logits = model(newest[:, None], cache, rows=slots, last_only=True)[:, -1]
        return logits.float()
