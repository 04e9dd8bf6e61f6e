"""Reading labelled files and pairs, encoding with truncation, resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import train_tokenizer
from glmlab.errors import DataError
from glmlab.finetune.examples import (
    ExampleBatches,
    Examples,
    Pair,
    encode_pairs,
    encode_texts,
    read_labelled,
    read_pairs,
    sort_labels,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("word", ["the good king is here", "an evil night falls on the king"], None)


def test_formats_and_default_text_column(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nit 's good , \"really\"\t1\nbad\t0\n")
    (tmp_path / "b.csv").write_text('text,label\n"good, really",pos\nbad,neg\n')
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "good", "label": 1}) + "\n\n"
                                      + json.dumps({"text": "bad", "label": 0.0}) + "\n")
    a = read_labelled(tmp_path / "a.tsv")
    assert a.texts == ['it \'s good , "really"', "bad"] and a.labels == ["1", "0"]  # TSV: quotes are text
    b = read_labelled(tmp_path / "b.csv")
    assert b.texts == ["good, really", "bad"] and b.labels == ["pos", "neg"]
    c = read_labelled(tmp_path / "c.jsonl")
    assert c.labels == ["1", "0"]  # 1, 1.0 and "1" are one label


def test_label_order_numeric_when_integers():
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_labels(["neg", "pos", "neutral"]) == ["neg", "neutral", "pos"]


@pytest.mark.parametrize("content, column, message", [
    ("sentence\ty\nhi\t1\n", None, "no label column 'label'"),
    ("words\tlabel\nhi\t1\n", None, "no text column"),
    ("sentence\tlabel\nhi\t1\n", "body", "no column 'body'"),
    ("sentence\tlabel\nhi\t\n", None, "line 2: the label is missing"),
    ("sentence\tlabel\n", None, "holds no rows"),
])
def test_clear_errors(tmp_path, content, column, message):
    path = tmp_path / "f.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_labelled(path, text_column=column)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_labelled(tmp_path / "missing.tsv")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a .tsv, .csv or .jsonl"):
        read_labelled(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not JSON"):
        read_labelled(tmp_path / "bad.jsonl")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match="line 1: no string field 'completion'"):
        read_pairs(tmp_path / "pairs.jsonl")


def test_encode_texts_truncates_and_ends_with_eos(tok):
    ids, cut = encode_texts(tok, ["the good king is here", "the king"], max_len=4, bos=False)
    assert cut == 1
    assert ids[0] == tok.encode("the good king") + [tok.eos_id]  # the beginning is kept
    assert ids[1] == tok.encode("the king") + [tok.eos_id]
    with_bos, _ = encode_texts(tok, ["the king"], max_len=8, bos=True)
    assert with_bos[0][0] == tok.bos_id and with_bos[0][-1] == tok.eos_id


def test_encode_pairs_scores_only_the_completion(tok):
    ex = encode_pairs(tok, [Pair("the good king", " is here")], max_len=32, bos=False)
    prompt, completion = tok.encode("the good king"), tok.encode(" is here") + [tok.eos_id]
    assert ex.inputs[0] == (prompt + completion)[:-1]
    scored = [t for t in ex.targets[0] if t != IGNORE_INDEX]
    assert scored == completion
    assert ex.targets[0][: len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1)
    # too long: the prompt loses its start, the completion stays whole
    cut = encode_pairs(tok, [Pair("the good king is here the king", " is here")], max_len=5, bos=False)
    assert cut.truncated == 1 and len(cut.inputs[0]) == 5
    assert [t for t in cut.targets[0] if t != IGNORE_INDEX] == completion
    # an empty prompt of running text starts from <eos>, as the engine prompts it
    empty = encode_pairs(tok, [Pair("", "the king")], max_len=8, bos=False)
    assert empty.inputs[0][0] == tok.eos_id


def test_batches_pad_and_resume():
    ex = Examples([[5, 6, 7], [5], [6, 6], [7, 7, 7, 7], [5, 5]] * 4, labels=[0, 1, 0, 1, 1] * 4)
    x, y = ex.collate([0, 1], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [5, 0, 0]] and y.tolist() == [0, 1]
    a = ExampleBatches(ex, batch_size=3, seed=4, pad_id=0)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(6)]
    b = ExampleBatches(ex, batch_size=3, seed=4, pad_id=0)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(6)), strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
