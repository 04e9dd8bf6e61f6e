"""`glmlab prepare` on text with long lines or long unbroken runs (issue 22, items 10-11): BPE pre-tokens are
capped, text is encoded in bounded batches, and neither changes the ids of ordinary text."""

from __future__ import annotations

import random

import numpy as np
import pytest

from glmlab.data import prepare as prepare_module
from glmlab.data.corpus import read_corpus
from glmlab.data.prepare import encode_documents, prepare
from glmlab.data.tokenizer import MAX_PIECE_CHARS, iter_lines, train_tokenizer
from tests.conftest import excerpt_lines


@pytest.fixture(scope="module")
def flat_text() -> str:
    """Shakespeare on one line: its line breaks made spaces."""
    return " ".join(excerpt_lines(20_000))


@pytest.mark.parametrize("kind", ["char", "word", "bpe", "unigram"])
def test_long_lines_are_cut_where_the_ids_do_not_change(flat_text, kind):
    tokenizer = train_tokenizer(kind, ["\n".join(excerpt_lines(20_000))], None if kind == "char" else 600)
    chunks = list(iter_lines([flat_text], chunk_chars=500))
    assert "".join(chunks) == flat_text and len(chunks) > 20 and max(map(len, chunks)) <= 1000
    assert [i for chunk in chunks for i in tokenizer.encode(chunk)] == tokenizer.encode(flat_text)


def test_a_run_without_spaces_is_cut_at_the_chunk_size():
    run = "x" * 2_600
    chunks = list(iter_lines([run], chunk_chars=1_000))
    assert [len(c) for c in chunks] == [1_000, 1_000, 600]


def test_bpe_pre_tokens_are_capped_so_training_on_an_unbroken_run_stays_linear():
    """Each merge rescans the words it touches: prepare on 1 M unbroken letters took 539 s.
    With the cap no pre-token is longer than MAX_PIECE_CHARS; ordinary words are pre-tokenized as before."""
    letters = "".join(random.Random(0).choice("abcdefghij") for _ in range(20_000))
    tokenizer = train_tokenizer("bpe", ["\n".join(excerpt_lines(5_000)) + "\n" + letters], 600)
    pieces = tokenizer.hf.pre_tokenizer.pre_tokenize_str(letters)
    assert max(len(p) for p, _ in pieces) == MAX_PIECE_CHARS and "".join(p for p, _ in pieces) == letters
    ordinary = "First Citizen: Before we proceed any further, hear me speak."
    assert [p for p, _ in tokenizer.hf.pre_tokenizer.pre_tokenize_str(ordinary)] == \
        ["First", "ĠCitizen", ":", "ĠBefore", "Ġwe", "Ġproceed", "Ġany", "Ġfurther", ",", "Ġhear", "Ġme", "Ġspeak",
         "."]
    assert tokenizer.decode(tokenizer.encode(letters)) == letters


def test_prepare_encodes_a_long_line_in_bounded_batches(flat_text, tmp_path, monkeypatch):
    """A document of one long line is encoded in batches of about BATCH_CHARS characters (a 20 MB line encoded at
    once held 7.6 GB), and the token file holds the ids of encoding it whole."""
    path = tmp_path / "flat.txt"
    path.write_text(flat_text, encoding="utf-8")  # one document: a text file is one
    calls: list[int] = []
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 2_000)
    original = prepare_module.Tokenizer.encode_batch

    def spy(self, texts):
        calls.append(sum(map(len, texts)))
        return original(self, texts)

    monkeypatch.setattr(prepare_module.Tokenizer, "encode_batch", spy)
    monkeypatch.setattr(prepare_module, "iter_lines", lambda texts: iter_lines(texts, chunk_chars=500))
    meta = prepare([path], tmp_path / "data", tokenizer="char", split="1,0,0", val_file=path)
    assert len(calls) > 10 and max(calls) <= 2_000 + 2 * 500
    tokenizer = prepare_module.Tokenizer.from_file(tmp_path / "data" / "tokenizer.json")
    ids = np.fromfile(tmp_path / "data" / "train.bin", dtype=meta["dtype"])
    documents = read_corpus([path]).documents
    assert len(documents) == 1 and len(documents[0]) > 15_000
    whole = [i for doc in documents for i in [*tokenizer.encode(doc), tokenizer.eos_id]]
    assert ids.tolist() == whole and meta["splits"]["train"]["tokens"] == len(whole)
    assert encode_documents(tokenizer, documents).tolist() == whole
