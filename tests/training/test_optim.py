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


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    import torch

    from glmlab.finetune.classifier import SequenceClassifier
    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.training.optim import MuonWithAdamW, hidden_matrices, make_optimizer

    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32))
    hidden = {id(p) for p in hidden_matrices(model)}
    blocks = [b.attn.c_attn.weight for b in model.transformer.h] + [b.attn.c_proj.weight for b in model.transformer.h] \
        + [b.mlp.c_fc.weight for b in model.transformer.h] + [b.mlp.c_proj.weight for b in model.transformer.h]
    assert hidden == {id(p) for p in blocks}  # not the (tied) embedding and head, the positions, norms or biases
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    in_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert in_adamw.isdisjoint(hidden) and len(in_adamw) + len(hidden) == len(list(model.parameters()))
    assert id(model.transformer.wte.weight) in in_adamw and id(model.transformer.wpe.weight) in in_adamw
    classifier = SequenceClassifier(model, 3, "last", 0)  # a classifier's head is an output layer: AdamW
    assert id(classifier.head.weight) not in {id(p) for p in hidden_matrices(classifier)}


def test_a_muon_step_is_torch_muon_on_the_matrices_and_adamw_on_the_rest(monkeypatch):
    import torch

    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.training import optim
    from glmlab.training.optim import make_optimizer

    monkeypatch.setattr(optim, "cpu_has_fast_bf16", lambda: True)  # torch's Muon, bf16 iterations, as the reference
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    reference = GPT(model.config)
    reference.load_state_dict(model.state_dict())
    cfg = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.1, beta2=0.95)
    ours = make_optimizer(model, cfg, torch.device("cpu"))
    names = {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
             "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    params = dict(reference.named_parameters())
    muon = torch.optim.Muon([params[n] for n in sorted(names)], lr=0.02, weight_decay=0.1,
                            adjust_lr_fn="match_rms_adamw")
    decay = [p for n, p in params.items() if n not in names and p.dim() >= 2]
    plain = [p for n, p in params.items() if n not in names and p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                              lr=0.02, betas=(0.9, 0.95), fused=True)
    start = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    x = torch.randint(0, 40, (4, 16))
    for _ in range(3):
        for m, opts in ((model, [ours]), (reference, [adamw, muon])):
            m.loss(x[:, :-1], x[:, 1:]).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.allclose(model.transformer.h[0].mlp.c_fc.weight, start, atol=1e-3)  # the steps moved it


def test_muon_on_a_model_without_hidden_matrices_is_refused():
    import torch

    from glmlab.errors import GlmlabError
    from glmlab.models.lstm import LSTMLM, LSTMConfig
    from glmlab.training.optim import make_optimizer

    model = LSTMLM(LSTMConfig(vocab_size=30, n_embd=8, n_hidden=8, n_layer=1))
    with pytest.raises(GlmlabError, match="(?s)no trainable hidden matrices.*train.optimizer=adamw"):
        make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))


def test_muon_leaves_a_vae_s_latent_maps_and_a_seqgan_s_discriminator_to_adamw():
    """A VAE's posterior head and z's projection are input / output maps; a SeqGAN's discriminator is outside the
    language model and maximum likelihood does not train it, so a SeqGAN (an LSTM otherwise) has nothing for Muon."""
    import torch

    from glmlab.errors import GlmlabError
    from glmlab.models.seqgan import SeqGAN, SeqGANConfig
    from glmlab.models.vae import SentenceVAE, VAEConfig
    from glmlab.training.optim import hidden_matrices, make_optimizer

    vae = SentenceVAE(VAEConfig(vocab_size=20, n_embd=8, n_hidden=32, encoder_hidden=32, latent_dim=16))
    chosen = {id(p) for p in hidden_matrices(vae)}
    assert id(vae.to_posterior.weight) not in chosen and id(vae.z_to_state.weight) not in chosen
    assert vae.to_posterior.weight.size(0) >= 16  # wide enough that only the mark keeps it out
    gan = SeqGAN(SeqGANConfig(vocab_size=30, n_embd=8, n_hidden=8, n_layer=1))
    assert any(p.dim() == 2 and p.size(0) >= 16 for n, p in gan.named_parameters() if n.startswith("discriminator"))
    assert hidden_matrices(gan) == []
    with pytest.raises(GlmlabError, match="no trainable hidden matrices"):
        make_optimizer(gan, TrainConfig(optimizer="muon"), torch.device("cpu"))


def test_a_muon_setting_with_adamw_is_refused_where_training_starts():
    """It would be ignored; a saved run's config that holds it still loads (generate, serve and eval read it)."""
    import torch

    from glmlab.config import resolve_config
    from glmlab.errors import ConfigError
    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.training.optim import make_optimizer

    model = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ConfigError, match="muon_momentum=0.9 applies to train.optimizer=muon") as err:
        make_optimizer(model, TrainConfig(muon_momentum=0.9), torch.device("cpu"))
    assert "drop train.muon_momentum" in str(err.value)
    assert resolve_config({}, ["train.muon_momentum=0.9"]).train.muon_momentum == 0.9
    make_optimizer(model, TrainConfig(optimizer="muon", muon_momentum=0.9), torch.device("cpu"))


