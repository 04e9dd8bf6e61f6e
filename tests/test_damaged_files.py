"""Runs and data directories whose files disagree or have the wrong shape, and commands given the wrong kind of
path (issue 22, items 12, 13 and 15): each is one clear line naming the file and the fix, found when the run or
data directory is opened, not mid-request or mid-run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from glmlab.data.tokenizer import Tokenizer
from tests.conftest import TINY_MODEL, TINY_TRAIN
from tests.test_cli import run_cli


@pytest.fixture
def data_copy(char_data, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(char_data, target)
    return target


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_when_the_run_loads(capsys, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    tokenizer = Tokenizer.from_file(run / "tokenizer.json")
    tokenizer.with_special_tokens([f"<extra{i}>" for i in range(5)]).save(run / "tokenizer.json")
    for command in (["generate", run, "--prompt", "First", "--max-new-tokens", "2"], ["eval", run]):
        code, _, err = run_cli(capsys, *command)
        assert code == 1 and "tokenizer.json has" in err and "the two do not belong together" in err, err


def test_token_ids_outside_the_vocabulary_are_found_when_the_split_opens(capsys, trained_run, data_copy, tmp_path):
    meta = json.loads((data_copy / "meta.json").read_text())
    ids = np.fromfile(data_copy / "val.bin", dtype=meta["dtype"])
    ids[7] = meta["vocab_size"] + 3  # one id past the vocabulary: crashed eval with IndexError, or went unnoticed
    ids.tofile(data_copy / "val.bin")
    code, _, err = run_cli(capsys, "eval", trained_run, "--data", data_copy)
    assert code == 1 and f"val.bin holds token id {meta['vocab_size'] + 3}" in err and "re-run glmlab prepare" in err
    code, _, err = run_cli(capsys, "train", "--data", data_copy, "--out", tmp_path / "run", *TINY_MODEL, *TINY_TRAIN,
                           "train.max_steps=2")
    assert code == 1 and "val.bin holds token id" in err


@pytest.mark.parametrize("change, words", [
    (lambda meta: [1], "a list, not an object"),
    (lambda meta: {**meta, "splits": "x"}, "'splits' are not"),
    (lambda meta: {**meta, "splits": {"train": {"tokens": "many"}}}, "'splits' are not"),
    (lambda meta: {**meta, "dtype": "float64"}, "dtype 'float64' is not uint16 or uint32"),  # was "truncated"
    (lambda meta: {**meta, "vocab_size": 0}, "vocab_size 0 is not a positive integer"),
    (lambda meta: {**meta, "vocab_size": meta["vocab_size"] + 1}, "its tokenizer.json has"),
])
def test_a_meta_json_of_the_wrong_shape_is_one_clear_line(capsys, trained_run, data_copy, change, words):
    meta = json.loads((data_copy / "meta.json").read_text())
    (data_copy / "meta.json").write_text(json.dumps(change(meta)))
    code, _, err = run_cli(capsys, "eval", trained_run, "--data", data_copy)
    assert code == 1 and "meta.json" in err and words in err, err


@pytest.mark.parametrize("content, words", [("[1]", "JSON of the wrong shape"), ('{"model": 5}', "must be a mapping")])
def test_a_config_json_of_the_wrong_shape_is_one_clear_line(capsys, trained_run, tmp_path, content, words):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.json").write_text(content)
    code, _, err = run_cli(capsys, "generate", run, "--prompt", "First")
    assert code == 1 and "config.json" in err and words in err, err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_device_glmlab_does_not_run_on_is_one_clear_line(capsys, trained_run, command):
    extra = ["--prompt", "First"] if command == "generate" else []
    code, _, err = run_cli(capsys, command, trained_run, *extra, "--device", "tpu")
    assert code == 1 and "unknown device 'tpu'" in err and "use auto, cpu, cuda" in err, err


def test_export_hf_into_an_existing_file_is_one_clear_line(capsys, trained_run, tmp_path):
    target = tmp_path / "afile"
    target.write_text("mine")
    code, _, err = run_cli(capsys, "export-hf", trained_run, target)
    assert code == 1 and "is a file, not a directory" in err and target.read_text() == "mine"


def test_a_config_that_is_a_directory_is_named_as_one(capsys, char_data, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", char_data, "--out", tmp_path / "run", "--config", tmp_path)
    assert code == 1 and "is a directory, not a YAML file" in err and "does not exist" not in err
