"""Metrics of latent-variable models (KL, importance-weighted NLL, mutual information, active units) against
known answers, padding that never counts, and `glmlab eval` on tiny sentence runs (vae and lstm)."""

import json
import math
import random
import types

import pytest
import torch

from glmlab.cli import main
from glmlab.config import resolve_config
from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.prepare import prepare
from glmlab.evaluation.latent import active_units, importance_weighted_nll, mutual_information, posteriors
from glmlab.evaluation.likelihood import sum_nll_batches
from glmlab.models.lstm import LSTMLM, LSTMConfig
from glmlab.models.vae import SentenceVAE, VAEConfig, gaussian_kl, log_normal
from glmlab.training.trainer import train

# --- closed forms and bounds on a fixed tiny model -------------------------------------------------------------


def test_gaussian_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.0, 0.0, 0.0], [1.5, -0.5, 0.3], [-2.0, 0.1, 0.7]])
    logvar = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.5, -2.0], [0.8, -0.3, 0.0]])
    z = mu + torch.randn((200_000, *mu.shape), generator=g) * (0.5 * logvar).exp()
    zero = torch.zeros_like(z)
    monte_carlo = (log_normal(z, mu, logvar) - log_normal(z, zero, zero)).mean(0)
    closed = gaussian_kl(mu, logvar).sum(1)
    assert closed[0].item() == pytest.approx(0.0, abs=1e-7)
    assert closed[1:].min() > 0.5  # the non-trivial rows are far from 0: the comparison means something
    assert torch.allclose(monte_carlo, closed, atol=0.02)


