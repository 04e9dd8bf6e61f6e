"""Characters the tokenizer cannot encode (issue 22, item 14): fine-tuning, ``predict --file`` and ``eval --file``
read them as ``<unk>`` and say how many and which; ``predict --text`` refuses them, as ``generate`` does."""

from __future__ import annotations

import json

from glmlab.cli import main
from glmlab.finetune.run import FinetuneOptions, resolve_finetune_config
from glmlab.finetune.tasks import FinetuneTask
from tests.finetune.conftest import write_task
from tests.finetune.test_finetune_run import full_run  # noqa: F401 — the classifier these tests read with

FOREIGN = "ж€"  # not in the char tokenizer's Shakespeare alphabet


def task_notes(options: FinetuneOptions) -> list[str]:
    config, raw = resolve_finetune_config(options, {}, [])
    return FinetuneTask(options, config, raw).notes


def test_finetune_says_how_many_characters_became_unk(pretrained, tmp_path):
    data = write_task(tmp_path / "train.tsv", 30, 0)
    data.write_text(data.read_text() + f"the king {FOREIGN} good\t1\n")
    notes = task_notes(FinetuneOptions(task="classify", init=str(pretrained), train=str(data), val=str(data)))
    assert any("2 tokens in 1 of 31 train examples are <unk>" in n and "'ж'" in n and "'€'" in n for n in notes), notes
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w}"})
                               for w in ["moon", "sun", f"{FOREIGN}x"] * 4) + "\n")
    notes = task_notes(FinetuneOptions(task="sft", init=str(pretrained), train=str(pairs), val=str(pairs)))
    assert any("16 tokens in 4 of 12 train examples are <unk>" in n for n in notes), notes  # prompt and completion


def test_clean_data_gets_no_such_note(pretrained, task_files):
    notes = task_notes(FinetuneOptions(task="classify", init=str(pretrained), train=str(task_files["train"]),
                                       val=str(task_files["val"])))
    assert not any("<unk>" in n for n in notes)


def test_predict_refuses_a_text_it_cannot_read_and_counts_them_in_a_file(full_run, tmp_path, capsys):  # noqa: F811
    assert main(["predict", str(full_run), "--text", f"good {FOREIGN}"]) == 1
    assert "cannot encode: 'ж', '€'" in capsys.readouterr().err
    data = write_task(tmp_path / "val.tsv", 10, 5)
    data.write_text(data.read_text() + f"{FOREIGN} good\t1\n")
    assert main(["predict", str(full_run), "--file", str(data)]) == 0
    assert "warning: 2 tokens in 1 of 11 texts are <unk>" in capsys.readouterr().err


def test_eval_of_a_file_says_how_many_characters_became_unk(trained_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(f"First Citizen: {FOREIGN}{FOREIGN} we proceed\n")
    assert main(["eval", str(trained_run), "--file", str(text)]) == 0
    err = capsys.readouterr().err
    assert "warning: 4 tokens in 1 of 1 documents of the file are <unk>" in err and "'ж'" in err
