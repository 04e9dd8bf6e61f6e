import json
import math

import pytest
import torch
from safetensors.torch import load_file

from glmlab.errors import DataError, GlmlabError, RunDirError
from glmlab.runs import load_run
from glmlab.training.tasks import LanguageModelingTask, LossModule
from glmlab.training.trainer import Trainer, train
from tests.conftest import metrics_records, tiny_config


def test_training_lowers_the_loss_and_fills_the_run_directory(trained_run):
    train_records = metrics_records(trained_run, "train")
    val_records = metrics_records(trained_run, "val")
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5
    assert [r["step"] for r in val_records] == [20, 40]
    assert val_records[-1]["loss"] < math.log(40)  # better than uniform over the char vocab
    for name in ("config.json", "tokenizer.json", "model.safetensors", "trainer_state.pt", "best/model.safetensors",
                 "loss.png", "samples.txt"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (trained_run / "samples.txt").read_text().startswith("# step 40")
    state = torch.load(trained_run / "trainer_state.pt", weights_only=True)
    assert state["step"] == 40 and "optimizer" in state and "sampler" in state
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"]["vocab_size"] > 4 and config["train"]["max_steps"] == 40


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_exact(char_data, tmp_path, optimizer):
    # A constant schedule makes a 10-step run the first half of the 20-step one; dropout checks RNG restore.
    common = ("train.lr_schedule=constant", "model.dropout=0.1", "train.eval_interval=10",
              f"train.optimizer={optimizer}")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config("train.max_steps=20", *common), char_data, straight, show_progress=False)
    train(tiny_config("train.max_steps=10", *common), char_data, split, show_progress=False)
    result = train(tiny_config("train.max_steps=20", *common), char_data, split, resume=True, show_progress=False)
    assert result.step == 20
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in metrics_records(run, "train")] for run in (straight, split)]
    assert losses[0] == losses[1]
    assert [r["step"] for r in metrics_records(split, "val")] == [10, 20]


def test_a_run_resumes_with_the_optimizer_it_began_with(char_data, tmp_path):
    common = ("train.eval_interval=10", "train.optimizer=muon")
    train(tiny_config("train.max_steps=10", *common), char_data, tmp_path / "run", show_progress=False)
    with pytest.raises(GlmlabError, match="(?s)trained with train.optimizer=muon, not adamw.*resume with "
                                          "train.optimizer=muon"):
        train(tiny_config("train.max_steps=20", "train.eval_interval=10"), char_data, tmp_path / "run", resume=True,
              show_progress=False)


def test_existing_run_is_not_overwritten(trained_run, char_data):
    before = (trained_run / "model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny_config("train.max_steps=5"), char_data, trained_run, show_progress=False)
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_the_users_files_and_runs_are_not_overwritten(trained_run, char_data, tmp_path):
    """Issue 22, item 9: train --out over a directory of other files overwrote samples.txt / loss.png there, and
    prepare --out RUN replaced the run's tokenizer.json."""
    import shutil

    from glmlab.data.prepare import prepare

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.txt").write_text("my notes")
    with pytest.raises(RunDirError, match="not empty .*samples.txt.* holds no run"):
        train(tiny_config("train.max_steps=2"), char_data, mine, show_progress=False)
    assert (mine / "samples.txt").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == \
        ["samples.txt"]
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".lock").write_text("")  # what a run whose set-up failed leaves: training there is fine
    train(tiny_config("train.max_steps=2", "train.sample_tokens=0"), char_data, hidden, show_progress=False)
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = (run / "tokenizer.json").read_bytes()
    with pytest.raises(DataError, match="holds a run"):
        prepare([], run, tokenizer="word")
    assert (run / "tokenizer.json").read_bytes() == before and not (run / "train.bin").exists()


def test_resume_of_a_finished_run_says_how_to_extend(trained_run, char_data):
    with pytest.raises(GlmlabError, match="train.max_steps=80"):
        train(tiny_config("train.max_steps=40"), char_data, trained_run, resume=True, show_progress=False)


def test_damaged_checkpoint_is_refused(char_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=10"), char_data, run, show_progress=False)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\x00" * 100)
    with pytest.raises(RunDirError, match="does not match"):
        train(tiny_config("train.max_steps=20"), char_data, run, resume=True, show_progress=False)


def test_block_size_larger_than_the_split(char_data, tmp_path):
    with pytest.raises(DataError, match="block_size=4096"):
        train(tiny_config("model.block_size=4096"), char_data, tmp_path / "run", show_progress=False)


def test_patience_stops_early(char_data, tmp_path):
    result = train(tiny_config("train.max_steps=200", "train.eval_interval=5", "train.lr=0", "train.min_lr=0",
                               "train.patience=2"), char_data, tmp_path / "run", show_progress=False)
    assert result.stopped_by == "patience" and result.step == 15


def test_load_returns_a_ready_model(trained_run):
    run = load_run(trained_run)
    model, tokenizer = run
    assert not model.training and tokenizer.kind == "char"
    text = run.generate("First", max_new_tokens=10, seed=0, temperature=0)[0]
    assert len(text) == 10


