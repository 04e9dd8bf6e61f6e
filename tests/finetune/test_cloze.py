"""Classification as a cloze (--pattern / --verbalizer): the pattern's layout, the class scores read at the blank,
refusals, and a fine-tune of a tiny bert and glm through the same path as the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from glmlab.data.tokenizer import MASK_ID, train_char
from glmlab.errors import GlmlabError
from glmlab.finetune.cloze import Cloze, ClozeClassifier
from glmlab.finetune.examples import read_labelled
from glmlab.finetune.predict import Classifier, load_classifier
from glmlab.finetune.run import finetune
from glmlab.finetune.tasks import FinetuneOptions
from glmlab.models import build_model, family_config_class
from glmlab.models.glm import frame
from glmlab.runs import load_run
from glmlab.training.trainer import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = train_char(["abcdefghijklmnopqrstuvwxyz .,:"])


def tiny(family: str):
    torch.manual_seed(0)
    config = family_config_class(family)(family=family, vocab_size=TOK.vocab_size, block_size=24, n_layer=1,
                                         n_head=2, n_embd=16, dropout=0.0)
    return build_model(config).eval()


def test_pattern_and_verbalizer_are_checked_before_anything_runs():
    for pattern, fix in (("It was [MASK].", "{text}"), ("{text} it was good.", "one [MASK]"),
                         ("{text} [MASK] [MASK]", "one [MASK]")):
        with pytest.raises(GlmlabError, match=fix.replace("[", r"\[").replace("{", r"\{")):
            Cloze.parse(pattern, "1=g,0=b")
    with pytest.raises(GlmlabError, match="LABEL=WORD"):
        Cloze.parse("{text} [MASK]", "1:g")
    cloze = Cloze.parse("{text} It was [MASK].", "1=good,0=b")
    with pytest.raises(GlmlabError, match="'good'.*4 tokens"):
        cloze.word_ids(TOK, ["0", "1"])
    with pytest.raises(GlmlabError, match="no word for"):
        Cloze.parse("{text} [MASK]", "1=g").word_ids(TOK, ["0", "1"])


def test_the_text_goes_inside_the_pattern_and_is_cut_to_fit():
    cloze = Cloze.parse("{text}: [MASK].", "1=g,0=b")
    [ids], cut = cloze.encode(TOK, ["a bad day"], 24, bos=False)
    assert cut == 0 and TOK.decode(ids) == "a bad day: ." and ids[-2] == MASK_ID
    [long], cut = cloze.encode(TOK, ["x" * 40], 24, bos=False)
    assert cut == 1 and len(long) == 24 and long[-4:] == TOK.encode(": ") + [MASK_ID] + TOK.encode(".")


@pytest.mark.parametrize("family", ["bert", "glm"])
def test_class_scores_are_the_verbalizer_logits_at_the_blank(family):
    model = tiny(family)
    words = Cloze.parse("{text} [MASK].", "1=g,0=b").word_ids(TOK, ["0", "1"])
    classifier = ClozeClassifier(model, words)
    ids = TOK.encode("a fine day ") + [MASK_ID] + TOK.encode(".")
    padded = torch.tensor([ids + [0, 0]])
    with torch.no_grad():
        scores = classifier(padded)[0]
        if family == "bert":
            expected = model(torch.tensor([ids]))[0, len(ids) - 2, words]
        else:  # the first token of the blank's piece, as glm writes it
            expected = model(torch.tensor([frame(ids)]), model.new_cache(1, torch.device("cpu")),
                             last_only=True)[0, -1, words]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)


def test_a_causal_model_is_refused():
    with pytest.raises(GlmlabError, match="cannot classify as a cloze"):
        ClozeClassifier(tiny("gpt"), [20, 21])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "glm"])
def test_a_cloze_fine_tune_records_before_and_after_and_predicts_as_it_scored(family, char_data, task_files,
                                                                              tmp_path):
    pre = tmp_path / "pre"
    train(tiny_config(f"model.family={family}", "train.max_steps=20", "train.threads=1", "train.sample_tokens=0"),
          char_data, pre, show_progress=False)
    options = FinetuneOptions(task="classify", init=str(pre), train=str(task_files["train"]),
                              val=str(task_files["val"]), pattern="{text}: [MASK]", verbalizer="1=g,0=e")
    _, results = finetune(options, tmp_path / "ft", overrides=["train.max_steps=30", "train.eval_interval=15",
                                                                "train.threads=1", "train.lr=3e-3"],
                          show_progress=False)
    clf = load_classifier(tmp_path / "ft")
    val = read_labelled(task_files["val"])
    zero_shot = Classifier(ClozeClassifier(load_run(pre).model, clf.model.word_ids.tolist()), clf.tokenizer,
                           clf.labels, clf.bos, pre, cloze=clf.cloze)  # the init weights, read as the cloze
    before = zero_shot.evaluate(val.texts, val.labels)[1]["accuracy"]
    assert results["before"]["val"]["accuracy"] == pytest.approx(before)  # "before" is the init model's
    assert results["val"]["accuracy"] >= 0.5
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["finetune"]["pattern"] == "{text}: [MASK]"
    texts = ["the good king", "an evil night"]
    probs = [p.probabilities["1"] for p in clf.predict(texts)]
    ids, _ = clf.cloze.encode(clf.tokenizer, texts, clf.model.block_size, clf.bos)
    width = max(map(len, ids))
    x = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        expected = torch.softmax(clf.model(x), -1)[:, 1].tolist()
    assert probs == pytest.approx(expected, abs=1e-6)
    with pytest.raises(GlmlabError, match="cloze"):
        finetune(FinetuneOptions(task="classify", init=str(pre), train=str(task_files["train"]),
                                 val=str(task_files["val"]), pattern="{text} [MASK]", verbalizer="1=g,0=e",
                                 mode="probe"), tmp_path / "probe", show_progress=False)
