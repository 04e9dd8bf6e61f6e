"""Every weights file a command loads is checked against the checksum written with it: a changed file is refused
with the copies to load instead, never used; weights from before checksums load with a note."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from glmlab.cli import main
from glmlab.errors import RunDirError
from glmlab.runs import BEST_DIR, WEIGHTS, UncheckedWeights, checkpoint_dirs, load_run
from tests.finetune.conftest import write_task


def damage(path: Path) -> None:
    """Overwrite seven bytes in the middle of the tensor data (the header stays valid)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 7] = bytes(255 - b for b in data[middle:middle + 7])
    path.unlink()  # a hard link to a checkpoint's file: break it, as an editor or a copy would
    path.write_bytes(bytes(data))


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def test_every_weights_file_has_a_checksum_sha256sum_can_read(run):
    files = [run / WEIGHTS, run / BEST_DIR / WEIGHTS]
    for path in files:
        digest, name = (path.parent / (path.name + ".sha256")).read_text().split()
        assert name == WEIGHTS and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_dirs(run) and all((d / "manifest.json").is_file() for d in checkpoint_dirs(run))


def test_damaged_best_weights_are_refused_by_every_command_that_loads_them(run, tmp_path, capsys, monkeypatch):
    damage(run / BEST_DIR / WEIGHTS)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served damaged weights"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "completion": " b"}\n' * 20)
    commands = [["generate", str(run), "--prompt", "First", "--max-new-tokens", "3"],
                ["eval", str(run)],
                ["export-hf", str(run), str(tmp_path / "hf")],
                ["serve", str(run), "--port", "0"],
                ["finetune", "sft", "--init", str(run), "--data", str(pairs), "--out", str(tmp_path / "ft"),
                 "train.max_steps=1"]]
    for argv in commands:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "best/model.safetensors does not match the checksum" in err, argv
        assert "--checkpoint last" in err and "--checkpoint step-" in err, argv
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    with pytest.raises(RunDirError, match="does not match the checksum"):
        load_run(run)


def test_the_other_copies_load_instead(run, capsys):
    damage(run / BEST_DIR / WEIGHTS)
    step = checkpoint_dirs(run)[-1].name  # the oldest kept checkpoint, by its name
    for checkpoint in ("last", step, f"step-{int(step[5:])}"):
        assert main(["generate", str(run), "--checkpoint", checkpoint, "--max-new-tokens", "3"]) == 0, checkpoint
    damage(checkpoint_dirs(run)[0] / WEIGHTS)
    assert main(["generate", str(run), "--checkpoint", checkpoint_dirs(run)[0].name]) == 1
    assert "does not match the checksum" in capsys.readouterr().err
    assert main(["generate", str(run), "--checkpoint", "step-99999"]) == 1
    assert f"its checkpoints: {checkpoint_dirs(run)[0].name}" in capsys.readouterr().err


def test_weights_from_before_checksums_load_with_a_note(run, capsys):
    for sidecar in run.rglob("*.sha256"):
        sidecar.unlink()
    with pytest.warns(UncheckedWeights, match="no checksum"):
        load_run(run)
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 0
    assert "note: " in capsys.readouterr().err


def test_a_fine_tuned_classifier_is_checked_too(trained_run, tmp_path, capsys):
    train, val = write_task(tmp_path / "train.tsv", 40, 0), write_task(tmp_path / "val.tsv", 10, 1)
    out = tmp_path / "clf"
    assert main(["finetune", "classify", "--init", str(trained_run), "--train", str(train), "--val", str(val),
                 "--out", str(out), "--mode", "lora", "train.max_steps=4", "train.eval_interval=2"]) == 0
    capsys.readouterr()
    damage(out / BEST_DIR / WEIGHTS)
    assert main(["predict", str(out), "--text", "good day"]) == 1
    assert "does not match the checksum" in capsys.readouterr().err


def test_a_fix_never_points_at_the_same_file_under_another_name(run, capsys):
    """The top-level weights are a hard link to the newest checkpoint's: damaged in place, both are."""
    newest = checkpoint_dirs(run)[0]
    (run / WEIGHTS).unlink()  # as training leaves it (copying the run broke the link)
    os.link(newest / WEIGHTS, run / WEIGHTS)
    with open(run / WEIGHTS, "r+b") as f:  # in place: the link stays
        f.seek(f.seek(0, 2) // 2)
        f.write(b"\x00" * 7)
    assert main(["generate", str(run), "--checkpoint", "last"]) == 1
    err = capsys.readouterr().err
    assert "does not match the checksum" in err and "--checkpoint best" in err and newest.name not in err
