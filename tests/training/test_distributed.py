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
    single = subprocess.run([sys.executable, "-m", "glmlab", "train", "--data", str(char_data), "--out", str(one),
                             *COMMON, "train.batch_size=8"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "glmlab", "train", "--data", str(char_data), "--out", str(two), *COMMON,
                             "train.batch_size=4"], capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    assert double.stdout.count("max_steps after step 20") == 1  # only rank 0 reports
    keys_one, losses_one = _losses(one)
    keys_two, losses_two = _losses(two)
    assert keys_one == keys_two  # only rank 0 wrote metrics: no duplicated records
    assert losses_two == pytest.approx(losses_one, rel=1e-5, abs=1e-6)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
