"""Tokenizers: char, word and byte-level BPE, all Hugging Face ``tokenizers`` objects.

Whatever the kind, the result is saved as a standard ``tokenizer.json`` that
``tokenizers.Tokenizer.from_file`` loads, with the same special tokens at ids 0-13 (``SPECIAL_TOKENS``).
:class:`Tokenizer` wraps it with what glmlab needs: special ids, decoding that restores line
breaks for word-level text, and a check that names the characters a tokenizer cannot encode.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from glmlab import atomic
from glmlab.data.scripts import ScriptProfile, profile
from glmlab.errors import DataError, EncodingError, RunDirError

# Declared once: every tokenizer glmlab builds has exactly these, at these ids (models that need them
# declare so in their traits, and the trainer checks the data's tokenizer before training). The first four
# every family reads; the rest are the blanks and pieces of the autoencoding and infilling objectives:
# BERT's [MASK]/[CLS]/[SEP], GLM's sentence and document blanks and the start/end of a generated piece, and
# the fill-in-the-middle sentinels of a `gpt` trained with train.fim_rate.
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
MASK, CLS, SEP, SMASK, GMASK = "[MASK]", "[CLS]", "[SEP]", "[sMASK]", "[gMASK]"
SOP, EOP = "<|startofpiece|>", "<|endofpiece|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, MASK, CLS, SEP, SMASK, GMASK, SOP, EOP, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
(PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID, SMASK_ID, GMASK_ID, SOP_ID, EOP_ID, FIM_PREFIX_ID,
 FIM_MIDDLE_ID, FIM_SUFFIX_ID) = range(len(SPECIAL_TOKENS))
# the role of each, as Tokenizer.special_tokens names them
ROLES = ("pad", "unk", "bos", "eos", "mask", "cls", "sep", "smask", "gmask", "sop", "eop", "fim_prefix",
         "fim_middle", "fim_suffix")
BLANKS = (MASK_ID, SMASK_ID, GMASK_ID)  # the tokens that stand for a blank to fill
# The role tokens of glmlab's chat template (ChatML's), added after a vocabulary when a run is prepared or
# fine-tuned for chat (glmlab prepare --chat; finetune sft on messages): not at fixed ids.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
FIRST_TEXT_ID = len(SPECIAL_TOKENS)  # ids from here on are text, in every tokenizer glmlab trains
KINDS = ("char", "word", "bpe", "unigram")
DEFAULT_VOCAB_SIZE = {"word": 20000, "bpe": 4096, "unigram": 8000}
# On text in unspaced scripts a subword vocabulary must first hold the characters themselves (byte-level BPE
# spends three merges on each CJK character) and room for the common words: the default becomes four times the
# distinct characters, within these. On the Song ci (5,954 distinct characters) twice gave 1.22 (bpe) / 1.24
# (unigram) characters per token, four times 1.30 / 1.34 (benchmarks/unspaced_tokenizers.py).
UNSPACED_VOCAB_PER_CHARACTER = 4
UNSPACED_VOCAB_RANGE = (8000, 32000)
MAX_RUN_FOR_WORDS = 3.0  # unspaced characters per whitespace run above which a word tokenizer is refused

# Word-level pieces: runs of non-space characters, and each line break as a token of its own.
_WORD_PATTERN = r"\n|[^\s]+"
_WORD_DECODE_CLEANUP = re.compile(r" ?\n ?")


class Tokenizer:
    """A Hugging Face tokenizer plus the special ids and checks glmlab relies on.

    ``special_tokens`` maps roles (pad, unk, bos, eos) to token strings; glmlab's own tokenizers use
    ``SPECIAL_TOKENS``, an imported one (GPT-2's ``<|endoftext|>``) says which of its tokens plays which role.
    """

    def __init__(self, hf: HFTokenizer, special_tokens: dict[str, str] | None = None) -> None:
        self.hf = hf
        self.kind = _infer_kind(hf)
        roles = special_tokens or dict(zip(ROLES, SPECIAL_TOKENS, strict=True))
        self.special_tokens = {role: token for role, token in roles.items() if hf.token_to_id(token) is not None}
        self.role_ids = {role: hf.token_to_id(token) for role, token in self.special_tokens.items()}
        self.pad_id = self.role_ids.get("pad")
        self.unk_id = self.role_ids.get("unk")
        self.bos_id = self.role_ids.get("bos")
        self.eos_id = self.role_ids.get("eos")

    @property
    def default_roles(self) -> bool:
        """Whether the special tokens are glmlab's own, by role (a tokenizer glmlab trained)."""
        return self.special_tokens.get("eos") == EOS and all(
            role in ROLES and SPECIAL_TOKENS[ROLES.index(role)] == token for role, token in self.special_tokens.items())

    def has_role(self, role: str, at_glmlab_id: bool = False) -> bool:
        """Whether a token plays ``role`` (one of ``ROLES``), at the id glmlab's own tokenizers give it when
        ``at_glmlab_id`` (what a model whose code uses that id needs)."""
        token_id = self.role_ids.get(role)
        return token_id is not None and (not at_glmlab_id or token_id == ROLES.index(role))

    @functools.cached_property
    def vocab_size(self) -> int:
        """One more than the largest id (a tokenizer file from elsewhere may leave holes in its ids)."""
        return max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

    @functools.cached_property
    def pieces(self) -> list[str] | None:
        """Each id's text as :meth:`decode` gives it (special tokens: ''), for a tokenizer whose decoding is
        plain concatenation of those texts (a char tokenizer: its decoder fuses them); None for other
        kinds. Lets incremental decoding append one token's text instead of decoding a window."""
        if self.kind != "char":
            return None
        return [self.decode([i]) for i in range(self.vocab_size)]

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in decoded text: what the token adds to it (special tokens add nothing). A byte-level
        BPE token may hold part of a character; a word token's bytes leave out the space decoding puts between
        words. What OpenAI's logprobs ``bytes`` and constrained decoding read."""
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        byte_level = (json.loads(self.hf.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
        table = _byte_level_alphabet() if byte_level else {}
        out = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if token is None or token in specials:
                out.append(b"")
            elif byte_level and all(c in table for c in token):
                out.append(bytes(table[c] for c in token))
            else:
                out.append(self.decode([i]).encode("utf-8"))
        return out

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.kind == "word":
            text = _WORD_DECODE_CLEANUP.sub("\n", text)
        return text

    def unencodable(self, text: str) -> list[str]:
        """The pieces of ``text`` (characters, or words for a word tokenizer) that map to ``<unk>``."""
        return self._unknown(text, self.hf.encode(text, add_special_tokens=False))

    def _unknown(self, text: str, enc: Any) -> list[str]:
        if self.unk_id is None:
            return []
        bad: list[str] = []
        for token_id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            piece = text[start:end]
            if token_id == self.unk_id and piece != UNK and piece not in bad:
                bad.append(piece)
        return bad

    def encode_checked(self, text: str, what: str = "prompt") -> list[int]:
        """Encode ``text``, refusing with a clear error if any part of it would become ``<unk>``. Encoded once,
        through ``encode_batch``, which releases the interpreter lock: a long text does not hold up the other
        threads of a server meanwhile (``encode`` holds it)."""
        enc = self.hf.encode_batch([text], add_special_tokens=False)[0]
        bad = self._unknown(text, enc)
        if bad:
            shown = ", ".join(repr(p) for p in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            unit = "words" if self.kind == "word" else "characters"
            raise EncodingError(f"the {what} contains {unit} this {self.kind} tokenizer cannot encode: {shown}",
                                f"remove or replace them (the tokenizer knows {self.vocab_size} tokens from its "
                                "training text), or prepare data with --tokenizer bpe, which encodes any text")
        return enc.ids

    def unknown_note(self, sequences: Iterable[Iterable[int]], texts: Iterable[str], what: str) -> str | None:
        """A line saying how many ``<unk>`` tokens ``sequences`` (the encodings of ``texts``) hold and which
        characters (or words) became them, or None when none did: what a command that reads many texts says
        where ``generate`` refuses a prompt it cannot encode. ``what``: the texts' name, e.g. "train texts"."""
        if self.unk_id is None:
            return None
        counts = [int(np.count_nonzero(np.asarray(ids) == self.unk_id)) for ids in sequences]
        total = sum(counts)
        if not total:
            return None
        pieces: list[str] = []
        for count, text in zip(counts, texts, strict=False):
            for chunk in iter_lines([text]) if count else ():  # a chunk at a time: a text may be a whole corpus
                if len(pieces) > 5:
                    break
                pieces += [p for p in self.unencodable(chunk) if p not in pieces][:6 - len(pieces)]
        unit = "words" if self.kind == "word" else "characters"
        shown = ", ".join(repr(p) for p in pieces[:5]) + (", ..." if len(pieces) > 5 else "")
        return (f"{total:,} tokens in {sum(1 for c in counts if c):,} of {len(counts):,} {what} are <unk>: {unit} "
                f"this {self.kind} tokenizer cannot encode ({shown}) were replaced")

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """The most characters one token can stand for (its longest vocabulary entry; a byte-level entry's
        length is its bytes, at least its characters), so a text of ``n`` characters has at least
        ``n / max_token_chars`` tokens: a bound on a text's length checked before encoding it. Known for a char
        tokenizer and a BPE (byte-level or not: its unknown token stands for one character); None when the
        tokenizer normalises text first (a normalizer may contract characters) or an unknown token may cover a
        run of characters (a word, unigram or WordPiece tokenizer's: such text is refused as unencodable anyway,
        but only after encoding)."""
        model = self.hf.model
        bounded = self.kind == "char" or (isinstance(model, models.BPE) and not model.fuse_unk)
        if self.hf.normalizer is not None or not bounded:
            return None
        return max(len(piece) for piece in self.hf.get_vocab(with_added_tokens=True))

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy with ``tokens`` added as special tokens (new ids after the vocabulary) where they are missing."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        missing = [t for t in tokens if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        return Tokenizer(hf, self.special_tokens)

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, self.hf.to_str(pretty=True))

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"tokenizer file {path} is missing", "re-run glmlab prepare, or copy tokenizer.json")
        try:
            return cls(HFTokenizer.from_file(str(path)), special_tokens)
        except Exception as exc:  # tokenizers raises plain Exception on malformed JSON
            raise RunDirError(f"{path} is not a valid tokenizer.json ({str(exc).splitlines()[0]})",
                              "re-run glmlab prepare to rebuild it") from None


def _infer_kind(hf: HFTokenizer) -> str:
    spec = json.loads(hf.to_str())
    model_type = spec.get("model", {}).get("type")
    if model_type == "Unigram":
        return "unigram"
    if model_type == "WordPiece":  # an imported BERT's (glmlab trains none)
        return "wordpiece"
    if model_type == "WordLevel":
        decoder = spec.get("decoder") or {}
        return "char" if decoder.get("type") == "Fuse" else "word"
    return "bpe"


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the rest for
    the characters from U+0100 up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _with_specials(hf: HFTokenizer) -> HFTokenizer:
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return hf


_WORD_START = re.compile(r"(?<=\S)[ \t](?=\S)")  # a single space or tab between two words
MAX_PIECE_CHARS = 128  # a BPE pre-token is at most this long: training on a long unbroken run is quadratic


def train_char(texts: Iterable[str]) -> Tokenizer:
    """One token per distinct character of the training text (sorted), after the special tokens."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return Tokenizer(_with_specials(hf))


def train_word(texts: Iterator[str] | list[str], vocab_size: int) -> Tokenizer:
    """Whitespace-separated words (and line breaks), the ``vocab_size`` most frequent; the rest ``<unk>``."""
    hf = HFTokenizer(models.WordLevel(unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True)
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    # A corpus that already spells a special token (PTB writes <unk>) gets it as a word too, which moves
    # the token and leaves a hole in the ids: renumber with the specials first, words in trained order.
    vocab = hf.get_vocab(with_added_tokens=False)
    words = [w for w, _ in sorted(vocab.items(), key=lambda item: item[1]) if w not in SPECIAL_TOKENS]
    compact = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    if compact != vocab:
        pre_tokenizer = hf.pre_tokenizer
        hf = HFTokenizer(models.WordLevel(compact, unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizer
    return Tokenizer(_with_specials(hf))


def train_unigram(texts: Iterator[str] | list[str], vocab_size: int) -> Tokenizer:
    """A unigram language-model tokenizer (Kudo 2018, SentencePiece's default algorithm): pieces chosen to
    maximise the corpus likelihood, segmented by Viterbi; spaces as ``▁`` (Metaspace), each line break a token of
    its own, so decoding gives back the text. Suits text without spaces between words. Characters never seen in
    training become ``<unk>``."""
    hf = HFTokenizer(models.Unigram())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
                                                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")])
    hf.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token=UNK,
                                      max_piece_length=8, show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(_with_specials(hf))


def train_bpe(texts: Iterator[str] | list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): encodes any text, never produces ``<unk>``."""
    hf = HFTokenizer(models.BPE())
    # runs of more than MAX_PIECE_CHARS non-space characters (base64, minified code) are cut first: each merge
    # rescans every word it touches: prepare on 1 M unbroken letters took 539 s (now 4.6 s)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{MAX_PIECE_CHARS}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(_with_specials(hf))


def train_tokenizer(kind: str, texts: list[str], vocab_size: int | None = None) -> Tokenizer:
    """Train a tokenizer of ``kind`` on ``texts`` (the training split only)."""
    if kind not in KINDS:
        raise DataError(f"unknown tokenizer {kind!r}", f"use one of: {', '.join(KINDS)}")
    if kind == "char":
        return train_char(texts)
    script = profile(texts)
    if kind == "word" and script.unspaced and script.mean_run > MAX_RUN_FOR_WORDS:
        raise DataError(f"{script.share:.0%} of the text's letters are in scripts written without spaces between "
                        f"words (Chinese, Japanese, Thai, ...), {script.mean_run:.1f} characters per unspaced run: "
                        "the word tokenizer would split it only at spaces, making each clause one rare 'word'",
                        "use --tokenizer unigram (SentencePiece's algorithm), bpe or char; or segment the text "
                        "into words with spaces first (e.g. with jieba for Chinese)")
    size = default_vocab_size(kind, script) if vocab_size is None else vocab_size  # 0 is refused below, not a default
    minimum = len(SPECIAL_TOKENS) + (256 if kind == "bpe" else 1)
    if size < minimum:
        raise DataError(f"--vocab-size {size} is too small for a {kind} tokenizer",
                        f"use at least {minimum}")
    if kind == "word":
        return train_word(iter_lines(texts), size)
    if kind == "unigram":
        return train_unigram(iter_lines(texts), size)
    return train_bpe(iter_lines(texts), size)


def default_vocab_size(kind: str, script: ScriptProfile) -> int:
    """The vocabulary a ``kind`` tokenizer gets when none is asked for: the kind's default, or for a subword
    tokenizer on unspaced text four times its distinct characters, rounded up to a thousand
    (``UNSPACED_VOCAB_RANGE``)."""
    if kind in ("bpe", "unigram") and script.unspaced:
        low, high = UNSPACED_VOCAB_RANGE
        return min(high, max(low, -(-UNSPACED_VOCAB_PER_CHARACTER * script.distinct // 1000) * 1000))
    return DEFAULT_VOCAB_SIZE[kind]


def iter_lines(texts: Iterable[str], chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Texts cut into chunks of about ``chunk_chars`` (for batched encoding and training): at the first line
    break after ``chunk_chars``; a line longer than twice that before the last single space between two words
    in the chunk's second half (where every tokenizer here splits anyway, so the ids do not change), or, in text
    with no such space for ``chunk_chars / 2`` characters (base64, minified code, unspaced scripts without line
    breaks), at ``chunk_chars`` exactly. No chunk exceeds ``2 * chunk_chars``, so memory stays bounded."""
    for text in texts:
        start = 0
        while start < len(text):
            end = start + chunk_chars
            if end < len(text):
                newline = text.find("\n", end, end + chunk_chars)
                if newline != -1:
                    end = newline + 1
                else:
                    spaces = list(_WORD_START.finditer(text, start + chunk_chars // 2, end))
                    end = spaces[-1].start() if spaces else end
            yield text[start:end]
            start = end
