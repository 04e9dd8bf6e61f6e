"""Starting from existing weights: `glmlab prepare --tokenizer-from` and `glmlab train --init`, against a tiny
random GPT-2 built by transformers (one glmlab step equals one transformers step on the same batch) and from a
glmlab run; the architecture, the tokenizer and the source are checked."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from glmlab.cli import main
from glmlab.data.dataset import RandomWindows, open_data_dir
from glmlab.runs import load_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
ONE_STEP = ["train.max_steps=1", "train.warmup_steps=0", "train.lr_schedule=constant", "train.lr=1e-2",
            "train.batch_size=4", "train.eval_interval=1", "train.eval_tokens=256", "train.sample_tokens=0",
            "train.seed=7", "model.dropout=0.0", "train.precision=fp32"]  # compared at fp32 rounding


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out + err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, shakespeare_excerpt):
    """A random tiny GPT-2 as transformers saves it, with a byte-level BPE tokenizer (tokenizer.json and
    tokenizer_config.json, GPT-2's <|endoftext|> as eos, bos and unk), 64 positions."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([shakespeare_excerpt.read_text()], vocab_size=400, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                               bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=eos,
        eos_token_id=eos, resid_pdrop=0.1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory, hf_dir, shakespeare_excerpt):
    out = tmp_path_factory.mktemp("data") / "gpt2-tokens"
    assert main(["prepare", str(shakespeare_excerpt), "--out", str(out), "--tokenizer-from", str(hf_dir)]) == 0
    return out


def test_prepare_encodes_with_the_hf_tokenizer_and_records_its_roles(hf_dir, hf_data, shakespeare_excerpt):
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    data = open_data_dir(hf_data)
    meta = json.loads((hf_data / "meta.json").read_text())
    assert meta["tokenizer_from"] == str(hf_dir.resolve())
    assert meta["special_token_roles"] == {"eos": "<|endoftext|>", "bos": "<|endoftext|>"}  # unk: not eos twice
    assert data.tokenizer.eos_id == hf_tok.eos_token_id and meta["vocab_size"] == len(hf_tok)
    assert meta["splits"]["train"]["unk_tokens"] == 0  # document ends are not counted as unknown
    train = data.tokens("train").tolist()
    first_line = shakespeare_excerpt.read_text().split("\n")[0]
    assert train[: len(hf_tok.encode(first_line))] == hf_tok.encode(first_line)
    assert train.count(hf_tok.eos_token_id) == meta["splits"]["train"]["documents"]


def test_one_step_from_hf_gpt2_equals_a_transformers_step(capsys, hf_dir, hf_data, tmp_path):
    run = tmp_path / "run"
    code, out = cli(capsys, "train", "--data", hf_data, "--out", run, "--init", hf_dir, "model.block_size=32",
                    *ONE_STEP)
    assert code == 0, out
    raw = json.loads((run / "config.json").read_text())
    assert raw["init"] == {"from": str(hf_dir.resolve()), "kind": "hf"}
    assert raw["model"]["n_layer"] == 2 and raw["model"]["n_embd"] == 32 and raw["model"]["block_size"] == 32
    assert raw["special_tokens"]["eos"] == "<|endoftext|>"
    step0 = load_file(str(run / "checkpoints" / "step-00000000" / "model.safetensors"))
    step1 = load_file(str(run / "checkpoints" / "step-00000001" / "model.safetensors"))

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    before = hf.state_dict()
    assert torch.equal(step0["transformer.wpe.weight"], before["transformer.wpe.weight"][:32])  # the cut table
    assert torch.equal(step0["transformer.h.1.mlp.c_fc.weight"], before["transformer.h.1.mlp.c_fc.weight"])
    data = open_data_dir(hf_data)
    x, y = RandomWindows(data.tokens("train"), 32, 4, 7).next_batch()  # the run's first batch
    hf.train()
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.99))
    logits = hf(x).logits
    F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    optimizer.step()
    after = hf.state_dict()
    moved = 0.0
    for name, ours in step1.items():
        if name == "lm_head.weight" or name not in after:
            continue
        theirs = after[name][:32] if name == "transformer.wpe.weight" else after[name]
        start = step0[name]
        if name.endswith("attn.c_attn.bias"):  # not the key bias: its gradient is 0 in exact arithmetic (the
            # softmax ignores it), and Adam's first step turns the rounding noise left in it into +-lr
            query_value = [*range(32), *range(64, 96)]
            ours, theirs, start = ours[query_value], theirs[query_value], start[query_value]
        assert torch.allclose(ours, theirs, atol=2e-6, rtol=1e-4), name
        moved = max(moved, float((ours - start).abs().max()))
    assert moved > 1e-3  # the step changed the weights, so the comparison means something


def test_generating_from_the_continued_run_uses_gpt2s_end_token(capsys, hf_dir, hf_data, tmp_path):
    run = tmp_path / "run"
    assert cli(capsys, "train", "--data", hf_data, "--out", run, "--init", hf_dir, "model.block_size=32",
               *ONE_STEP)[0] == 0
    loaded = load_run(run)
    assert loaded.tokenizer.eos_id == transformers.AutoTokenizer.from_pretrained(hf_dir).eos_token_id
    code, out = cli(capsys, "generate", run, "--prompt", "First Citizen", "--max-new-tokens", "5", "--seed", "1")
    assert code == 0 and "First Citizen" in out