def test_optimiser_state_of_another_parameter_split_is_refused_clearly():
    import torch

    from glmlab.errors import GlmlabError
    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.training.optim import load_optimizer_state, make_optimizer

    cfg = TrainConfig(optimizer="muon")
    small, large = (GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=n, n_head=2, n_embd=16)) for n in (1, 2))
    state = make_optimizer(small, cfg, torch.device("cpu")).state_dict()
    with pytest.raises(GlmlabError, match="does not fit this model's parameter groups"):
        load_optimizer_state(make_optimizer(large, cfg, torch.device("cpu")), state, cfg)


def test_fp32_muon_is_torch_muon_orthogonalising_in_fp32():
    """Where bf16 matmuls are slow (emulated), Muon's Newton-Schulz iterations run in fp32: the same steps as torch's
    Muon to bf16's rounding, and the same as the iteration computed in float64 to fp32's."""
    import torch

    from glmlab.training.optim import Fp32Muon, orthogonalise

    torch.manual_seed(0)
    weights = [torch.randn(24, 40, requires_grad=True), torch.randn(40, 24, requires_grad=True),
               torch.randn(24, 96, requires_grad=True)]  # wide, tall; and one under Jordan's scale (1 here, not 1.96)
    copies = [w.detach().clone().requires_grad_() for w in weights]
    ours = Fp32Muon([{"params": weights[:2], "adjust_lr_fn": "match_rms_adamw"},
                     {"params": weights[2:], "adjust_lr_fn": "original"}], lr=0.05, weight_decay=0.1)
    theirs = torch.optim.Muon([{"params": copies[:2], "adjust_lr_fn": "match_rms_adamw"},
                               {"params": copies[2:], "adjust_lr_fn": "original"}], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((weights, ours), (copies, theirs)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(weights, copies, strict=True):
        assert a.dtype == torch.float32 and not torch.equal(a, b)  # not the bf16 computation
        assert torch.allclose(a, b, atol=5e-3)
    g = torch.randn(24, 40)
    coefficients = (3.4445, -4.775, 2.0315)
    ortho = orthogonalise(g.double(), coefficients, 5, 1e-7)
    assert ortho.dtype == torch.float32  # computed in fp32 whatever comes in
    x = g.double() / g.double().norm()
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.775 * gram + 2.0315 * gram @ gram) @ x
    assert torch.allclose(ortho.double(), x, atol=1e-5)
    s = torch.linalg.svdvals(ortho)
    assert 0.5 < s.min() and s.max() < 1.5  # roughly orthogonal: Muon's quintic lands singular values near 1


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_muon_orthogonalises_in_bf16_only_where_bf16_is_fast(monkeypatch, fast_bf16):
    import torch

    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.training import optim

    monkeypatch.setattr(optim, "cpu_has_fast_bf16", lambda: fast_bf16)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    muon = optim.make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).muon
    assert isinstance(muon, optim.Fp32Muon) != fast_bf16


def test_the_schedule_reaches_both_optimisers_after_a_resume():
    """load_state_dict replaces an optimiser's group dicts: the lr the schedule sets must reach the new ones."""
    import torch

    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.training.optim import make_optimizer

    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    cfg = TrainConfig(optimizer="muon")
    saved = make_optimizer(model, cfg, torch.device("cpu")).state_dict()
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    opt.load_state_dict(saved)
    for group in opt.param_groups:
        group["lr"] = 0.123
    assert [g["lr"] for g in opt.adamw.param_groups + opt.muon.param_groups] == [0.123] * len(opt.param_groups)


def test_muon_leaves_lora_adapted_layers_and_heads_to_adamw():
    import torch

    from glmlab.errors import GlmlabError
    from glmlab.finetune.classifier import SequenceClassifier
    from glmlab.models.bert import BERT, BertConfig
    from glmlab.models.gpt import GPT, GPTConfig
    from glmlab.models.lora import add_lora
    from glmlab.training.optim import hidden_matrices, make_optimizer

    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    for p in model.parameters():
        p.requires_grad_(False)
    add_lora(model, rank=2, alpha=4.0)
    assert hidden_matrices(model) == []  # computed weights: not parameters Muon could step
    with pytest.raises(GlmlabError, match="no trainable hidden matrices"):
        make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    classifier = SequenceClassifier(GPT(model.config), 20, "last", 0)  # 20 classes: a head by its name
    assert id(classifier.head.weight) not in {id(p) for p in hidden_matrices(classifier)}
    bert = BERT(BertConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert id(bert.head.dense.weight) not in {id(p) for p in hidden_matrices(bert)}  # the MLM head's transform
