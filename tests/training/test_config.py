import pytest

from glmlab.config import TrainConfig, describe_keys, read_yaml, resolve_config
from glmlab.errors import ConfigError
from glmlab.schema import build_section, parse_duration


def test_overrides_are_typed():
    cfg = resolve_config({"train": {"lr": "1e-3"}}, ["train.lr=3e-4", "model.n_layer=2", "train.compile=True",
                                                    "train.max_time=3m", "train.min_lr=none"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 2 and cfg.train.compile == "true"
    assert resolve_config({"train": {"compile": False}}).train.compile == "false"
    assert cfg.train.max_time == 180.0 and cfg.train.min_lr is None


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError) as err:
        resolve_config({}, ["model.n_layers=4"])
    assert "model.n_layers" in str(err.value) and "did you mean 'model.n_layer'" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        resolve_config({"trian": {}})


@pytest.mark.parametrize("override, words", [
    ("train.batch_size=abc", ["train.batch_size", "int"]),
    ("train.batch_size=2.5", ["train.batch_size", "int"]),
    ("train.batch_size=0", ["out of range", ">= 1"]),
    ("train.precision=fp8", ["fp8", "bf16"]),
    ("train.max_time=soon", ["train.max_time"]),
    ("train.compile=maybe", ["train.compile", "auto"]),
    ("model.dropout=1.5", ["model.dropout", "<= 0.99"]),
    ("train.device=tpu", ["tpu", "cpu"]),
    ("lr=3", ["section.key"]),
    ("train.lr", ["no '='"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        resolve_config({}, [override])
    for word in words:
        assert word in str(err.value)


def test_min_lr_above_lr():
    with pytest.raises(ConfigError, match="min_lr"):
        build_section(TrainConfig, {"lr": 1e-3, "min_lr": 1e-2}, "train")


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400 and parse_duration(12) == 12
    with pytest.raises(ValueError):
        parse_duration("three minutes")


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(scalar)


def test_shipped_config_is_valid():
    from pathlib import Path

    cfg = resolve_config(read_yaml(Path(__file__).parents[2] / "configs" / "shakespeare-char.yaml"))
    assert cfg.model.family == "gpt" and cfg.train.max_time == 180


def test_describe_keys_lists_every_field():
    text = describe_keys()
    assert "model.n_layer" in text and "train.max_time" in text and "train.precision" in text