def test_continuing_a_glmlab_run_starts_from_its_weights_and_keeps_them_for_a_resume(capsys, trained_run,
                                                                                   shakespeare_excerpt, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert cli(capsys, "prepare", shakespeare_excerpt, "--out", data, "--tokenizer-from", trained_run)[0] == 0
    assert (data / "tokenizer.json").read_text() == (trained_run / "tokenizer.json").read_text()
    code, out = cli(capsys, "train", "--data", data, "--out", run, "--init", trained_run, "train.max_steps=3",
                    "train.eval_interval=100", "train.sample_tokens=0", "train.batch_size=4")
    assert code == 0, out
    assert "starting from the weights of" in out
    source = load_file(str(trained_run / "best" / "model.safetensors"))
    step0 = load_file(str(run / "checkpoints" / "step-00000000" / "model.safetensors"))
    assert all(torch.equal(step0[name], tensor) for name, tensor in source.items())
    raw = json.loads((run / "config.json").read_text())
    assert raw["init"]["kind"] == "run" and "special_tokens" not in raw  # glmlab's own tokenizer
    source_model = json.loads((trained_run / "config.json").read_text())["model"]
    assert {k: raw["model"][k] for k in ("n_layer", "n_embd", "n_head", "block_size")} == \
        {k: source_model[k] for k in ("n_layer", "n_embd", "n_head", "block_size")}


def test_refusals(capsys, hf_dir, hf_data, trained_run, char_data, shakespeare_excerpt, tmp_path):
    def refused(*args) -> str:
        code, out = cli(capsys, *args)
        assert code == 1
        return out

    out = refused("train", "--data", hf_data, "--out", tmp_path / "a", "--init", hf_dir, "model.n_layer=3")
    assert "model.n_layer=3" in out and "keeps its architecture" in out and not (tmp_path / "a").exists()
    out = refused("train", "--data", hf_data, "--out", tmp_path / "b", "--init", hf_dir, "model.block_size=128")
    assert "model.block_size=128" in out  # more positions than the source learnt
    out = refused("train", "--data", hf_data, "--out", tmp_path / "c", "--init", hf_dir, "model.family=lstm")
    assert "model.family=lstm" in out
    out = refused("train", "--data", char_data, "--out", tmp_path / "d", "--init", hf_dir)
    assert "another tokenizer" in out and f"--tokenizer-from {hf_dir}" in out
    out = refused("train", "--data", hf_data, "--out", tmp_path / "e", "--init", char_data)
    assert "data directory" in out and "no weights" in out
    out = refused("train", "--data", hf_data, "--out", tmp_path / "f", "--init", tmp_path / "missing")
    assert "is not a directory" in out
    (tmp_path / "empty").mkdir()
    out = refused("prepare", shakespeare_excerpt, "--out", tmp_path / "g", "--tokenizer-from", tmp_path / "empty")
    assert "holds no tokenizer" in out
    out = refused("prepare", shakespeare_excerpt, "--out", tmp_path / "h", "--tokenizer-from", hf_dir,
                  "--tokenizer", "bpe")
    assert "--tokenizer" in out and "--tokenizer-from" in out
    out = refused("train", "--resume", "--out", trained_run, "--init", hf_dir)
    assert "--init cannot be combined with --resume" in out
    out = refused("train", "--data", hf_data, "--out", tmp_path / "i", "--init", hf_dir, "--init-checkpoint", "last")
    assert "--init-checkpoint" in out


def test_classifying_with_gpt2s_tokenizer_pools_at_each_texts_end(capsys, hf_dir, hf_data, tmp_path):
    """GPT-2's tokenizer has no pad token: rows are padded with <|endoftext|>, the token each text also ends with,
    so the classifier's last real token is the first of the trailing run, not the last non-pad one (and not a
    crash on a missing pad id)."""
    from glmlab.finetune import load_classifier
    from glmlab.finetune.examples import encode_texts
    from tests.finetune.conftest import write_task

    run = tmp_path / "run"
    assert cli(capsys, "train", "--data", hf_data, "--out", run, "--init", hf_dir, "model.block_size=32",
               *ONE_STEP)[0] == 0
    train_tsv, val_tsv = write_task(tmp_path / "train.tsv", 120, 0), write_task(tmp_path / "val.tsv", 40, 1)
    code, out = cli(capsys, "finetune", "classify", "--init", run, "--train", train_tsv, "--val", val_tsv, "--out",
                    tmp_path / "cls", "--quiet", "train.max_steps=60", "train.eval_interval=60", "train.lr=3e-3",
                    "train.batch_size=16", "train.threads=1")
    assert code == 0, out
    classifier = load_classifier(tmp_path / "cls")
    texts = ["good", "the king and evil night", "fair"]
    ids, _ = encode_texts(classifier.tokenizer, texts, 32, classifier.bos)
    eos = classifier.tokenizer.eos_id
    assert all(row[-1] == eos for row in ids)
    width = max(map(len, ids))
    x = torch.tensor([row + [eos] * (width - len(row)) for row in ids])
    assert classifier.model.real_tokens(x).sum(1).tolist() == [len(row) for row in ids]
    accuracy = json.loads((tmp_path / "cls" / "results.json").read_text())["val"]["accuracy"]
    assert accuracy >= 0.75  # 'good' vs 'evil' is learnt through the pooled end token
    together = classifier.predict(texts)  # padded to the longest text: the same as each read alone
    for text, prediction in zip(texts, together, strict=True):
        alone = classifier.predict([text])[0].probabilities
        assert prediction.probabilities == pytest.approx(alone, abs=1e-5)
