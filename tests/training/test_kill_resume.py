"""A run killed with SIGKILL at random moments and resumed each time ends exactly like an uninterrupted run.

Each run is a process of its own, forked from a forkserver that has imported glmlab (and torch) once: starting
``python -m glmlab`` costs ~4 s of imports on a slow CPU, six times per case. The child runs the CLI's ``main``
as ``python -m glmlab`` would, from a process that has run no PyTorch operation (no thread pool to inherit)."""

import hashlib
import json
import multiprocessing
import os
import random
import sys
import time

import pytest

from tests.conftest import TINY_MODEL, TINY_TRAIN

ARGS = [*TINY_MODEL, *TINY_TRAIN, "model.dropout=0.1", "train.max_steps=300", "train.checkpoint_interval=7",
        "train.eval_interval=50", "train.log_interval=1", "train.threads=1", "--quiet"]
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["glmlab.cli", "glmlab.training.trainer", "torch._dynamo", "matplotlib.figure"])


def _glmlab(argv: list[str], log: str) -> None:
    """In the child: glmlab's command line with stdout and stderr to ``log``."""
    from glmlab.cli import main

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.exit(main(argv))


def _train(char_data, out, resume=False, extra=()):
    argv = ["train", "--out", str(out), *ARGS, *extra]
    argv += ["--resume"] if resume else ["--data", str(char_data)]
    proc = FORKSERVER.Process(target=_glmlab, args=(argv, str(_log(out))))
    proc.start()
    return proc


def _log(out):
    """Where the run in ``out`` writes its stdout and stderr (all its processes, one after another)."""
    return out.parent / (out.name + ".log")


def _finished(proc, out) -> None:
    proc.join(timeout=300)
    assert proc.exitcode == 0, _log(out).read_text() if _log(out).exists() else proc.exitcode


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
    _finished(_train(char_data, reference, extra=extra), reference)

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    resume = False
    for target in sorted(rng.sample(range(10, steps - 20), kills_at_least + 1)):
        proc = _train(char_data, out, resume=resume, extra=extra)
        deadline = time.monotonic() + 120
        while proc.is_alive() and _last_step(out) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.is_alive():
            proc.kill()  # SIGKILL
            kills += 1
        proc.join(timeout=60)
        resume = True
        if proc.exitcode == 0:
            break
    assert kills >= kills_at_least
    _finished(_train(char_data, out, resume=True, extra=extra), out)
    assert _summary(out) == _summary(reference)
