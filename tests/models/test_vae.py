"""Family `vae`: KL schedules, free bits, word dropout, the decoder given z, and the loss's statistics."""

import pytest
import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.tokenizer import train_word
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.models.vae import PAD_ID, UNK_ID, LatentDecoder, SentenceVAE, VAEConfig, beta_at, gaussian_kl

BOS = 2


def tiny(**changes) -> SentenceVAE:
    torch.manual_seed(0)
    base = dict(vocab_size=30, block_size=12, n_embd=16, n_hidden=24, encoder_hidden=12, latent_dim=4, dropout=0.0)
    return SentenceVAE(VAEConfig(**{**base, **changes}))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sentences (5 and 3 words) as the sentence collate makes them."""
    y = torch.tensor([[5, 6, 7, 8, 9, 3], [10, 11, 12, 3, IGNORE_INDEX, IGNORE_INDEX]])
    x = torch.tensor([[BOS, 5, 6, 7, 8, 9], [BOS, 10, 11, 12, PAD_ID, PAD_ID]])
    return x, y


def test_beta_schedules_at_hand_worked_steps():
    constant = VAEConfig(beta=0.7)
    assert [beta_at(constant, s) for s in (0, 10, 10**6)] == [0.7, 0.7, 0.7]
    linear = VAEConfig(beta=2.0, beta_schedule="linear", anneal_steps=100)
    assert [beta_at(linear, s) for s in (0, 25, 50, 100, 250)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    cyclical = VAEConfig(beta=1.0, beta_schedule="cyclical", anneal_steps=100, cycle_rise=0.5)
    # each cycle of 100 steps rises 0 -> 1 over its first 50 steps, then holds 1
    got = [beta_at(cyclical, s) for s in (0, 25, 49, 50, 99, 100, 125, 250)]
    assert got == pytest.approx([0.0, 0.5, 0.98, 1.0, 1.0, 0.0, 0.5, 1.0])
    flat = VAEConfig(beta=1.0, beta_schedule="cyclical", anneal_steps=100, cycle_rise=0.0)
    assert beta_at(flat, 0) == 1.0
    model = tiny(beta=2.0, beta_schedule="linear", anneal_steps=100)
    assert model.beta == 0.0  # an annealed KL weight starts at 0
    model.set_step(50)
    assert model.beta == 1.0


def _kl_gradient(model: SentenceVAE) -> tuple[float, float]:
    """(mean KL per sentence, largest |gradient| of the KL term w.r.t. the encoder's parameters)."""
    _, y = batch()
    model.zero_grad()
    mu, logvar = model.encode(y)
    kl = gaussian_kl(mu, logvar)
    model.kl_term(kl).backward()
    grad = max(float(p.grad.abs().max()) for p in model.encoder_parameters() if p.grad is not None)
    return float(kl.detach().sum(1).mean()), grad


@pytest.mark.parametrize("mode", ["dimension", "total"])
def test_free_bits_above_the_kl_stop_its_gradient(mode):
    kl, grad = _kl_gradient(tiny(free_bits=0.0, free_bits_mode=mode))
    assert grad > 0
    kl_floor, grad = _kl_gradient(tiny(free_bits=kl + 5.0, free_bits_mode=mode))  # above every dimension's KL
    assert kl_floor == pytest.approx(kl) and grad == 0.0


def test_free_bits_per_dimension_release_only_the_dimensions_below_the_floor():
    kl = torch.tensor([[0.1, 2.0, 0.3], [0.2, 3.0, 0.1]], requires_grad=True)
    model = tiny(free_bits=1.0, free_bits_mode="dimension")
    term = model.kl_term(kl)
    term.backward()
    assert term.item() == pytest.approx(2 * (1.0 + 2.5 + 1.0))  # batch means floored, times the batch
    assert kl.grad.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    kl.grad = None
    total = tiny(free_bits=1.0, free_bits_mode="total").kl_term(kl)  # mean total 2.85 > 1: no floor
    total.backward()
    assert total.item() == pytest.approx(5.7) and kl.grad.eq(1.0).all()


def test_free_bits_switch_off_at_free_bits_until():
    kl = torch.tensor([[0.1, 2.0, 0.3], [0.2, 3.0, 0.1]])
    model = tiny(free_bits=1.0, free_bits_until=100)
    model.set_step(99)
    assert model.kl_term(kl).item() == pytest.approx(2 * (1.0 + 2.5 + 1.0))  # floored
    model.set_step(100)
    assert model.kl_term(kl).item() == pytest.approx(float(kl.sum()))  # the plain KL from then on
    never = tiny(free_bits=1.0)
    never.set_step(10**6)
    assert never.kl_term(kl).item() == pytest.approx(2 * (1.0 + 2.5 + 1.0))


def test_bn_vae_fixes_the_spread_of_the_posterior_means_and_so_a_kl_floor():
    torch.manual_seed(1)
    gamma, latent = 0.5, 4
    model = tiny(bn_gamma=gamma, latent_dim=latent)
    with torch.no_grad():  # even raw means that hardly vary are spread to gamma (no escape under eps)
        model.to_posterior.weight.mul_(0.01)
    y = torch.randint(4, 30, (64, 7))
    mu, logvar = model.encode(y)
    # per dimension over the batch: mean = the learned shift (0 at the start), biased std = gamma
    assert mu.mean(0).abs().max().item() < 2e-3  # float32 cancellation of raw means that hardly vary
    assert mu.std(0, unbiased=False).tolist() == pytest.approx([gamma] * latent, abs=0.03)
    # E[KL] >= sum_d E[mu_d^2] / 2 = latent * gamma^2 / 2, whatever the variances
    kl = gaussian_kl(mu, logvar).sum(1).mean().item()
    assert kl >= mu.pow(2).mean(0).sum().item() / 2 >= 0.9 * latent * gamma**2 / 2
    mu.sum().backward()  # the shift is learned and belongs to the encoder
    assert any(p is model.mu_shift for p in model.encoder_parameters()) and model.mu_shift.grad is not None
    model.eval()  # running statistics: a sentence's posterior does not depend on its batch
    alone, _ = model.encode(y[:1])
    together, _ = model.encode(y)
    assert torch.allclose(alone[0], together[0], atol=1e-6)
    model.train()
    assert model.encode(y[:1])[0].shape == (1, latent)  # one sentence in training: no batch statistics


def test_mixture_prior_density_sampling_and_kl():
    import math

    model = tiny(prior="mixture", prior_components=2, latent_dim=2)
    with torch.no_grad():
        model.prior_means.copy_(torch.tensor([[-2.0, 0.0], [3.0, 1.0]]))
        model.prior_logvars.copy_(torch.tensor([[0.0, 0.0], [math.log(0.25), 0.0]]))
        model.prior_logits.copy_(torch.tensor([math.log(0.25), math.log(0.75)]))
    z = torch.tensor([[0.5, -1.0]])
    by_hand = math.log(0.25 * math.exp(-0.5 * (2.5**2 + 1.0)) / (2 * math.pi)
                       + 0.75 * math.exp(-0.5 * ((2.5 / 0.5) ** 2 + 2.0**2)) / (2 * math.pi * 0.5))
    assert model.log_prior(z).item() == pytest.approx(by_hand, rel=1e-5)
    draws = model.sample_prior(40_000, torch.Generator().manual_seed(0))
    assert draws[:, 0].mean().item() == pytest.approx(0.25 * -2.0 + 0.75 * 3.0, abs=0.05)
    assert (draws[:, 0] > 0.5).float().mean().item() == pytest.approx(0.75, abs=0.01)
    mu, logvar = torch.tensor([[2.5, 0.5]]), torch.tensor([[-1.0, 0.2]])
    eps = torch.randn((200_000, 1, 2), generator=torch.Generator().manual_seed(1))
    zs = mu + eps * (0.5 * logvar).exp()
    from glmlab.models.vae import log_normal

    monte_carlo = (log_normal(zs, mu, logvar) - model.log_prior(zs)).mean(0)
    kl = model.kl_divergence(mu, logvar, samples=20_000, generator=torch.Generator().manual_seed(2))
    assert kl.item() == pytest.approx(monte_carlo.item(), abs=0.03) and kl.item() > 0.5
    standard = tiny(latent_dim=2)
    assert standard.kl_divergence(mu, logvar).item() == pytest.approx(gaussian_kl(mu, logvar).sum().item())


def test_mixture_prior_learns_from_the_loss_without_changing_its_value_or_the_other_gradients():
    x, y = batch()
    plain, mixture = tiny(), tiny(prior="mixture", prior_components=3)
    mixture.load_state_dict(plain.state_dict(), strict=False)
    losses = []
    for model in (plain, mixture):
        torch.manual_seed(5)  # the same z
        loss = model.loss(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, p in plain.named_parameters():
        assert torch.allclose(p.grad, dict(mixture.named_parameters())[name].grad, atol=1e-6), name
    for p in (mixture.prior_means, mixture.prior_logvars, mixture.prior_logits):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the logged KL and ELBO are against the model's own prior
    assert mixture.stats["kl"].item() != pytest.approx(plain.stats["kl"].item(), abs=1e-3)
    assert mixture.stats["elbo"].item() == pytest.approx(-(mixture.stats["recon"] + mixture.stats["kl"]).item())


def _decoder_inputs(model: SentenceVAE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    seen = {}
    original = model.reconstruction_nll

    def spy(inputs, targets, z):
        seen["x"] = inputs
        return original(inputs, targets, z)

    model.reconstruction_nll = spy
    model.loss(x, y)
    return seen["x"]


def test_word_dropout_only_while_training_and_never_on_bos_or_padding():
    x, y = batch()
    model = tiny(word_dropout=1.0)
    dropped = _decoder_inputs(model.train(), x, y)
    assert dropped[:, 0].eq(BOS).all()
    assert dropped[0, 1:].eq(UNK_ID).all() and dropped[1, 1:4].eq(UNK_ID).all()
    assert dropped[1, 4:].eq(PAD_ID).all()
    assert torch.equal(_decoder_inputs(model.eval(), x, y), x)
    torch.manual_seed(1)
    half = _decoder_inputs(tiny(word_dropout=0.5).train(), x.repeat(200, 1), y.repeat(200, 1))
    rate = float(half[:, 1:].eq(UNK_ID).sum()) / float((y.repeat(200, 1)[:, 1:] != IGNORE_INDEX).sum())
    assert 0.4 < rate < 0.6


def test_latent_decoder_decodes_row_i_from_z_i():
    model = tiny().eval()
    z = torch.tensor([[2.0, -1.0, 0.5, 1.0], [-2.0, 1.5, -0.5, -1.0]])
    idx = torch.tensor([[BOS, 5, 6, 7], [BOS, 9, 8, 4]])
    with torch.no_grad():
        decoder = LatentDecoder(model, z)
        cache = decoder.new_cache(2, torch.device("cpu"))
        stepped = torch.cat([decoder(idx[:, :2], cache), decoder(idx[:, 2:], cache)], dim=1)
        alone = [model.decode_logits(idx[i:i + 1], z[i:i + 1]) for i in range(2)]
        assert torch.allclose(stepped[0:1], alone[0], atol=1e-5) and torch.allclose(stepped[1:2], alone[1], atol=1e-5)
        swapped = model.decode_logits(idx[:1], z[1:2])
        assert not torch.allclose(alone[0], swapped, atol=1e-3)  # z matters, so the check above means something

    tok = train_word(["a b c d e f g h i j k l m n o p q r s t u v w x y z"], 100)
    model = tiny(vocab_size=tok.vocab_size).eval()
    with torch.no_grad():
        model.z_to_state.weight.mul_(5)
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    together = generate_batch(LatentDecoder(model, z), tok, ["", ""], settings)
    separate = [generate_batch(LatentDecoder(model, z[i:i + 1]), tok, [""], settings)[0] for i in range(2)]
    assert [r[0].token_ids for r in together] == [r[0].token_ids for r in separate]
    assert together[0][0].token_ids != together[1][0].token_ids
    assert not model.training  # decoding leaves the VAE in the mode it found it in


def test_loss_records_recon_kl_beta_and_elbo():
    x, y = batch()
    model = tiny(beta=0.5).train()
    torch.manual_seed(3)
    loss = model.loss(x, y)
    stats = model.stats
    assert set(stats) >= {"recon", "kl", "beta", "elbo"}
    assert float(stats["beta"]) == 0.5
    assert float(stats["elbo"]) == pytest.approx(-(float(stats["recon"]) + float(stats["kl"])), rel=1e-6)
    tokens = int((y != IGNORE_INDEX).sum())
    per_batch = 2 * (float(stats["recon"]) + 0.5 * float(stats["kl"]))  # stats are per-sentence means
    assert loss.item() * tokens == pytest.approx(per_batch, rel=1e-5)
    assert not any(t.requires_grad for t in stats.values())
    with torch.no_grad():  # validation NLL (negative ELBO) draws z from a fixed seed: repeatable
        assert float(model.eval().nll(x, y)) == float(model.nll(x, y))


def test_a_decoder_without_z_starts_from_the_centre_of_the_prior():
    standard = tiny()
    assert torch.equal(standard.new_cache(3, torch.device("cpu")).cond, torch.zeros(3, 4))
    mixture = tiny(prior="mixture", prior_components=3)
    with torch.no_grad():
        mixture.prior_logits.copy_(torch.tensor([0.0, 2.0, 1.0]))
    cond = mixture.new_cache(2, torch.device("cpu")).cond
    assert torch.equal(cond, mixture.prior_means.detach()[1].expand(2, -1))
