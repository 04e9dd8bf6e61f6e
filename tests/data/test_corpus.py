import json
from pathlib import Path

import pytest

from glmlab.data.corpus import (
    MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT,
    decode_text,
    default_corpus_path,
    expand_inputs,
    parse_split,
    read_corpus,
    split_documents,
)
from glmlab.errors import DataError


def test_bom_and_crlf_are_normalised():
    assert decode_text("\ufeffa\r\nb\rc\n".encode(), "x") == "a\nb\nc\n"


def test_invalid_utf8_names_file_and_offset():
    with pytest.raises(DataError) as err:
        decode_text(b"hello \xff world", "notes.txt")
    assert "notes.txt" in str(err.value) and "byte offset 6" in str(err.value)
    assert "--errors replace" in str(err.value)


def test_errors_replace_substitutes():
    assert decode_text(b"ab\xffc", "x", errors="replace") == "ab\ufffdc"


def test_binary_file_is_refused(tmp_path: Path):
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(DataError, match="binary"):
        read_corpus([path])


def test_directories_are_read_recursively_and_sorted(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zzz")
    (tmp_path / "a.txt").write_text("aaa")
    (tmp_path / "ignored.bin").write_text("nope")
    files = expand_inputs([tmp_path])
    assert [f.name for f in files] == ["a.txt", "z.txt"]
    assert read_corpus([tmp_path]).documents == ["aaa", "zzz"]


def test_missing_input_and_empty_directory(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_corpus([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="no .txt"):
        read_corpus([tmp_path])


def test_empty_corpus_is_refused(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no text"):
        read_corpus([tmp_path / "empty.txt"])


def test_jsonl_text_field(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["one", "two\r\nlines"])))
    assert read_corpus([path], text_field="body").documents == ["one", "two\nlines"]
    with pytest.raises(DataError) as err:
        read_corpus([path])
    assert "line 1" in str(err.value) and "--text-field" in str(err.value) and "body" in str(err.value)


def test_jsonl_bad_line(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="line 2"):
        read_corpus([path])


def test_sources_record_hashes(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    source = read_corpus([path]).sources[0]
    assert source.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert source.bytes == 5


def test_parse_split():
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.9,0.1", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5", "-0.1,0.6,0.5"):
        with pytest.raises(DataError):
            parse_split(bad)


def test_single_document_is_cut_contiguously_at_lines():
    doc = "".join(f"line {i}\n" for i in range(100))
    parts = split_documents([doc], (0.9, 0.05, 0.05), ("train", "val", "test"), seed=1)
    assert "".join(parts["train"] + parts["val"] + parts["test"]) == doc
    assert all(p.endswith("\n") for p in parts["train"] + parts["val"])
    assert abs(len(parts["train"][0]) / len(doc) - 0.9) < 0.02


def test_many_documents_split_by_document_deterministically():
    docs = [f"document number {i} " * (1 + i % 5) for i in range(MIN_DOCUMENTS_FOR_DOCUMENT_SPLIT * 10)]
    names = ("train", "val", "test")
    a = split_documents(docs, (0.8, 0.1, 0.1), names, seed=3)
    b = split_documents(docs, (0.8, 0.1, 0.1), names, seed=3)
    c = split_documents(docs, (0.8, 0.1, 0.1), names, seed=4)
    assert a == b and a != c
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(docs)
    share = sum(map(len, a["train"])) / sum(map(len, docs))
    assert 0.75 < share < 0.85


def test_default_corpus_is_tiny_shakespeare():
    text = default_corpus_path().read_text(encoding="utf-8")
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