def _tiny_vae(latent_dim: int = 2, seed: int = 0) -> SentenceVAE:
    """A random VAE whose posterior is far from the prior and whose decoder depends on z, so the bounds differ."""
    torch.manual_seed(seed)
    model = SentenceVAE(VAEConfig(vocab_size=12, block_size=10, n_embd=8, n_hidden=16, encoder_hidden=8,
                                  latent_dim=latent_dim, dropout=0.0)).eval()
    with torch.no_grad():
        model.to_posterior.bias[:latent_dim] = torch.linspace(-1.0, 1.5, latent_dim)  # mu
        model.to_posterior.bias[latent_dim:] = -1.5  # logvar: narrower than the prior
        model.z_to_state.weight.mul_(4.0)
        model.decoder.lstm.weight_ih_l0[:, -latent_dim:].mul_(4.0)  # z concatenated to every input
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three sentences (words 4..11, then <eos>=3) as x = <bos> w.., y = w.. <eos>, padded."""
    sentences = [[5, 6, 7], [8, 4, 9, 10, 11, 6], [7]]
    width = max(len(s) for s in sentences) + 1
    x = torch.zeros((len(sentences), width), dtype=torch.long)
    y = torch.full((len(sentences), width), IGNORE_INDEX, dtype=torch.long)
    for row, words in enumerate(sentences):
        y[row, :len(words) + 1] = torch.tensor([*words, 3])
        x[row, :len(words) + 1] = torch.tensor([2, *words])
    return x, y


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _iw_mean(model, x, y, k, repeats, seed):
    """Average over ``repeats`` independent estimates of the k-sample bound, per sentence."""
    iw, _ = importance_weighted_nll(model, x.repeat(repeats, 1), y.repeat(repeats, 1), samples=k, chunk=k,
                                    generator=_seeded(seed))
    return iw.view(repeats, x.size(0)).mean(0)


def _exact_nll(model, x, y):
    """-log p(x) of a 1-d latent model by quadrature over z on a fine grid."""
    grid = torch.linspace(-8, 8, 2001)
    step = float(grid[1] - grid[0])
    out = []
    with torch.no_grad():
        for row in range(x.size(0)):
            n = len(grid)
            recon = model.reconstruction_nll(x[row:row + 1].repeat(n, 1), y[row:row + 1].repeat(n, 1), grid[:, None])
            log_joint = -recon - 0.5 * grid ** 2 - 0.5 * math.log(2 * math.pi)
            out.append(-(torch.logsumexp(log_joint, 0) + math.log(step)))
    return torch.stack(out)


def test_iw_bound_with_one_sample_is_the_elbo_in_expectation():
    model, (x, y) = _tiny_vae(), _batch()
    iw1 = _iw_mean(model, x, y, k=1, repeats=3_000, seed=1)  # standard error about 0.02
    # -ELBO with a closed-form KL and the reconstruction term averaged over many z's
    _, elbo = importance_weighted_nll(model, x, y, samples=3_000, chunk=3_000, generator=_seeded(2))
    kl = gaussian_kl(*model.encode(y)).sum(1)
    assert kl.min() > 1.0  # q is far from the prior: a missing or doubled KL term would be seen
    assert torch.allclose(iw1, elbo, atol=0.08)
    iw10 = _iw_mean(model, x, y, k=10, repeats=200, seed=3)
    assert (iw10 < elbo - 0.3).all()  # while more samples give a clearly different (tighter) value


def test_iw_bound_tightens_with_more_samples_and_stays_above_the_exact_nll():
    model, (x, y) = _tiny_vae(latent_dim=1), _batch()
    _, elbo = importance_weighted_nll(model, x, y, samples=3_000, chunk=3_000, generator=_seeded(3))
    iw1 = _iw_mean(model, x, y, k=1, repeats=1_500, seed=4)
    iw10 = _iw_mean(model, x, y, k=10, repeats=300, seed=5)
    iw100 = _iw_mean(model, x, y, k=100, repeats=30, seed=6)
    exact = _exact_nll(model, x, y)
    assert (iw1 > iw10 + 0.1).all() and (iw10 > iw100 + 0.05).all()
    assert torch.allclose(iw1, elbo, atol=0.08)
    assert (iw10 < elbo).all() and (iw100 < elbo).all()
    for bound in (iw1, iw10, iw100):
        assert (bound > exact).all()  # upper bounds on the NLL (in expectation, so on these averages)


def _mixture_vae() -> SentenceVAE:
    """The 1-d tiny VAE with a two-component mixture prior far from N(0, 1)."""
    model = _tiny_vae(latent_dim=1)
    mixture = SentenceVAE(VAEConfig(**{**vars(model.config), "prior": "mixture", "prior_components": 2})).eval()
    mixture.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        mixture.prior_means.copy_(torch.tensor([[-1.5], [2.0]]))
        mixture.prior_logvars.copy_(torch.tensor([[-1.0], [0.5]]))
        mixture.prior_logits.copy_(torch.tensor([0.3, -0.2]))
    return mixture


def test_iw_bound_under_a_mixture_prior_is_the_elbo_at_k1_and_bounds_the_exact_nll():
    model, (x, y) = _mixture_vae(), _batch()
    grid = torch.linspace(-10, 10, 4001)
    with torch.no_grad():
        log_prior = model.log_prior(grid[:, None])
        step = float(grid[1] - grid[0])
        assert math.exp(torch.logsumexp(log_prior, 0) + math.log(step)) == pytest.approx(1.0, abs=1e-4)  # a density
        exact = []
        for row in range(x.size(0)):
            recon = model.reconstruction_nll(x[row:row + 1].repeat(len(grid), 1), y[row:row + 1].repeat(len(grid), 1),
                                             grid[:, None])
            exact.append(-(torch.logsumexp(-recon + log_prior, 0) + math.log(step)))
        exact = torch.stack(exact)
    _, elbo = importance_weighted_nll(model, x, y, samples=3_000, chunk=3_000, generator=_seeded(7))
    iw1 = _iw_mean(model, x, y, k=1, repeats=3_000, seed=8)
    iw100 = _iw_mean(model, x, y, k=100, repeats=30, seed=9)
    assert torch.allclose(iw1, elbo, atol=0.08)  # the ELBO's Monte-Carlo KL matches the k = 1 bound
    assert (iw100 < elbo - 0.05).all() and (iw100 > exact).all()
    standard, _ = importance_weighted_nll(_tiny_vae(latent_dim=1), x, y, samples=100, chunk=100,
                                          generator=_seeded(9))
    assert (standard - iw100).abs().max() > 0.1  # the prior is used: a different model, a different bound


# --- mutual information and active units on constructed posteriors ----------------------------------------------


def test_active_units_count_the_dimensions_whose_mean_varies():
    g = torch.Generator().manual_seed(0)
    mu = torch.zeros(500, 8)
    mu[:, [1, 4, 6]] = torch.randn((500, 3), generator=g)
    mu[:, 0] = 0.05 * torch.randn(500, generator=g)  # variance 0.0025: below the 0.01 threshold
    mu[:, 7] = 3.0  # constant away from 0: not active either
    assert active_units(mu) == 3


def test_collapsed_posterior_has_no_information():
    mu, logvar = torch.zeros(2000, 8), torch.zeros(2000, 8)
    assert active_units(mu) == 0
    assert mutual_information(mu, logvar, torch.Generator().manual_seed(0)) == pytest.approx(0.0, abs=0.1)
    assert float(gaussian_kl(mu, logvar).sum()) == 0.0


def test_distinct_deterministic_posteriors_reach_log_n():
    n = 1000
    mu = 5.0 * torch.randn((n, 4), generator=torch.Generator().manual_seed(0))
    logvar = torch.full((n, 4), -12.0)
    mi = mutual_information(mu, logvar, torch.Generator().manual_seed(1), chunk=128)
    assert mi == pytest.approx(math.log(n), abs=0.2)
    assert active_units(mu) == 4


def test_partly_informative_posteriors_lie_in_between():
    n = 1000
    mu = torch.randn((n, 2), generator=torch.Generator().manual_seed(0))
    logvar = torch.zeros(n, 2)  # signal and noise of equal variance: I = 2 * 0.5 log 2 for Gaussian data
    mi = mutual_information(mu, logvar, torch.Generator().manual_seed(1))
    assert 0.3 < mi < 1.0


# --- padding never counts -------------------------------------------------------------------------------------


def _widen(x, y, extra=4):
    x_wide = torch.cat([x, torch.zeros((x.size(0), extra), dtype=x.dtype)], 1)
    y_wide = torch.cat([y, torch.full((y.size(0), extra), IGNORE_INDEX, dtype=y.dtype)], 1)
    return x_wide, y_wide


def test_padding_changes_no_vae_number():
    model, (x, y) = _tiny_vae(), _batch()
    xw, yw = _widen(x, y)
    with torch.no_grad():
        assert float(model.nll(xw, yw)) == pytest.approx(float(model.nll(x, y)), rel=1e-5)
    iw, elbo = importance_weighted_nll(model, x, y, samples=7, chunk=3, generator=_seeded(0))
    iw_w, elbo_w = importance_weighted_nll(model, xw, yw, samples=7, chunk=3, generator=_seeded(0))
    assert torch.allclose(iw, iw_w, atol=1e-5) and torch.allclose(elbo, elbo_w, atol=1e-5)
    mu, logvar, tokens = posteriors(model, [(x, y)])
    mu_w, logvar_w, tokens_w = posteriors(model, [(xw, yw)])
    assert torch.allclose(mu, mu_w, atol=1e-6) and torch.allclose(logvar, logvar_w, atol=1e-6)
    assert tokens == tokens_w == 3 + 6 + 1 + 3  # words + one <eos> per sentence
    # each sentence scored alone (no padding at all) gives the same per-sentence numbers
    alone = torch.stack([model.encode(y[i:i + 1, :int((y[i] != IGNORE_INDEX).sum())])[0][0] for i in range(3)])
    assert torch.allclose(alone, mu, atol=1e-6)


def test_padding_changes_no_lstm_number():
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=12, block_size=10, n_embd=8, n_hidden=16, dropout=0.0)).eval()
    x, y = _batch()
    nll, count = sum_nll_batches(model, [(x, y)])
    nll_w, count_w = sum_nll_batches(model, [_widen(x, y)])
    assert count == count_w == 13 and nll_w == pytest.approx(nll, rel=1e-6)


# --- glmlab eval on tiny sentence runs ------------------------------------------------------------------------

WORDS = ["the", "a", "cat", "dog", "bird", "sees", "likes", "chases", "big", "small", "red", "old", "house", "tree",
         "park", "runs", "sleeps"]
TINY_SENTENCE_TRAIN = ["train.batch_size=8", "train.max_steps=20", "train.eval_interval=20", "train.log_interval=10",
                       "train.warmup_steps=2", "train.lr=3e-3", "train.sample_tokens=0"]


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def sentence_data(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("sentences")
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(200)]
    (root / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare([root / "text.txt"], root / "data", tokenizer="word", split="0.8,0.1,0.1", sentences=True)
    return root / "data"


@pytest.fixture(scope="module")
def vae_run(sentence_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    config = resolve_config({}, ["model.family=vae", "model.n_embd=16", "model.n_hidden=32", "model.encoder_hidden=16",
                                 "model.latent_dim=4", "model.block_size=16", "model.dropout=0.0",
                                 *TINY_SENTENCE_TRAIN])
    train(config, sentence_data, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def lstm_run(sentence_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lstm"
    config = resolve_config({}, ["model.family=lstm", "model.n_embd=16", "model.n_hidden=32", "model.block_size=16",
                                 "model.dropout=0.0", "train.batching=sentences", *TINY_SENTENCE_TRAIN])
    train(config, sentence_data, out, show_progress=False)
    return out


def _val_counts(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    return meta["splits"]["val"]["documents"], meta["splits"]["val"]["tokens"]


class _IdentityEncoder(torch.nn.Module):
    """A stand-in for a vae whose posterior mean spells the sentence's ids, so a "reconstruction" can be read back."""

    block_size = 16
    config = None

    def encode(self, y):
        mu = torch.nn.functional.pad(y.clamp_min(0), (0, self.block_size - y.size(1))).float()
        return mu, torch.zeros(mu.shape)

    def given(self, z):
        return types.SimpleNamespace(z=z)


