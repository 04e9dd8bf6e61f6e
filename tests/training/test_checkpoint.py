"""Crash safety: checkpoints committed by a manifest, damaged ones skipped (and reported), writes that fail cleanly."""

import argparse
import errno
import json
import shutil

import pytest
import torch

from glmlab.errors import GlmlabError, RunDirError
from glmlab.runs import file_sha256
from glmlab.training.checkpoint import MANIFEST, checkpoint_dirs, save_checkpoint, verify
from glmlab.training.tasks import LanguageModelingTask
from glmlab.training.trainer import Trainer, train
from tests.conftest import tiny_config


def _run(char_data, out, *extra):
    return train(tiny_config("train.checkpoint_interval=5", "train.eval_interval=10", *extra), char_data, out,
                 show_progress=False)


def test_checkpoints_rotate_and_top_level_files_follow_the_newest(char_data, tmp_path):
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=20", "train.keep_checkpoints=3")
    dirs = checkpoint_dirs(out)
    assert [d.name for d in dirs] == ["step-00000020", "step-00000015", "step-00000010"]
    assert all(verify(d) is None for d in dirs)
    assert (out / "model.safetensors").read_bytes() == (dirs[0] / "model.safetensors").read_bytes()
    manifest = json.loads((dirs[0] / MANIFEST).read_text())
    assert manifest["step"] == 20 and set(manifest["files"]) == {"model.safetensors", "trainer_state.pt"}
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "manifest-a-list", "manifest-without-bytes",
                                    "state-not-weights-only"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(char_data, tmp_path, damage):
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=10")
    newest = checkpoint_dirs(out)[0]
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    manifest = json.loads((newest / MANIFEST).read_text())
    if damage == "flip":
        weights.unlink()  # break the hard link so only the checkpoint's copy is damaged
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncate":
        weights.unlink()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no-manifest":
        (newest / MANIFEST).unlink()
    elif damage == "manifest-a-list":  # JSON, but not a manifest's shape (issue 22, item 13)
        (newest / MANIFEST).write_text("[1]")
    elif damage == "manifest-without-bytes":
        del manifest["files"]["model.safetensors"]["bytes"]
        (newest / MANIFEST).write_text(json.dumps(manifest))
    else:  # a trainer state that weights-only loading refuses, its manifest rewritten to match (issue 22, item 13)
        state = newest / "trainer_state.pt"
        state.unlink()
        torch.save({"step": 10, "extra": argparse.Namespace(x=1)}, state)
        manifest["files"]["trainer_state.pt"] = {"sha256": file_sha256(state), "bytes": state.stat().st_size}
        (newest / MANIFEST).write_text(json.dumps(manifest))
    if damage != "state-not-weights-only":
        assert verify(newest) is not None
    trainer = Trainer(tiny_config("train.checkpoint_interval=5", "train.eval_interval=10", "train.max_steps=12"),
                      LanguageModelingTask(char_data), out, resume=True, show_progress=False)
    assert trainer.state["step"] == 5
    assert any("step-00000010" in note and "damaged" in note for note in trainer.notes)


def test_no_intact_checkpoint_is_an_error(char_data, tmp_path):
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=5")
    (checkpoint_dirs(out)[0] / MANIFEST).write_text("{not json")
    with pytest.raises(RunDirError, match="no intact checkpoint"):
        Trainer(tiny_config("train.max_steps=10"), LanguageModelingTask(char_data), out, resume=True,
                show_progress=False)


