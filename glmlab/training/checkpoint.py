"""Checkpoints: weights (safetensors) plus trainer state (torch, loaded with ``weights_only=True``).

The trainer state records the sha256 of the weights file it pairs with, so a mismatched or
damaged pair is detected on resume instead of being loaded silently.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from glmlab import atomic
from glmlab.errors import RunDirError
from glmlab.runs import TRAINER_STATE, WEIGHTS, file_sha256, load_weights, save_weights


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Write the weights, then the trainer state that names their hash (both atomically)."""
    sha = save_weights(model, run_dir / WEIGHTS)
    buffer = io.BytesIO()
    torch.save({**state, "weights_sha256": sha, "rng": rng_state()}, buffer)
    atomic.write_bytes(run_dir / TRAINER_STATE, buffer.getvalue())


def load_checkpoint(run_dir: Path, model: nn.Module) -> dict[str, Any]:
    """Load the last checkpoint's weights into ``model`` and return its trainer state (RNG restored)."""
    path = run_dir / TRAINER_STATE
    if not path.is_file() or not (run_dir / WEIGHTS).is_file():
        raise RunDirError(f"{run_dir} has no checkpoint to resume from ({TRAINER_STATE} / {WEIGHTS} missing)",
                          "start a new run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise RunDirError(f"{path} is damaged and cannot be loaded ({type(exc).__name__})",
                          "start a new run; the weights in model.safetensors can still be used to generate") from None
    if state.get("weights_sha256") != file_sha256(run_dir / WEIGHTS):
        raise RunDirError(f"{run_dir / WEIGHTS} does not match {TRAINER_STATE} (its hash differs)",
                          "the checkpoint was interrupted mid-write or edited; start a new run")
    load_weights(model, run_dir / WEIGHTS)
    set_rng_state(state["rng"])
    return state