def test_reconstruction_bleu_pairs_each_reconstruction_with_its_own_sentence(sentence_data, monkeypatch):
    from glmlab.data.dataset import open_data_dir
    from glmlab.data.sentences import find_sentences
    from glmlab.evaluation.report import reconstruction_bleu, sentence_words
    from glmlab.generation.engine import Completion

    tok = open_data_dir(sentence_data).tokenizer
    assert sentence_words(tok, [*tok.encode("the red cat"), tok.unk_id, tok.eos_id, tok.pad_id]) == [
        "the", "red", "cat", "<unk>"]
    # four words or more each: nltk counts a sentence too short for 4-grams as 0 of 1 matches, even when perfect
    lines = ["the cat sees a dog", "a red house is old", "the old bird runs in the park", "a tree likes the cat"]
    ids = [i for line in lines for i in [*tok.encode(line), tok.eos_id]]
    sentences = find_sentences(torch.tensor(ids).numpy(), tok.eos_id, 16)
    corrupt = {}

    def fake_generate(decoder, tokenizer, prompts, settings):  # "decode" z back into the ids it spells
        rows = [[int(v) for v in z if v > 0] for z in decoder.z]
        rows = [[corrupt.get(i, i) for i in row] for row in rows]
        return [[Completion("", row, "stop", 0)] for row in rows]

    monkeypatch.setattr("glmlab.generation.generate.generate_batch", fake_generate)
    assert reconstruction_bleu(_IdentityEncoder(), tok, sentences, limit=10, batch_size=3) == (100.0, 4)
    corrupt[tok.encode("cat")[0]] = tok.encode("dog")[0]
    bleu, count = reconstruction_bleu(_IdentityEncoder(), tok, sentences, limit=3, batch_size=2)
    assert count == 3 and 30 < bleu < 100


