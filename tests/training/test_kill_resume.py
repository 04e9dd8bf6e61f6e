"""A run killed with SIGKILL at random moments and resumed each time ends exactly like an uninterrupted run."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY_MODEL, TINY_TRAIN

ARGS = [*TINY_MODEL, *TINY_TRAIN, "model.dropout=0.1", "train.max_steps=300", "train.checkpoint_interval=7",
        "train.eval_interval=50", "train.log_interval=1", "train.threads=1", "--quiet"]


def _train(char_data, out, resume=False, extra=()):
    cmd = [sys.executable, "-m", "glmlab", "train", "--out", str(out), *ARGS, *extra]
    cmd += ["--resume"] if resume else ["--data", str(char_data)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _last_step(out):
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, json.JSONDecodeError, IndexError):
        return 0


def _summary(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["split"], r["loss"]) for r in records]
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    best = hashlib.sha256((out / "best" / "model.safetensors").read_bytes()).hexdigest()
    return losses, weights, best


@pytest.mark.slow
@pytest.mark.parametrize("family, steps, kills_at_least", [("gpt", 300, 3), ("bert", 120, 2), ("glm", 120, 2)])
def test_sigkill_at_random_steps_then_resume_is_bit_exact(char_data, tmp_path, family, steps, kills_at_least):
    """bert's masks and glm's blanks are drawn from the generator checkpoints save, so they resume exactly too."""
    extra = [f"model.family={family}", f"train.max_steps={steps}"]
    reference = tmp_path / "reference"
    proc = _train(char_data, reference, extra=extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    resume = False
    for target in sorted(rng.sample(range(10, steps - 20), kills_at_least + 1)):
        proc = _train(char_data, out, resume=resume, extra=extra)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _last_step(out) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        resume = True
        if proc.returncode == 0:
            break
    assert kills >= kills_at_least
    proc = _train(char_data, out, resume=True, extra=extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _summary(out) == _summary(reference)
