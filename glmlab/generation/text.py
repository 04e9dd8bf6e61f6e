"""Token ids to text, incrementally: deltas that never split a multi-byte character or a stop string."""

from __future__ import annotations

from collections.abc import Sequence

from glmlab.data.tokenizer import Tokenizer


def left_context(tokenizer: Tokenizer, context: Sequence[int], most: int = 8) -> list[int]:
    """The shortest end of ``context`` that decodes to some text (a special token decodes to none), within its
    last ``most`` tokens; [] when they are all special."""
    for n in range(1, min(len(context), most) + 1):
        if tokenizer.decode(list(context[-n:])):
            return list(context[-n:])
    return []


def continuation(tokenizer: Tokenizer, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after ``context`` (a prompt's ids): what appended to the prompt's text gives the whole
    text. Decoding the new ids alone loses what their first token owes its left neighbour — the space a word or
    WordPiece tokenizer puts between two words ("the game" + "place" read "the gameplace") —, so the context's
    last token with text (:func:`left_context`) is decoded with them, as :class:`IncrementalText` does."""
    head = left_context(tokenizer, context)
    if not head:
        return tokenizer.decode(ids)
    before, after = tokenizer.decode(head), tokenizer.decode([*head, *ids])
    return after[len(before):] if after.startswith(before) else tokenizer.decode(ids)


class IncrementalText:
    """The decoded text of a growing token list, updated per token without re-decoding everything.

    Each push decodes only the last token or two (with one token of left context, so word-level
    spacing and byte-level merges come out exactly as a full decode would); while the newest tokens
    end in an incomplete UTF-8 sequence, nothing is added until the character is whole. A tokenizer
    whose decoding is plain concatenation (``Tokenizer.pieces``) appends the token's text directly.
    ``context``: the ids the text continues (a prompt's), whose end (:func:`left_context`) starts the window, so
    the text is the :func:`continuation` of them (a word tokenizer's first token brings its space).
    """

    def __init__(self, tokenizer: Tokenizer, keep_special: bool = False, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = left_context(tokenizer, context) if context else []
        self.text = ""
        self._prefix = 0  # start of the context window that is re-decoded
        self._read = len(self.ids)  # tokens before this are already in self.text (or are the context)
        self._skip_special = not keep_special  # keep_special: special tokens are text too (an echoed prompt's)
        self._pieces = tokenizer.pieces
        if keep_special and self._pieces is not None:
            self._pieces = [p or tokenizer.decode([i], skip_special_tokens=False) for i, p in enumerate(self._pieces)]

    def push(self, token: int) -> str:
        """Add a token; returns the text it completed ('' while a character is still incomplete)."""
        self.ids.append(token)
        if self._pieces is not None:  # an id outside the table (a model's padded vocabulary) decodes to nothing
            delta = self._pieces[token] if 0 <= token < len(self._pieces) else ""
            self.text += delta
            return delta
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], self._skip_special)
        after = self.tokenizer.decode(self.ids[self._prefix:], self._skip_special)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold back: a partial stop string, or an incomplete character."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    return hold


def text_offsets(tokenizer: Tokenizer, ids: list[int], base: int = 0, keep_special: bool = False) -> list[int]:
    """Where each token's text starts in the decoded text of ``ids`` (plus ``base``): OpenAI's ``text_offset``.
    A token that adds no text (a special token, unless ``keep_special``; the first byte of a character not whole
    yet) starts where the next text does."""
    text, offsets = IncrementalText(tokenizer, keep_special), []
    for token in ids:
        offsets.append(base + len(text.text))
        text.push(token)
    return offsets