def test_eval_vae_reports_every_labelled_metric(capsys, vae_run, sentence_data):
    code, out, _ = run_cli(capsys, "eval", vae_run, "--samples", "5", "--bleu-sentences", "8")
    assert code == 0
    for label in ("NLL (importance-weighted, k=5)", "ELBO-NLL", "PPL", "KL(q(z|x) || p(z))",
                  "mutual information I(x;z)", "estimated over the", "active units", "/ 4",
                  "reconstruction BLEU-4", "first 8 sentences", "nats/sentence", "nats/token", "<eos> included"):
        assert label in out, label
    code, out, _ = run_cli(capsys, "eval", vae_run, "--samples", "5", "--bleu-sentences", "8", "--json")
    report = json.loads(out)
    sentences, tokens = _val_counts(sentence_data)
    assert code == 0 and report["sentences"] == sentences and report["tokens"] == tokens
    assert report["nll_kind"] == "importance-weighted" and report["iw_samples"] == 5
    assert report["perplexity"] == pytest.approx(math.exp(report["nll"] / report["tokens"]), rel=1e-9)
    assert report["nll_per_sentence"] == pytest.approx(report["nll"] / sentences)
    assert report["nll_per_token"] == pytest.approx(report["nll"] / tokens)
    # the IW bound is below the ELBO in expectation; with k=5 and a closed-form KL only roughly so
    assert report["nll"] <= report["elbo_nll"] * 1.02 and report["kl_per_sentence"] >= 0
    assert 0 <= report["active_units"] <= report["latent_dim"] == 4
    assert report["mutual_info"] <= math.log(sentences) + 0.1
    assert 0 <= report["bleu"] <= 100 and report["bleu_sentences"] == 8
    code, again, _ = run_cli(capsys, "eval", vae_run, "--samples", "5", "--bleu-sentences", "8", "--json")
    assert again == out  # deterministic for a seed
    code, other, _ = run_cli(capsys, "eval", vae_run, "--samples", "5", "--bleu-sentences", "0", "--seed", "1",
                             "--json")
    other = json.loads(other)
    assert other["nll"] != report["nll"] and other["bleu"] is None


