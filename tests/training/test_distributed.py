"""torchrun + DDP on CPU (gloo): 2 processes match 1 process with the same global batch."""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY_MODEL, TINY_TRAIN

COMMON = [*TINY_MODEL, *TINY_TRAIN, "train.max_steps=20", "train.eval_interval=10", "train.threads=1", "--quiet"]


def _losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"]) for r in records], [r["loss"] for r in records]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(char_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    exact = [*COMMON, "train.precision=fp32"]  # compared at fp32 rounding (auto may be bf16 on a CPU: 3 digits)
    single = subprocess.run([sys.executable, "-m", "glmlab", "train", "--data", str(char_data), "--out", str(one),
                             *exact, "train.batch_size=8"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "glmlab", "train", "--data", str(char_data), "--out", str(two), *exact,
                             "train.batch_size=4"], capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("max_steps after step 20") == 1  # only rank 0 reports
    keys_one, losses_one = _losses(one)
    keys_two, losses_two = _losses(two)
    assert keys_one == keys_two  # only rank 0 wrote metrics: no duplicated records
    assert losses_two == pytest.approx(losses_one, rel=1e-5, abs=1e-6)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "glm"])
def test_the_autoencoding_families_train_under_torchrun(char_data, tmp_path, family):
    """Each process corrupts its own windows (masks, blanks) from its own seeded generator."""
    run = tmp_path / family
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "glmlab", "train", "--data", str(char_data), "--out", str(run), *COMMON,
                             f"model.family={family}", "train.batch_size=4"], capture_output=True, text=True,
                            timeout=300)
    assert double.returncode == 0, double.stderr
    keys, losses = _losses(run)
    assert (20, "val") in keys and all(0 < loss < 10 for loss in losses)
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_seqgans_adversarial_phase_is_refused_under_torchrun_and_runs_after_a_resume_on_one_process(
        shakespeare_excerpt, tmp_path):
    from glmlab.data.prepare import prepare

    data, run = tmp_path / "words", tmp_path / "gan"
    prepare([shakespeare_excerpt], data, tokenizer="word", vocab_size=300, sentences=True)
    gan = ["model.family=seqgan", "model.block_size=12", "model.n_embd=8", "model.n_hidden=16", "model.d_embd=8",
           "model.d_filter_sizes=1,2", "model.d_num_filters=4,4", "model.rollout_num=2", "model.adv_batch=8",
           "model.d_samples=16", "model.d_pretrain_steps=1", "model.adv_eval_interval=1", "train.batch_size=4",
           "train.max_steps=4", "train.eval_interval=2", "train.sample_tokens=0", "train.threads=1", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "glmlab",
                "train", "--data", str(data)]
    refused = subprocess.run([*torchrun, "--out", str(tmp_path / "refused"), *gan, "model.adv_rounds=2"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "the adversarial phase runs on one process" in refused.stderr and "model.adv_rounds=0" in refused.stderr
    pretrained = subprocess.run([*torchrun, "--out", str(run), *gan, "model.adv_rounds=0"], capture_output=True,
                                text=True, timeout=300)
    assert pretrained.returncode == 0, pretrained.stderr
    resumed = subprocess.run([sys.executable, "-m", "glmlab", "train", "--resume", "--out", str(run),
                              "model.adv_rounds=2", "--quiet"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "adversarial"] == [5, 6]
