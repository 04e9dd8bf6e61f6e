"""A sentence VAE's latent tools (sample from the prior, reconstruct, interpolate), in Python and on the CLI."""

import json
import shutil

import pytest
import torch

from glmlab.cli import main
from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.data.tokenizer import train_char, train_word
from glmlab.errors import EncodingError, GlmlabError
from glmlab.generation.latent import decode_latents, interpolate, reconstruct, sample_prior
from glmlab.generation.settings import GenerationSettings
from glmlab.models import build_model
from glmlab.models.lstm import LSTMLM, LSTMConfig
from glmlab.models.vae import SentenceVAE, VAEConfig
from glmlab.runs import TOKENIZER, load_run, save_weights
from glmlab.training.trainer import train

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "my friend likes green tea", "we saw a big red bus",
             "birds fly over the old town", "she reads books at night"]
START, END = SENTENCES[0], SENTENCES[1]


def tiny_vae(tokenizer) -> SentenceVAE:
    """A random tiny VAE whose codes and decodes depend strongly on z (scaled-up weights), in eval mode."""
    torch.manual_seed(1)
    model = SentenceVAE(VAEConfig(vocab_size=tokenizer.vocab_size, block_size=12, n_embd=16, n_hidden=32,
                                  encoder_hidden=16, latent_dim=4, dropout=0.0)).eval()
    with torch.no_grad():
        model.to_posterior.weight.mul_(20)
        model.z_to_state.weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def word():
    tok = train_word(SENTENCES, 100)
    return tiny_vae(tok), tok


def test_sample_prior_is_reproducible_and_depends_on_the_seed(word):
    model, tok = word
    sampled = GenerationSettings(temperature=1.0, seed=0)
    assert sample_prior(model, tok, 3, seed=0, settings=sampled) == sample_prior(model, tok, 3, seed=0,
                                                                                  settings=sampled)
    assert sample_prior(model, tok, 3, seed=0, settings=sampled) != sample_prior(
        model, tok, 3, seed=1, settings=GenerationSettings(temperature=1.0, seed=1))
    greedy = sample_prior(model, tok, 4, seed=0)  # greedy by default: the variety comes from z
    assert greedy == sample_prior(model, tok, 4, seed=0) and greedy != sample_prior(model, tok, 4, seed=1)
    assert len(greedy) == 4 and all(len(s.split()) <= model.block_size - 1 for s in greedy)
    assert not model.training


def test_rows_sampled_with_one_seed_draw_different_words(word):
    model, tok = word
    z = torch.zeros(3, model.latent_dim)  # the same z three times: only word sampling tells the rows apart
    texts = decode_latents(model, tok, z, GenerationSettings(temperature=1.0, seed=3, stop_at_eos=False))
    assert len(set(texts)) == 3
    assert texts == decode_latents(model, tok, z, GenerationSettings(temperature=1.0, seed=3, stop_at_eos=False))


def test_interpolation_runs_from_one_reconstruction_to_the_other(word):
    model, tok = word
    start, end = reconstruct(model, tok, [START, END])
    assert start != end  # so the ends below are told apart
    path = interpolate(model, tok, START, END, steps=5)
    assert len(path) == 5 and path[0] == start and path[-1] == end
    assert interpolate(model, tok, START, END, steps=2) == [start, end]


def test_reconstruct_by_sampling_q_is_seeded(word):
    model, tok = word
    one = reconstruct(model, tok, SENTENCES, sample=True, seed=1)
    assert one == reconstruct(model, tok, SENTENCES, sample=True, seed=1)
    assert one != reconstruct(model, tok, SENTENCES, sample=True, seed=2)


def test_beam_search_decodes_each_z_in_order(word):
    model, tok = word
    beams = GenerationSettings(num_beams=3, temperature=0.0)
    together = reconstruct(model, tok, SENTENCES[:3], settings=beams)
    assert together == [reconstruct(model, tok, [s], settings=beams)[0] for s in SENTENCES[:3]]
    assert len(set(together)) > 1
    assert interpolate(model, tok, START, END, steps=3, settings=beams)[0] == together[0]