def test_eval_lstm_sentence_run_reports_the_exact_nll(capsys, lstm_run, sentence_data):
    import glmlab
    from glmlab.data.dataset import open_data_dir

    code, out, _ = run_cli(capsys, "eval", lstm_run, "--json")
    report = json.loads(out)
    sentences, tokens = _val_counts(sentence_data)
    assert code == 0 and report["nll_kind"] == "exact" and report["iw_samples"] is None
    assert report["sentences"] == sentences and report["tokens"] == tokens and report["mutual_info"] is None
    assert report["perplexity"] == pytest.approx(math.exp(report["nll_per_token"]), rel=1e-9)
    # the same NLL scoring each sentence alone, <bos> w.. -> w.. <eos>, no padding anywhere
    model, tok = glmlab.load(lstm_run)
    stream = open_data_dir(sentence_data).tokens("val").tolist()
    total, start = 0.0, 0
    for end in [i for i, t in enumerate(stream) if t == tok.eos_id]:
        ids = stream[start:end + 1]
        x, y = torch.tensor([[tok.bos_id, *ids[:-1]]]), torch.tensor([ids])
        with torch.no_grad():
            total += float(model.nll(x, y))
        start = end + 1
    assert report["nll"] == pytest.approx(total, rel=1e-5)
    code, out, _ = run_cli(capsys, "eval", lstm_run)
    assert "NLL (exact)" in out and "PPL" in out and "importance" not in out and "BLEU" not in out


def test_eval_sentence_file_reads_one_sentence_per_line(capsys, vae_run, tmp_path):
    text = tmp_path / "three.txt"
    text.write_text("the cat sees a dog\n\n  the bird runs  \nred house\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "eval", vae_run, "--file", text, "--samples", "3", "--json")
    report = json.loads(out)
    assert code == 0 and report["sentences"] == 3 and report["tokens"] == 5 + 3 + 2 + 3
    assert report["target"] == str(text)


def test_eval_sentence_run_mistakes(capsys, vae_run):
    code, _, err = run_cli(capsys, "eval", vae_run, "--samples", "0")
    assert code == 1 and "--samples 0" in err and "fix:" in err
    code, _, err = run_cli(capsys, "eval", vae_run, "--bleu-sentences", "-1")
    assert code == 1 and "--bleu-sentences" in err and "fix:" in err
    code, _, err = run_cli(capsys, "eval", vae_run, "--stride", "4")
    assert code == 1 and "--stride" in err and "fix:" in err
