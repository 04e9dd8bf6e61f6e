import json

import numpy as np
import pytest

from glmlab.data.dataset import RandomWindows, open_data_dir
from glmlab.data.prepare import format_summary, prepare, token_dtype
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError


def test_prepare_writes_memmaps_meta_and_tokenizer(shakespeare_excerpt, tmp_path):
    meta = prepare([shakespeare_excerpt], tmp_path / "d", tokenizer="char")
    d = tmp_path / "d"
    on_disk = json.loads((d / "meta.json").read_text())
    assert on_disk["splits"] == meta["splits"] and on_disk["dtype"] == "uint16"
    tok = Tokenizer.from_file(d / "tokenizer.json")
    train = np.memmap(d / "train.bin", dtype=np.uint16, mode="r")
    assert len(train) == meta["splits"]["train"]["tokens"]
    assert train[-1] == tok.eos_id  # each document ends with <eos>
    text = shakespeare_excerpt.read_text()
    assert tok.decode(train[:200].tolist()) == text[:200]
    total_chars = sum(s["characters"] for s in meta["splits"].values())
    assert total_chars == len(text)
    assert meta["sources"][0]["sha256"] and meta["sources"][0]["path"] == str(shakespeare_excerpt)
    summary = format_summary(meta, d)
    assert "train" in summary and "unk rate" in summary


def test_prepare_is_deterministic(shakespeare_excerpt, tmp_path):
    prepare([shakespeare_excerpt], tmp_path / "a", tokenizer="bpe", vocab_size=300)
    prepare([shakespeare_excerpt], tmp_path / "b", tokenizer="bpe", vocab_size=300)
    for name in ("train.bin", "val.bin", "test.bin", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_explicit_val_and_test_files(shakespeare_excerpt, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("To be or not to be.\n")
    meta = prepare([shakespeare_excerpt], tmp_path / "d", val_file=val)
    assert meta["splits"]["val"]["characters"] == len("To be or not to be.\n")
    assert meta["splits"]["train"]["characters"] + meta["splits"]["test"]["characters"] == 40_000
    assert len(meta["sources"]) == 2


def test_unknown_rate_is_counted(shakespeare_excerpt, tmp_path):
    test = tmp_path / "test.txt"
    test.write_text("Zß€\n")  # characters Shakespeare's first 40k chars lack
    meta = prepare([shakespeare_excerpt], tmp_path / "d", test_file=test)
    assert meta["splits"]["test"]["unk_tokens"] >= 2


def test_token_dtype():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_open_data_dir_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_data_dir(tmp_path / "missing")
    with pytest.raises(DataError, match="glmlab prepare"):
        open_data_dir(tmp_path)


def test_truncated_token_file_is_detected(char_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(char_data, copy)
    data = (copy / "val.bin").read_bytes()
    (copy / "val.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        open_data_dir(copy).tokens("val")


def test_random_windows_reproducible_and_resumable(char_data):
    tokens = open_data_dir(char_data).tokens("train")
    a = RandomWindows(tokens, 16, 4, seed=7)
    b = RandomWindows(tokens, 16, 4, seed=7)
    a.next_batch()
    state = a.state_dict()
    x1, y1 = a.next_batch()
    b.load_state_dict(state)
    x2, y2 = b.next_batch()
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are inputs shifted by one


def test_block_size_larger_than_split():
    with pytest.raises(DataError, match="block_size"):
        RandomWindows(np.zeros(10, dtype=np.uint16), 16, 2, seed=0)