def test_mistakes_are_clear_errors(word):
    model, tok = word
    torch.manual_seed(0)
    lstm = LSTMLM(LSTMConfig(vocab_size=tok.vocab_size, n_embd=8, n_hidden=8))
    with pytest.raises(GlmlabError, match="need a vae run, and this run's family is lstm"):
        sample_prior(lstm, tok, 2)
    with pytest.raises(GlmlabError, match="need a vae run"):
        reconstruct(lstm, tok, [START])
    with pytest.raises(GlmlabError, match="--steps 1"):
        interpolate(model, tok, START, END, steps=1)
    with pytest.raises(GlmlabError, match="asked for 0 samples"):
        sample_prior(model, tok, 0)
    with pytest.raises(GlmlabError, match="empty sentence"):
        reconstruct(model, tok, [START, "   "])
    with pytest.raises(GlmlabError, match="no sentences"):
        reconstruct(model, tok, [])
    with pytest.raises(GlmlabError, match="num_beams=0"):
        reconstruct(model, tok, [START], settings=GenerationSettings(num_beams=0))


def test_unknown_words_become_unk_but_unknown_characters_are_refused(word):
    model, tok = word
    with pytest.warns(UserWarning, match="'zebra'.*<unk>|<unk>.*'zebra'"):
        [out] = reconstruct(model, tok, ["the zebra sat on the mat"])
    assert isinstance(out, str)
    chars = train_char(SENTENCES)
    char_model = tiny_vae(chars)
    with pytest.raises(EncodingError, match="'Z'"):
        reconstruct(char_model, chars, ["the Zoo"])
    assert len(reconstruct(char_model, chars, ["the cat"])) == 1


# --- a trained run, through glmlab.load and the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, shakespeare_excerpt):
    """A tiny vae trained for a few steps on Shakespeare's lines (word tokenizer, sentence mode)."""
    base = tmp_path_factory.mktemp("vae")
    prepare([shakespeare_excerpt], base / "data", tokenizer="word", vocab_size=500, sentences=True)
    config = resolve_config({}, ["model.family=vae", "model.block_size=12", "model.n_embd=16", "model.n_hidden=32",
                                 "model.encoder_hidden=16", "model.latent_dim=4", "model.dropout=0.0",
                                 "model.word_dropout=0.3", "train.batch_size=8", "train.max_steps=6",
                                 "train.eval_interval=6", "train.eval_tokens=300", "train.sample_tokens=0",
                                 "train.warmup_steps=0"])
    train(config, base / "data", base / "run", show_progress=False)
    return base / "run"


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory, vae_run):
    """A run directory of another family (an untrained lstm)."""
    out = tmp_path_factory.mktemp("lstm")
    raw = json.loads((vae_run / "config.json").read_text())
    config = resolve_config({}, ["model.family=lstm", f"model.vocab_size={raw['model']['vocab_size']}",
                                 "model.n_embd=8", "model.n_hidden=8"])
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    shutil.copy(vae_run / TOKENIZER, out / TOKENIZER)
    save_weights(build_model(config.model), out / "model.safetensors")
    return out