def test_a_failed_write_leaves_no_partial_files(char_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=5")
    before = {p.name for p in (out / "checkpoints").iterdir()}
    model = torch.nn.Linear(2, 2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("glmlab.training.checkpoint.save_model", disk_full)
    with pytest.raises(GlmlabError, match="disk is full") as err:
        save_checkpoint(out, model, {"step": 99})
    assert "previous checkpoint" in str(err.value)
    assert {p.name for p in (out / "checkpoints").iterdir()} == before
    assert verify(checkpoint_dirs(out)[0]) is None


def _mount_tmpfs(path, options):
    import subprocess

    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


def _umount(path):
    import subprocess

    if subprocess.run(["umount", str(path)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_output_is_refused_before_training(char_data, tmp_path):
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "ro,size=1m")
    try:
        with pytest.raises(GlmlabError, match="read-only"):
            _run(char_data, mount / "run", "train.max_steps=5")
    finally:
        _umount(mount)


def test_a_full_disk_while_writing_best_weights_is_one_clear_error(char_data, tmp_path, monkeypatch):
    """Issue 22, item 13: safetensors reports a full disk as its own SafetensorError (a traceback before); the
    write of best/ now fails as every other write does. The error is safetensors' own, from a real full tmpfs."""
    from safetensors.torch import save_model

    mount = tmp_path / "full"
    _mount_tmpfs(mount, "size=4k")
    try:
        monkeypatch.setattr("glmlab.runs.save_model", lambda model, path: save_model(model, str(mount / "w")))
        with pytest.raises(GlmlabError, match="disk is full"):
            _run(char_data, tmp_path / "run", "train.max_steps=10")
    finally:
        _umount(mount)


def test_weights_get_the_permissions_of_every_other_file(char_data, tmp_path):
    """Issue 22, item 15: safetensors writes 0600; the run's other files are 0666 less the umask."""
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=10")
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    step = f"checkpoints/step-{10:08d}/model.safetensors"
    assert modes["best/model.safetensors"] == modes["config.json"] == modes[step]
    assert len(set(modes.values())) == 1, modes


def test_full_disk_mid_run_keeps_the_last_good_checkpoint(char_data, tmp_path):
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=700k")  # room for the first checkpoints, not for fifty
    try:
        out = mount / "run"
        with pytest.raises(GlmlabError, match="disk is full"):
            _run(char_data, out, "train.max_steps=250", "train.keep_checkpoints=50")
        dirs = checkpoint_dirs(out)
        assert dirs and all(verify(d) is None for d in dirs)
        assert not list((out / "checkpoints").glob(".tmp-*"))
        last_step = int(dirs[0].name[len("step-"):])
        assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == last_step
        shutil.copytree(out, tmp_path / "moved")
    finally:
        _umount(mount)
    result = train(tiny_config("train.checkpoint_interval=5", "train.eval_interval=10",
                               f"train.max_steps={last_step + 5}"), char_data, tmp_path / "moved", resume=True,
                   show_progress=False)
    assert result.step == last_step + 5


def test_after_resuming_past_a_damaged_checkpoint_the_new_one_is_kept(char_data, tmp_path):
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=10")
    newest = checkpoint_dirs(out)[0]
    (newest / MANIFEST).unlink()  # step 10 damaged: resume takes step 5
    train(tiny_config("train.checkpoint_interval=5", "train.eval_interval=10", "train.max_steps=8",
                      "train.keep_checkpoints=1"), char_data, out, resume=True, show_progress=False)
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000008"]
    assert (out / "checkpoints" / "damaged-step-00000010").is_dir()  # set aside, not deleted
    assert verify(checkpoint_dirs(out)[0]) is None


def test_one_trainer_per_run_directory(char_data, tmp_path):
    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=5")
    with Trainer(tiny_config("train.max_steps=10"), LanguageModelingTask(char_data), out, resume=True,
                 show_progress=False) as first:
        with pytest.raises(RunDirError, match="another glmlab train"):
            Trainer(tiny_config("train.max_steps=10"), LanguageModelingTask(char_data), out, resume=True,
                    show_progress=False)
        first.run()
    with Trainer(tiny_config("train.max_steps=11"), LanguageModelingTask(char_data), out, resume=True,
                 show_progress=False):  # leaving the first released the lock
        pass
    with pytest.raises(GlmlabError, match="already reached"):  # set-up fails after taking the lock...
        Trainer(tiny_config("train.max_steps=10"), LanguageModelingTask(char_data), out, resume=True,
                show_progress=False)
    Trainer(tiny_config("train.max_steps=12"), LanguageModelingTask(char_data), out, resume=True,
            show_progress=False).close()  # ... and releases it
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == 10


def test_resume_refuses_data_with_another_tokenizer(char_data, shakespeare_excerpt, tmp_path):
    from glmlab.data.prepare import prepare

    out = tmp_path / "run"
    _run(char_data, out, "train.max_steps=5")
    prepare([shakespeare_excerpt], tmp_path / "bpe", tokenizer="bpe", vocab_size=300)
    with pytest.raises(GlmlabError, match="tokenized differently"):
        Trainer(tiny_config("train.max_steps=10"), LanguageModelingTask(tmp_path / "bpe"), out, resume=True,
                show_progress=False)
