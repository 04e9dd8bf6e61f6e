"""`glmlab compare`: tiny lstm / vae runs on one word-level sentence dataset, the report files, the labels of
each NLL, the numbers `glmlab eval` gives, the samples, and the refusals."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from glmlab.cli import main
from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.errors import GlmlabError
from glmlab.evaluation import compare
from glmlab.evaluation.compare import compare_runs, generate_samples
from glmlab.evaluation.compare_report import markdown, write_report
from glmlab.evaluation.report import evaluate_run
from glmlab.generation.latent import sample_prior
from glmlab.generation.settings import GenerationSettings
from glmlab.runs import load_run
from glmlab.training.trainer import train

TOPICS = {
    "sea": "ship sail wave boat harbor captain storm anchor",
    "farm": "cow field barn tractor wheat farmer hay goat",
    "city": "car street tower subway traffic office taxi bridge",
}
TRAIN = ["model.n_embd=16", "model.n_hidden=32", "model.block_size=16", "model.dropout=0.0", "train.batch_size=8",
         "train.max_steps=20", "train.eval_interval=10", "train.log_interval=5", "train.warmup_steps=2",
         "train.lr=1e-2", "train.sample_tokens=0", "train.eval_tokens=0", "train.threads=1"]
LSTM = ["model.family=lstm", *TRAIN]
VAE = ["model.family=vae", "model.encoder_hidden=16", "model.latent_dim=4", *TRAIN]
PNG = b"\x89PNG\r\n\x1a\n"


def _lines(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = TOPICS[rng.choice(list(TOPICS))].split()
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    (root / "text.txt").write_text("\n".join(_lines(0, 300)) + "\n", encoding="utf-8")
    prepare([root / "text.txt"], root / "data", tokenizer="word", split="0.8,0.1,0.1", sentences=True)
    return root / "data"


def _train(overrides: list[str], data_dir: Path, out: Path) -> Path:
    train(resolve_config({}, overrides), data_dir, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def lstm_run(data: Path, root: Path) -> Path:
    return _train([*LSTM, "train.batching=sentences"], data, root / "runs" / "lstm")


@pytest.fixture(scope="module")
def vae_run(data: Path, root: Path) -> Path:
    return _train(VAE, data, root / "runs" / "vae")


@pytest.fixture(scope="module")
def report(lstm_run: Path, vae_run: Path, root: Path) -> tuple[compare.Comparison, Path]:
    result = compare_runs([lstm_run, vae_run], samples=30, iw_samples=5, device="cpu")
    write_report(result, root / "report")
    return result, root / "report"


def _table_row(markdown: str, name: str) -> str:
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {name} |")]
    assert rows, f"no table row for {name}"
    return rows[0]  # the likelihood table comes first


def test_report_files_name_both_families_with_their_nll_labels(report) -> None:
    result, out = report
    markdown = (out / "report.md").read_text(encoding="utf-8")
    lstm, vae = _table_row(markdown, "lstm"), _table_row(markdown, "vae")
    assert "| lstm | " in lstm and "| exact |" in lstm and "sentence" in lstm
    assert "| vae | " in vae and "| IW bound (k=5) |" in vae and "sentence" in vae
    assert "k = 5 samples of z" in markdown  # the bound is explained with its k
    assert "†" not in markdown and not result.warnings  # same data, same accounting: nothing flagged
    assert [r.family for r in result.runs] == ["lstm", "vae"]
    assert all(r.training_time and r.training_time > 0 and r.steps == 20 for r in result.runs)
    assert all(r.parameters > 1000 for r in result.runs)
    assert len(markdown.split("```")) == 2 * len(result.runs) + 1  # one block of examples per run
    assert (out / "curves.png").read_bytes().startswith(PNG)


def test_html_report_is_self_contained(report) -> None:
    _, out = report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<style>" in page and "IW bound (k=5)" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == (out / "curves.png").read_bytes()


def test_nll_matches_glmlab_eval(report, lstm_run: Path, vae_run: Path) -> None:
    result, _ = report
    lstm, vae = result.runs
    exact, _ = evaluate_run(lstm_run, split="test")
    assert lstm.nll_kind == "exact" and lstm.nll_per_token == pytest.approx(exact.nll_per_token, rel=1e-6)
    assert lstm.perplexity == pytest.approx(exact.perplexity, rel=1e-6)
    iw, _ = evaluate_run(vae_run, split="test", samples=5, bleu_sentences=0, seed=0)
    assert vae.nll_kind == "importance-weighted" and vae.iw_samples == 5
    assert vae.nll_per_token == pytest.approx(iw.nll_per_token, rel=1e-6)
    assert result.sentences == exact.sentences == result.split_sentences and lstm.tokens == exact.tokens


def test_sample_metrics_are_bounded_and_use_the_test_sentences(report, data: Path) -> None:
    result, _ = report
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    assert len(result.references) == meta["splits"]["test"]["documents"]
    vocabulary = {w for words in TOPICS.values() for w in words.split()}
    assert all(set(r.split()) <= vocabulary for r in result.references)
    for run in result.runs:
        s = run.samples
        assert s.generated == 30 and s.references == len(result.references)
        assert set(s.bleu) == set(s.self_bleu) == {2, 3, 4, 5}
        assert all(0.0 <= v <= 1.0 for v in [*s.bleu.values(), *s.self_bleu.values(), *s.distinct.values()])
        assert s.bleu[2] > 0.05  # samples of topic words share bigrams with the references
        assert len(run.examples) == compare.EXAMPLES


def test_samples_follow_the_seed_not_the_batching(lstm_run: Path, vae_run: Path, monkeypatch) -> None:
    vae = load_run(vae_run)
    texts = generate_samples(vae, 7, seed=3)
    prior = sample_prior(vae.model, vae.tokenizer, 7, seed=3, settings=GenerationSettings(temperature=1.0, seed=3))
    assert [" ".join(w for w in t.split() if w != "<unk>") for t in texts] == [" ".join(p.split()) for p in prior]
    lstm = load_run(lstm_run)
    whole = generate_samples(lstm, 7, seed=1)
    monkeypatch.setattr(compare, "DECODE_ROWS", 3)
    assert generate_samples(lstm, 7, seed=1) == whole
    assert generate_samples(lstm, 7, seed=2) != whole


def test_cli_prints_tables_and_counts(lstm_run: Path, vae_run: Path, tmp_path: Path, capsys) -> None:
    code = main(["compare", str(lstm_run), str(vae_run), "--out", str(tmp_path / "r"), "--samples", "12",
                 "--iw-samples", "2", "--max-sentences", "5", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert "12 samples per run" in out and "reference sentences from the test split" in out
    assert "the first 5 of its" in out and "5 sentences" in out
    assert "| BLEU-2 |" in out and "IW bound (k=2)" in out
    assert (tmp_path / "r" / "report.html").is_file() and "report.md" in out


def test_mixed_accountings_are_marked_not_comparable(data: Path, lstm_run: Path, root: Path) -> None:
    windows = _train([*LSTM, "train.max_steps=4"], data, root / "runs" / "windowed")
    result = compare_runs([lstm_run, windows], samples=4, max_sentences=6, device="cpu")
    by_name = {r.name: r for r in result.runs}
    assert by_name["windowed"].accounting == "window" and not by_name["windowed"].comparable
    assert by_name["lstm"].accounting == "sentence" and by_name["lstm"].comparable
    assert any("windowed" in w and "not comparable" in w for w in result.warnings)
    assert "†" in _table_row(markdown(result), "windowed") and "†" not in _table_row(markdown(result), "lstm")
    assert all("\n" not in s for s in by_name["windowed"].examples)  # cut at the first line break


def test_bert_and_glm_sit_beside_the_others_and_a_pll_is_never_comparable(data: Path, root: Path) -> None:
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "model.dropout=0.0",
            "train.batch_size=8", "train.max_steps=4", "train.sample_tokens=0", "train.eval_tokens=256",
            "train.threads=1"]
    gpt = _train(["model.family=gpt", *tiny], data, root / "runs" / "gpt")
    bert = _train(["model.family=bert", *tiny], data, root / "runs" / "bert")
    glm = _train(["model.family=glm", *tiny], data, root / "runs" / "glm")
    result = compare_runs([gpt, bert, glm], samples=4, max_sentences=6, device="cpu")
    by_name = {r.name: r for r in result.runs}
    assert by_name["bert"].nll_kind == "pseudo" and not by_name["bert"].comparable
    assert by_name["glm"].nll_kind == "exact" and by_name["glm"].comparable and by_name["gpt"].comparable
    table = markdown(result)
    assert "†" in _table_row(table, "bert") and "†" not in _table_row(table, "glm")
    assert "PLL" in _table_row(table, "bert") and "pseudo-log-likelihood" in table
    assert all(len(r.examples) == 4 for r in result.runs)  # every family writes samples, bert by mask-predict
    pll, _ = evaluate_run(bert, split="test", device="cpu")  # glmlab eval labels it too
    assert pll.kind == "pll" and pll.format().startswith("PLL") and "not comparable" in pll.format()
    assert evaluate_run(glm, split="test", device="cpu")[0].kind == "nll"


def test_same_tokenizer_in_another_data_dir_is_flagged(data: Path, lstm_run: Path, root: Path) -> None:
    shutil.copytree(data, root / "data-copy")
    moved = root / "runs" / "moved"
    shutil.copytree(lstm_run, moved)
    config = json.loads((moved / "config.json").read_text(encoding="utf-8"))
    config["data"]["dir"] = str(root / "data-copy")
    (moved / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = compare_runs([lstm_run, moved], samples=3, max_sentences=3, device="cpu")
    assert len(result.runs) == 2
    assert any("different data directories" in w and "data-copy" in w for w in result.warnings)
    assert "> warning: the runs were trained on different data directories" in markdown(result)


def test_runs_on_differently_tokenized_data_are_refused(lstm_run: Path, root: Path) -> None:
    (root / "other.txt").write_text("\n".join(_lines(1, 60)) + "\n", encoding="utf-8")
    prepare([root / "other.txt"], root / "other-data", tokenizer="char", split="0.8,0.1,0.1", sentences=True)
    other = _train([*LSTM, "train.max_steps=2", "train.batching=sentences"], root / "other-data",
                   root / "runs" / "char")
    with pytest.raises(GlmlabError, match="tokenized differently") as caught:
        compare_runs([lstm_run, other], samples=2)
    assert str(other) in str(caught.value) and "char tokenizer" in str(caught.value)


def test_clear_errors(lstm_run: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(GlmlabError, match="no runs"):
        compare_runs([])
    (tmp_path / "file").write_text("x")
    assert main(["compare", str(lstm_run), "--out", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    assert main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "r")]) == 1
    assert "no runs" in capsys.readouterr().err
    with pytest.raises(GlmlabError, match="--iw-samples"):
        compare_runs([lstm_run], iw_samples=0)
