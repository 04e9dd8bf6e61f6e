"""GPT-2 checkpoints in and out, against transformers itself (random tiny models, nothing downloaded)."""

import json

import pytest
import torch

from glmlab.cli import main
from glmlab.errors import GlmlabError
from glmlab.generation.chat import render_chat
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.interop.hf_gpt2 import export_hf, import_hf
from glmlab.runs import load_run

transformers = pytest.importorskip("transformers")
TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs.\n" * 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT-2 saved by transformers, with a byte-level BPE tokenizer as vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    out.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(out))
    eos = bpe.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=eos,
        eos_token_id=eos))
    model.save_pretrained(out)
    return out


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_import_matches_transformers_logits_and_greedy_tokens(hf_dir, tmp_path):
    run = load_run(import_hf(hf_dir, tmp_path / "run"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = run.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0]
    assert (ours - _hf_logits(hf, ids)).abs().max() < 1e-4
    completion = generate_batch(run.model, run.tokenizer, [ids], GenerationSettings(max_new_tokens=20,
                                                                                   temperature=0))[0][0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=0)[0]
    body = theirs[len(ids):].tolist()
    if run.tokenizer.eos_id in body:
        body = body[: body.index(run.tokenizer.eos_id)]
    assert completion.token_ids == body
    assert run.tokenizer.eos_id == run.tokenizer.hf.token_to_id("<|endoftext|>")


def test_round_trip_through_export(hf_dir, tmp_path):
    run_dir = import_hf(hf_dir, tmp_path / "run")
    out = export_hf(run_dir, tmp_path / "exported")
    original = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Pack my box")["input_ids"]
    assert ids == load_run(run_dir).tokenizer.encode("Pack my box")
    assert (_hf_logits(again, ids) - _hf_logits(original, ids)).abs().max() < 1e-5
    assert tokenizer.eos_token == "<|endoftext|>"


def test_a_glmlab_char_run_exports_with_its_tokenizer(trained_run, tmp_path):
    out = export_hf(trained_run, tmp_path / "hf")
    run = load_run(trained_run)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("First Citizen")["input_ids"]
    assert ids == run.tokenizer.encode("First Citizen")
    with torch.no_grad():
        assert (run.model(torch.tensor([ids]))[0] - hf(torch.tensor([ids])).logits[0]).abs().max() < 1e-4
    assert tokenizer.decode(ids) == "First Citizen"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == run.tokenizer.eos_id


def test_the_declared_start_token_is_the_one_the_run_read(trained_run, char_data, tmp_path):
    """A gpt of running text read <eos> between documents, a sentence-level one <bos> before each sentence:
    export-hf declares that token as bos (lm-evaluation-harness prefixes rolling windows with it)."""
    from glmlab.training.trainer import train
    from tests.conftest import tiny_config

    sentences = train(tiny_config("train.max_steps=2", "train.batching=sentences"), char_data, tmp_path / "s",
                      show_progress=False).run_dir
    for run_dir, start in ((trained_run, "<eos>"), (sentences, "<bos>")):
        out = export_hf(run_dir, tmp_path / f"hf-{start[1:-1]}")
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        assert tokenizer.bos_token == start and config["bos_token_id"] == tokenizer.convert_tokens_to_ids(start)
        assert json.loads((out / "generation_config.json").read_text())["bos_token_id"] == config["bos_token_id"]
        assert tokenizer.eos_token == "<eos>" and tokenizer.decode(tokenizer("a  b .")["input_ids"]) == "a  b ."
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        render_chat(messages)  # transformers renders chat as glmlab serve does


def test_pytorch_bin_and_errors(hf_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    shutil.copytree(hf_dir, legacy)
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    assert main(["import-hf", str(legacy), "--out", str(tmp_path / "run")]) == 0
    assert main(["import-hf", str(legacy), "--out", str(tmp_path / "run")]) == 1  # exists: refused
    assert "already holds a run" in capsys.readouterr().err
    (legacy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GlmlabError, match="llama"):
        import_hf(legacy, tmp_path / "other")
    with pytest.raises(GlmlabError, match="not a directory"):
        import_hf(tmp_path / "missing", tmp_path / "other")


def test_export_refuses_to_overwrite(trained_run, tmp_path):
    with pytest.raises(GlmlabError, match="already holds"):
        export_hf(trained_run, trained_run)
    export_hf(trained_run, tmp_path / "hf")
    with pytest.raises(GlmlabError, match="already holds"):
        export_hf(trained_run, tmp_path / "hf")


def test_an_imported_model_cannot_be_resumed_as_training(hf_dir, tmp_path, capsys):
    run = import_hf(hf_dir, tmp_path / "run")
    assert main(["train", "--resume", "--out", str(run)]) == 1
    assert "does not say which data" in capsys.readouterr().err


def test_a_run_without_biases_exports_with_zero_biases(char_data, tmp_path):
    from glmlab.training.trainer import train
    from tests.conftest import tiny_config

    result = train(tiny_config("train.max_steps=2", "model.bias=false"), char_data, tmp_path / "run",
                   show_progress=False)
    out = export_hf(result.run_dir, tmp_path / "hf")
    run = load_run(result.run_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = run.tokenizer.encode("First Citizen")
    with torch.no_grad():
        assert (run.model(torch.tensor([ids]))[0] - hf(torch.tensor([ids])).logits[0]).abs().max() < 1e-4


def test_an_exact_gelu_gpt2_round_trips_with_its_activation(hf_dir, tmp_path):
    """activation_function "gelu" (the erf GELU, nanoGPT's) imports as model.activation=gelu, computes what
    transformers computes, and exports as "gelu" again; with GPT-2's tanh GELU the logits would differ."""
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu",
        **{k: json.loads((hf_dir / "config.json").read_text())[k] for k in ("bos_token_id", "eos_token_id")})).eval()
    with torch.no_grad():  # pre-activations well away from 0, where the two GELUs part
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    source = tmp_path / "exact"
    hf.save_pretrained(source)
    for name in ("vocab.json", "merges.txt"):
        (source / name).write_bytes((hf_dir / name).read_bytes())
    run = load_run(import_hf(source, tmp_path / "run"))
    assert run.model.config.activation == "gelu"
    ids = run.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0]
        hf.config.activation_function = "gelu_new"
        tanh = transformers.GPT2LMHeadModel(hf.config).eval()
        tanh.load_state_dict(hf.state_dict())
    assert (ours - _hf_logits(hf, ids)).abs().max() < 1e-4
    assert (ours - _hf_logits(tanh, ids)).abs().max() > 1e-3
    out = export_hf(tmp_path / "run", tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert (_hf_logits(again, ids) - ours).abs().max() < 1e-4
