import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from glmlab.config import resolve_config
from glmlab.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from glmlab.errors import ConfigError, DataError
from glmlab.training.tasks import LanguageModelingTask
from glmlab.training.trainer import train
from tests.conftest import metrics_records, tiny_config

FIM = ("train.fim_rate=0.5", "train.sample_tokens=0")


def test_a_gpt_trains_with_fim_and_its_run_says_so(char_data, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config("train.max_steps=4", "train.eval_interval=4", *FIM), char_data, out,
                   show_progress=False)
    assert result.step == 4
    config = json.loads((out / "config.json").read_text())
    assert config["load"]["fim_rate"] == 0.5 and config["train"]["fim_spm_rate"] == 0.5
    assert "fim_generator" in torch.load(out / "trainer_state.pt", weights_only=True)["sampler"]


def test_a_fim_run_resumes_bit_exact(char_data, tmp_path):
    common = ("train.lr_schedule=constant", "train.eval_interval=3", "train.eval_tokens=256", *FIM)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config("train.max_steps=6", *common), char_data, straight, show_progress=False)
    train(tiny_config("train.max_steps=3", *common), char_data, split, show_progress=False)
    train(tiny_config("train.max_steps=6", *common), char_data, split, resume=True, show_progress=False)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_records(straight, "train")[-1]["loss"] == metrics_records(split, "train")[-1]["loss"]


def test_an_lstm_may_train_with_fim(char_data):
    task = LanguageModelingTask(char_data)
    task.check(resolve_config({}, ["model.family=lstm", "model.block_size=32", "train.fim_rate=0.25"]))
    assert task.run_files()["load"]["fim_rate"] == 0.25


@pytest.mark.parametrize(("extra", "named"), [(["train.batching=sentences"], "train.batching=sentences"),
                                              (["model.family=vae"], "model.family=vae is not one"),
                                              (["model.family=seqgan"], "model.family=seqgan trains on whole"),
                                              (["model.family=bert"], "objective is masked"),
                                              (["model.family=glm"], "objective is blank_infilling")])
def test_fim_is_refused_where_it_cannot_apply(char_data, tmp_path, extra, named):
    config = resolve_config({}, [*extra, "model.block_size=32", "train.fim_rate=0.5"])
    with pytest.raises(ConfigError, match=named) as err:
        train(config, char_data, tmp_path / "run", show_progress=False)
    assert "train.fim_rate=0" in err.value.fix
    assert not (tmp_path / "run").exists()


def test_data_without_fim_tokens_is_refused(char_data, tmp_path):
    """Data prepared before the FIM tokens existed: a tokenizer with only <pad>, <unk>, <bos>, <eos>, and the
    characters right after them."""
    old = tmp_path / "old-data"
    shutil.copytree(char_data, old)
    meta = json.loads((old / "meta.json").read_text())
    for split in meta["splits"]:
        ids = np.fromfile(old / f"{split}.bin", dtype=meta["dtype"])
        ids[ids >= len(SPECIAL_TOKENS)] -= len(SPECIAL_TOKENS) - 4
        ids.tofile(old / f"{split}.bin")
    chars = [t for t in Tokenizer.from_file(char_data / "tokenizer.json").hf.get_vocab() if t not in SPECIAL_TOKENS]
    hf = HFTokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIAL_TOKENS[:4], *sorted(chars)])},
                                      unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(SPECIAL_TOKENS[:4]))
    hf.save(str(old / "tokenizer.json"))
    meta["vocab_size"] = hf.get_vocab_size()  # as prepare wrote it with that tokenizer
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="fill-in-the-middle tokens") as err:
        train(tiny_config("train.fim_rate=0.5"), old, tmp_path / "run", show_progress=False)
    assert "<|fim_prefix|>, <|fim_middle|>, <|fim_suffix|>" in str(err.value)
    assert "re-run glmlab prepare" in err.value.fix
    # the same data trains without FIM
    train(tiny_config("train.max_steps=1", "train.sample_tokens=0"), old, tmp_path / "plain", show_progress=False)
