"""LoRA as a parametrization, the classifier head, and the downstream metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmlab.config import resolve_config
from glmlab.errors import GlmlabError
from glmlab.finetune.classifier import SequenceClassifier, check_backbone
from glmlab.finetune.metrics import classification_metrics, generation_metrics, rouge_l
from glmlab.models import build_model
from glmlab.models.lora import add_lora, merge_lora
from tests.conftest import tiny_config


def gpt():
    torch.manual_seed(0)
    config = tiny_config("model.vocab_size=50", "model.block_size=16").model
    return build_model(config)


def test_lora_starts_at_the_model_trains_only_updates_and_merges_exactly():
    model = gpt().eval()
    x = torch.randint(0, 50, (2, 10))
    before = model(x)
    added = add_lora(model, rank=2, alpha=4.0)
    assert torch.allclose(model(x), before)  # B = 0: the same function
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora" not in n and n.endswith((".a", ".b")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == added
    for name, p in model.named_parameters():
        if name.endswith(".b"):
            p.data.normal_()
    layer = model.transformer.h[0].attn.c_attn
    update = layer.parametrizations.weight[0]
    expected = layer.parametrizations.weight.original + update.scale * update.b @ update.a
    assert torch.allclose(layer.weight, expected)
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_lora_refuses_an_lstm():
    config = resolve_config({}, ["model.family=lstm", "model.vocab_size=50", "model.n_embd=16",
                                 "model.n_hidden=16"]).model
    with pytest.raises(GlmlabError, match="use --mode full or --mode probe"):
        add_lora(build_model(config), 2, 4.0)


def test_pooling_ignores_padding_and_probe_freezes():
    backbone = gpt()
    for pooling in ("last", "mean"):
        clf = SequenceClassifier(backbone, 3, pooling, pad_id=0).eval()
        x = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
        alone = clf(torch.tensor([[5, 6, 7]]))
        assert torch.allclose(clf(x)[0], alone[0], atol=1e-5)
    probe = SequenceClassifier(gpt(), 2, "last", pad_id=0, frozen=True).train()
    assert not probe.backbone.training and probe.drop.training
    probe.loss(torch.tensor([[5, 6]]), torch.tensor([1])).backward()
    assert all(p.grad is None for p in probe.backbone.parameters())
    assert probe.head.weight.grad is not None


def test_a_vae_cannot_be_a_classifier_backbone():
    config = resolve_config({}, ["model.family=vae", "model.vocab_size=50"]).model
    with pytest.raises(GlmlabError, match="cannot be fine-tuned as a classifier"):
        check_backbone(build_model(config))


def test_classification_metrics_by_hand():
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(truth, predicted, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # F1: class 0: 2*2/(2+3) = 0.8; class 1: 2*1/(2+2) = 0.5; class 2: 2*1/(2+1) = 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_generation_metrics_by_hand():
    assert rouge_l("a b c d", "a c d e") == pytest.approx(2 * 0.75 * 0.75 / 1.5)  # LCS a c d
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0
    m = generation_metrics(["the  king is here", "no"], ["the king is here", "yes sir"])
    assert m["exact_match"] == 0.5  # whitespace is normalised
    assert generation_metrics(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(1.0)


def test_auxiliary_lm_loss_adds_the_weighted_language_modelling_loss():
    backbone = gpt().eval()
    x = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 8, 7, 6, 5, 4]])
    y = torch.tensor([1, 0])
    plain = SequenceClassifier(backbone, 2, "last", pad_id=0).eval()
    aux = SequenceClassifier(backbone, 2, "last", pad_id=0, lm_weight=0.5).eval()
    aux.head.load_state_dict(plain.head.state_dict())
    targets = x[:, 1:].masked_fill(x[:, 1:] == 0, -100)
    expected = plain.loss(x, y) + 0.5 * backbone.loss(x[:, :-1], targets)
    assert torch.allclose(aux.loss(x, y), expected, atol=1e-6)


def test_lm_weight_needs_a_trainable_backbone():
    from glmlab.finetune.run import FinetuneOptions

    with pytest.raises(GlmlabError, match="auxiliary LM loss"):
        FinetuneOptions(task="classify", init="x", train="t", mode="probe", lm_weight=0.5).check()
