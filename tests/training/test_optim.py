import math

import pytest

from glmlab.config import TrainConfig
from glmlab.training.optim import budget_used, learning_rate


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 10, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 60, 0.5) == pytest.approx(0.55)
    assert learning_rate(cfg, 110, 1.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 500, 5.0) == pytest.approx(0.1)


def test_linear_and_constant_and_default_min_lr():
    assert learning_rate(TrainConfig(lr=1.0, warmup_steps=0, lr_schedule="linear"), 5, 0.5) == pytest.approx(0.55)
    assert learning_rate(TrainConfig(lr=1.0, warmup_steps=0, lr_schedule="constant"), 5, 0.9) == 1.0
    assert learning_rate(TrainConfig(lr=1.0, warmup_steps=0), 5, 1.0) == pytest.approx(0.1)


def test_time_budget_drives_the_schedule_when_it_binds_first():
    cfg = TrainConfig(max_steps=100_000, warmup_steps=0, max_time=100.0)
    assert budget_used(cfg, 10, 50.0) == pytest.approx(0.5)
    cfg = TrainConfig(max_steps=100, warmup_steps=0)
    assert budget_used(cfg, 50, 1e6) == pytest.approx(0.5)
    assert math.isclose(budget_used(TrainConfig(max_steps=100, warmup_steps=0, max_time=1e6), 25, 1), 0.25)


def test_weight_decay_skips_vectors_and_parameters_marked_no_weight_decay():
    from glmlab.models.vae import SentenceVAE, VAEConfig
    from glmlab.training.optim import parameter_groups

    model = SentenceVAE(VAEConfig(vocab_size=20, n_embd=8, n_hidden=8, encoder_hidden=8, latent_dim=4,
                                  prior="mixture", prior_components=3))
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.prior_means) not in decayed and id(model.prior_logvars) not in decayed  # matrices, marked
    assert id(model.z_to_state.weight) in decayed and id(model.z_to_state.bias) not in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
