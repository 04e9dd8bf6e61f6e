"""End to end: glmlab finetune classify / sft, predict, report, resume and the errors a user meets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmlab.cli import main
from glmlab.errors import GlmlabError, RunDirError
from glmlab.finetune import load_classifier
from glmlab.finetune.report import write_report
from glmlab.finetune.run import FinetuneOptions, finetune
from glmlab.runs import load_run
from tests.conftest import metrics_records
from tests.finetune.conftest import write_task

FAST = ["train.max_steps=60", "train.eval_interval=20", "train.threads=1", "train.lr=3e-3", "train.batch_size=16"]


def classify(pretrained, task_files, out, mode="full", init=True, extra=(), **kw):
    options = FinetuneOptions(task="classify", init=str(pretrained) if init else None, train=str(task_files["train"]),
                              val=str(task_files["val"]), test=str(task_files["val"]), mode=mode,
                              arch=None if init else str(pretrained), **kw)
    return finetune(options, out, overrides=[*FAST, *extra], show_progress=False)


@pytest.fixture(scope="module")
def full_run(pretrained, task_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "full"
    classify(pretrained, task_files, out)
    return out


def test_full_finetune_learns_the_task_and_records_everything(full_run, pretrained):
    results = json.loads((full_run / "results.json").read_text())
    assert results["val"]["accuracy"] >= 0.9 and results["test"]["examples"] == 60
    assert results["labels"] == ["0", "1"]
    assert results["trainable_parameters"] == results["total_parameters"]
    assert sum(map(sum, results["val"]["confusion"])) == 60
    config = json.loads((full_run / "config.json").read_text())
    assert config["finetune"]["labels"] == ["0", "1"] and config["finetune"]["init"] == str(pretrained.resolve())
    assert config["finetune"]["sources"]["train"]["sha256"]
    assert config["model"] == json.loads((pretrained / "config.json").read_text())["model"]
    val = metrics_records(full_run, "val")
    assert val and all("accuracy" in r and "macro_f1" in r for r in val)
    assert (full_run / "best" / "model.safetensors").is_file() and (full_run / "loss.png").is_file()


def test_predict_api_and_cli(full_run, task_files, capsys):
    clf = load_classifier(full_run)
    good, evil = clf.predict(["the king good day", "evil night"])
    assert (good.label, evil.label) == ("1", "0")
    assert sum(good.probabilities.values()) == pytest.approx(1.0)
    assert main(["predict", str(full_run), "--text", "good sun", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["label"] == "1" and set(row["probabilities"]) == {"0", "1"}
    assert main(["predict", str(full_run), "--file", str(task_files["val"])]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_predict_refuses_unseen_labels_and_a_classifier_is_not_an_lm(full_run, tmp_path, capsys):
    path = tmp_path / "odd.tsv"
    path.write_text("sentence\tlabel\ngood day\t1\nevil day\t7\n")
    assert main(["predict", str(full_run), "--file", str(path)]) == 1
    assert "labels the model never saw in training: '7'" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="is a classifier"):
        load_run(full_run)
    with pytest.raises(RunDirError, match="not a classifier"):
        load_classifier(_lm_run(full_run))


def _lm_run(full_run: Path) -> Path:
    return Path(json.loads((full_run / "config.json").read_text())["finetune"]["init"])


def test_probe_trains_only_the_head_and_lora_only_updates(pretrained, task_files, tmp_path):
    _, probe = classify(pretrained, task_files, tmp_path / "probe", mode="probe")
    assert probe["trainable_parameters"] == 32 * 2 + 2  # the head: n_embd x classes + bias
    backbone_before = load_run(pretrained).model.state_dict()
    clf = load_classifier(tmp_path / "probe")
    for name, value in clf.model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    _, lora = classify(pretrained, task_files, tmp_path / "lora", mode="lora", lora_rank=4,
                       extra=["train.lr=5e-3", "train.max_steps=160", "train.batch_size=32"])
    assert 66 < lora["trainable_parameters"] < lora["total_parameters"] / 2
    assert lora["val"]["accuracy"] > 0.6


def test_from_scratch_with_the_same_architecture(pretrained, task_files, tmp_path):
    _, results = classify(pretrained, task_files, tmp_path / "scratch", init=False)
    config = json.loads((tmp_path / "scratch" / "config.json").read_text())
    assert config["finetune"]["init"] is None
    assert config["model"]["n_embd"] == json.loads((pretrained / "config.json").read_text())["model"]["n_embd"]
    assert results["init"] is None and "accuracy" in results["val"]


def test_interrupted_finetune_resumes(pretrained, task_files, tmp_path):
    out = tmp_path / "resumed"
    classify(pretrained, task_files, out, extra=["train.max_steps=20"])
    assert main(["finetune", "classify", "--resume", "--out", str(out), "train.max_steps=40", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40


@pytest.mark.parametrize("args, message", [
    (["--init", "none"], "--mode probe freezes pre-trained weights"),
    (["--label-column", "y"], "no label column 'y'"),
    (["model.n_layer=3"], "model.n_layer comes from the pre-trained run"),
    (["train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    (["trian.lr=1"], "unknown config section 'trian'"),
])
def test_cli_errors(pretrained, task_files, tmp_path, capsys, args, message):
    argv = ["finetune", "classify", "--init", str(pretrained), "--train", str(task_files["train"]), "--val",
            str(task_files["val"]), "--out", str(tmp_path / "x"), "--mode", "probe", *args]
    if args[0] == "--init":
        argv = [a for i, a in enumerate(argv) if not (argv[i - 1] == "--init" and i > 0 and a == str(pretrained))]
        argv.remove("--init")
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_single_class_and_long_texts(pretrained, tmp_path):
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\ngood\t1\nfine\t1\n")
    with pytest.raises(GlmlabError, match="single class"):
        finetune(FinetuneOptions(task="classify", init=str(pretrained), train=str(one), val=str(one)), tmp_path / "a")
    long = write_task(tmp_path / "long.tsv", 40, 3)
    long.write_text(long.read_text() + "the king " * 20 + "good\t1\n")
    options = FinetuneOptions(task="classify", init=str(pretrained), train=str(long), val=str(long))
    from glmlab.finetune.run import resolve_finetune_config
    from glmlab.finetune.tasks import FinetuneTask

    config, raw = resolve_finetune_config(options, {}, [])
    task = FinetuneTask(options, config, raw)
    assert any("1 of 41 train texts are longer than the context" in n for n in task.notes)


def test_sft_improves_completions_and_is_an_ordinary_run(pretrained, task_files, tmp_path):
    out = tmp_path / "sft"
    options = FinetuneOptions(task="sft", init=str(pretrained), train=str(task_files["pairs"]), eval_samples=12)
    _, results = finetune(options, out, overrides=["train.max_steps=120", "train.eval_interval=40",
                                                   "train.threads=1", "train.lr=3e-3"], show_progress=False)
    assert results["val"]["loss"] < results["before"]["val"]["loss"] - 0.5  # completion NLL per token
    assert results["val"]["examples"] == 12 and 0 <= results["val"]["rouge_l"] <= 1
    assert main(["eval", str(out), "--split", "val"]) == 0  # scores the pre-training data it came from
    run = load_run(out)
    text = run.generate("say moon:", temperature=0, max_new_tokens=10)[0]
    assert isinstance(text, str) and len(text) > 0
    report = write_report([out], tmp_path / "report")
    body = report.read_text()
    assert "(before)" in body and "full fine-tune" in body and (tmp_path / "report" / "metrics.png").is_file()


def test_sft_lora_merges_for_generation(pretrained, task_files, tmp_path):
    out = tmp_path / "sft-lora"
    options = FinetuneOptions(task="sft", init=str(pretrained), train=str(task_files["pairs"]), mode="lora",
                              lora_rank=2, eval_samples=4)
    finetune(options, out, overrides=["train.max_steps=20", "train.eval_interval=10", "train.threads=1"],
             show_progress=False)
    run = load_run(out)
    assert not any("parametrizations" in n for n, _ in run.model.named_parameters())
    base = load_run(pretrained).model
    changed = [n for n, p in run.model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all("c_" in n for n in changed)  # only the adapted projections moved


def test_report_refuses_mixed_tasks(full_run, tmp_path):
    sft = tmp_path / "fake"
    sft.mkdir()
    (sft / "results.json").write_text(json.dumps({"task": "sft"}))
    (sft / "config.json").write_text("{}")
    with pytest.raises(GlmlabError, match="different tasks"):
        write_report([full_run, sft], tmp_path / "r")