def cli(capsys, *args):
    code = main(["vae", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out.splitlines(), err


def test_loaded_run_methods(vae_run):
    run = load_run(vae_run)
    model, tok = run
    assert run.sample_prior(3, seed=2) == sample_prior(model, tok, 3, seed=2,
                                                         settings=GenerationSettings(temperature=1.0, seed=2))
    assert run.sample_prior(2, seed=2, temperature=0) == sample_prior(model, tok, 2, seed=2)
    line = "I will not"
    assert run.reconstruct(line) == run.reconstruct([line]) == reconstruct(model, tok, [line])
    path = run.interpolate(line, "you are my lord", steps=3, num_beams=2)
    assert len(path) == 3 and path[0] == reconstruct(model, tok, [line], settings=GenerationSettings(num_beams=2))[0]
    assert not model.training


def test_cli_sample(capsys, vae_run):
    code, lines, _ = cli(capsys, "sample", vae_run, "-n", 3, "--seed", 4, "--max-new-tokens", 6)
    assert code == 0 and len(lines) == 3 and all(len(line.split()) <= 6 for line in lines)
    assert cli(capsys, "sample", vae_run, "-n", 3, "--seed", 4, "--max-new-tokens", 6)[1] == lines
    assert cli(capsys, "sample", vae_run, "-n", 3, "--seed", 5, "--max-new-tokens", 6)[1] != lines
    code, greedy, _ = cli(capsys, "sample", vae_run, "-n", 2, "--seed", 1, "--temperature", 0, "--checkpoint", "last",
                          "--device", "cpu")
    expected = load_run(vae_run, checkpoint="last").sample_prior(2, seed=1, temperature=0)
    assert code == 0 and greedy == expected


def test_cli_reconstruct_and_interpolate(capsys, vae_run, tmp_path):
    code, lines, err = cli(capsys, "reconstruct", vae_run, "--text", "I will not", "--text", "Qwxz the king")
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("I will not -> ") and lines[1].startswith("Qwxz the king -> ")
    assert "note:" in err and "'Qwxz'" in err
    first = lines[0].split(" -> ", 1)[1]
    file = tmp_path / "s.txt"
    file.write_text("I will not\n\n   \nyou are my lord\n", encoding="utf-8")
    code, lines, _ = cli(capsys, "reconstruct", vae_run, "--file", file, "--num-beams", 2)
    assert code == 0 and [line.split(" -> ")[0] for line in lines] == ["I will not", "you are my lord"]
    code, lines, _ = cli(capsys, "reconstruct", vae_run, "--file", file, "--sample", "--seed", 3)
    assert code == 0 and len(lines) == 2

    code, lines, _ = cli(capsys, "interpolate", vae_run, "--start", "I will not", "--end", "you are my lord",
                         "--steps", 4)
    assert code == 0 and len(lines) == 4
    assert [line.split()[:2] for line in lines] == [["1", "t=0.00"], ["2", "t=0.33"], ["3", "t=0.67"],
                                                    ["4", "t=1.00"]]
    assert lines[0] == f"1  t=0.00  {first}"  # greedy, like reconstruct: the path starts at its reconstruction


@pytest.mark.parametrize(("args", "problem"), [
    (["sample", "{vae}", "-n", "0"], "asked for 0 samples"),
    (["sample", "{vae}", "--temperature", "-1"], "temperature=-1.0"),
    (["sample", "{vae}", "--num-beams", "0"], "num_beams=0"),
    (["sample", "{lstm}"], "need a vae run, and this run's family is lstm"),
    (["sample", "{missing}"], "does not exist"),
    (["interpolate", "{vae}", "--start", "you are my lord", "--end", "First", "--steps", "1"], "--steps 1"),
    (["reconstruct", "{vae}", "--text", " "], "empty sentence"),
    (["reconstruct", "{vae}", "--file", "{missing}"], "does not exist"),
    (["reconstruct", "{vae}", "--file", "{blank}"], "holds no sentences"),
])
def test_cli_mistakes_are_one_line_errors(capsys, vae_run, lstm_run, tmp_path, args, problem):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    paths = {"vae": vae_run, "lstm": lstm_run, "missing": tmp_path / "nope", "blank": blank}
    code, lines, err = cli(capsys, *[a.format(**{k: str(v) for k, v in paths.items()}) for a in args])
    assert code == 1 and lines == []
    message = err.splitlines()
    assert message[0].startswith("glmlab vae: error: ") and problem in message[0]
    assert len(message) == 2 and message[1].startswith("  fix: ")