def test_gradient_accumulation_matches_one_large_batch(char_data, tmp_path):
    exact = ("train.max_steps=3", "train.eval_interval=3", "train.precision=fp32")  # compared at fp32 rounding
    one = train(tiny_config(*exact, "train.batch_size=8"), char_data, tmp_path / "one", show_progress=False)
    two = train(tiny_config(*exact, "train.batch_size=4", "train.grad_accum=2"), char_data, tmp_path / "two",
                show_progress=False)
    a, b = load_file(one.run_dir / "model.safetensors"), load_file(two.run_dir / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    val = [metrics_records(run.run_dir, "val")[0]["loss"] for run in (one, two)]
    assert val[0] == pytest.approx(val[1], rel=1e-4)


def test_compile_auto_stays_eager_on_a_cpu(char_data, tmp_path):
    with Trainer(tiny_config("train.max_steps=1"), LanguageModelingTask(char_data), tmp_path / "run",
                 show_progress=False) as trainer:
        assert trainer.device.type == "cpu" and isinstance(trainer.step_module, LossModule)


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one(char_data, tmp_path):
    eager = train(tiny_config("train.max_steps=5", "train.compile=false"), char_data, tmp_path / "eager",
                  show_progress=False)
    compiled = train(tiny_config("train.max_steps=5", "train.compile=true"), char_data, tmp_path / "compiled",
                     show_progress=False)
    assert compiled.last_val_loss == pytest.approx(eager.last_val_loss, rel=1e-4)
    assert metrics_records(compiled.run_dir, "train")[-1]["loss"] == pytest.approx(
        metrics_records(eager.run_dir, "train")[-1]["loss"], rel=1e-4)


def test_frequent_evaluations_redraw_the_reports_at_most_a_small_share_of_the_time(char_data, tmp_path,
                                                                                 monkeypatch):
    """loss.png and samples.txt cost ~0.1-0.2 s each: written at every evaluation of a short run they took ~4% of
    it. They are skipped while the last ones are recent, and the run's last evaluation is always written."""
    import time

    import glmlab.training.trainer as trainer_module

    drawn = []

    def slow_plot(records, path, title=""):
        drawn.append(max(r["step"] for r in records if r.get("split") == "val"))
        time.sleep(0.05)  # 5% of the 1 s every later redraw must wait at REPORT_SHARE = 0.02
        path.write_bytes(b"png")

    monkeypatch.setattr(trainer_module, "plot_losses", slow_plot)
    run = train(tiny_config("train.max_steps=30", "train.eval_interval=2", "train.sample_tokens=8"), char_data,
                tmp_path / "run", show_progress=False)
    evaluations = metrics_records(run.run_dir, "val")
    assert len(evaluations) == 15 and 1 <= len(drawn) < len(evaluations)
    assert drawn[0] == 2 and drawn[-1] == 30  # the first evaluation and the last are drawn
    assert (tmp_path / "run" / "samples.txt").read_text().startswith("# step 30,")


def test_a_resumed_run_keeps_the_precision_auto_chose_when_it_began(char_data, tmp_path, monkeypatch):
    """train.precision=auto measures bf16 against fp32 on the machine at hand; a run resumed where the
    measurement differs (another machine, a busy one) trains on in the precision its checkpoints were made in."""
    import glmlab.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda name, device: torch.bfloat16)
    train(tiny_config("train.max_steps=2", "train.eval_interval=2"), char_data, tmp_path / "run", show_progress=False)
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda name, device: None)
    with Trainer(tiny_config("train.max_steps=4", "train.eval_interval=2"), LanguageModelingTask(char_data),
                 tmp_path / "run", resume=True, show_progress=False) as trainer:
        assert trainer.amp_dtype == torch.bfloat16 and trainer.state["precision"] == "bf16"
        assert any("training on in bf16 as the run began" in note for note in trainer.notes)
    with Trainer(tiny_config("train.max_steps=4", "train.eval_interval=2", "train.precision=fp32"),
                 LanguageModelingTask(char_data), tmp_path / "run", resume=True, show_progress=False) as trainer:
        assert trainer.amp_dtype is None and trainer.state["precision"] == "fp32"  # asked for by name: as asked


def test_a_training_process_keeps_its_freed_memory_for_reuse():
    """glibc's malloc hands the top of the heap back to the OS at each free by default; a training process then
    page-faults its tensors back in every step (~1,600 faults a step on nanoGPT's recipe). The trainer raises the
    trim threshold; where the C library is not glibc there is nothing to set."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    script = ("import resource, torch\n"
              "from glmlab.runtime import keep_freed_memory\n"
              "import sys\n"
              "assert not (sys.argv[1] == 'keep') or keep_freed_memory()\n"
              "big = [torch.ones(1 << 22)]\n"  # 16 MiB on the heap, then freed: its pages sit at the top
              "big.clear()\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "for _ in range(50):\n"
              "    parts = [torch.ones(1 << 16) for _ in range(32)]\n"  # 8 MiB in 256-KiB tensors, freed each round
              "    del parts\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("keep", "default")}
    assert faults["keep"] * 5 < faults["default"], faults
