"""Guards: a non-finite loss stops the run (or skips the batch) and never reaches a checkpoint."""

import math

import pytest
import torch

from glmlab.errors import GlmlabError
from glmlab.models.gpt import GPT
from glmlab.training.checkpoint import checkpoint_dirs
from glmlab.training.trainer import train
from tests.conftest import tiny_config


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make GPT.loss return NaN on the given (1-based) calls."""
    original = GPT.loss
    calls = {"n": 0, "bad": set()}

    def loss(self, x, y):
        calls["n"] += 1
        value = original(self, x, y)
        return value * math.nan if calls["n"] in calls["bad"] else value

    monkeypatch.setattr(GPT, "loss", loss)
    return calls["bad"]


def test_nonfinite_loss_stops_and_names_the_step(char_data, tmp_path, nan_at_call):
    nan_at_call.add(13)
    out = tmp_path / "run"
    with pytest.raises(GlmlabError, match="non-finite at step 13") as err:
        train(tiny_config("train.max_steps=40", "train.checkpoint_interval=5"), char_data, out, show_progress=False)
    assert "train.on_nonfinite=skip" in str(err.value) and "(step-00000010, before step 13)" in str(err.value)
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000010", "step-00000005"]
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10


def test_a_nonfinite_loss_before_any_checkpoint_says_none_was_written(char_data, tmp_path, nan_at_call):
    """Issue 22, item 15: the message said "the last checkpoint ... is intact" when there was none."""
    nan_at_call.add(3)
    with pytest.raises(GlmlabError) as err:
        train(tiny_config("train.max_steps=40", "train.checkpoint_interval=5"), char_data, tmp_path / "run",
              show_progress=False)
    assert "No checkpoint had been written yet" in str(err.value) and "is intact" not in str(err.value)
    assert "start again" in err.value.fix and "--resume" not in err.value.fix


def test_skip_mode_drops_the_batch_and_goes_on(char_data, tmp_path, nan_at_call):
    nan_at_call.update({7, 8})
    result = train(tiny_config("train.max_steps=20", "train.on_nonfinite=skip"), char_data, tmp_path / "run",
                   show_progress=False)
    assert result.step == 20 and math.isfinite(result.best_val_loss)
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)
    assert state["skipped_batches"] == 2
