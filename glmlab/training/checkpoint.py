"""Crash-safe checkpoints: one directory per checkpoint, committed by a checksum manifest.

``RUN_DIR/checkpoints/step-00000250/`` holds ``model.safetensors``, ``trainer_state.pt`` (optimizer,
schedule, step, data position, every RNG state; read with ``weights_only=True``) and, written last,
``manifest.json`` with the sha256 and size of each file. The directory is built under a temporary
name and renamed into place, so a kill at any moment leaves either a complete checkpoint or none.
On resume the newest checkpoint whose files match their manifest is used; a damaged one is
reported and skipped, never loaded silently. ``RUN_DIR/model.safetensors`` and
``RUN_DIR/trainer_state.pt`` are hard links to the newest checkpoint's files (no extra disk).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_model

from glmlab import atomic
from glmlab.errors import GlmlabError, RunDirError
from glmlab.runs import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    MANIFEST,
    TRAINER_STATE,
    WEIGHTS,
    checkpoint_dirs,
    checksum_path,
    file_sha256,
    load_weights,
    write_checksum,
)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_error(path: Path, exc: OSError) -> GlmlabError:
    """A failed write during training: what went wrong, and that the last checkpoint still stands."""
    return atomic.write_error(path, exc, "free space or choose a writable --out; the previous checkpoint, if "
                                         "any, is intact, and --resume continues from it")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(source: Path, target: Path) -> None:
    """Point ``target`` at ``source``'s content atomically (a hard link where possible)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def verify(directory: Path) -> str | None:
    """None if every file matches the manifest; otherwise what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not (isinstance(files, dict) and files and all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                for e in files.values())):
            raise ValueError("files is not {name: {sha256, bytes}}")
    except (ValueError, KeyError, TypeError):  # not JSON (or not UTF-8), or JSON of another shape
        return "the manifest is damaged"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} is truncated or has the wrong size"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint for ``state['step']``, point the top-level files at it, keep the newest ``keep``."""
    root = run_dir / CHECKPOINTS
    final = root / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-*"):  # from a write that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        for stale in checkpoint_dirs(run_dir):  # newer than this step: damaged ones resume skipped; keep aside
            if int(stale.name[len(CHECKPOINT_PREFIX):]) > state["step"]:
                os.replace(stale, root / f"damaged-{stale.name}")
        tmp.mkdir()
        with atomic.os_errors(tmp / WEIGHTS):
            save_model(model, str(tmp / WEIGHTS))
        atomic.usual_permissions(tmp / WEIGHTS)  # safetensors writes 0600; every other file is 0666 less the umask
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (tmp / TRAINER_STATE).write_bytes(buffer.getvalue())
        files = {}
        for name in (WEIGHTS, TRAINER_STATE):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        atomic.write_json(tmp / MANIFEST, {"step": state["step"], "files": files})
        _fsync_dir(tmp)
        old = root / f".old-{final.name}"
        if final.exists():  # the same step saved again: keep the old copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        checksum_path(run_dir / WEIGHTS).unlink(missing_ok=True)  # never vouching for the weights it replaces
        for name in (WEIGHTS, TRAINER_STATE):
            _link_or_copy(final / name, run_dir / name)
        write_checksum(run_dir / WEIGHTS, files[WEIGHTS]["sha256"])
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(run_dir, exc) from None
    for old in checkpoint_dirs(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, model: nn.Module) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Load the newest intact checkpoint into ``model``.

    Returns its trainer state (RNG not yet restored) and the (name, problem) of every newer
    checkpoint that was damaged and skipped, for the caller to report.
    """
    candidates = checkpoint_dirs(run_dir)
    if not candidates:
        raise RunDirError(f"{run_dir} has no checkpoint to resume from", "start a new run without --resume")
    problems = []
    for directory in candidates:
        problem = verify(directory)
        if problem is None:
            try:  # weights_only: a trainer state holding anything but tensors and plain data is not read
                state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                    raise ValueError("not a trainer state")
            except Exception as exc:  # noqa: BLE001 — unpickling errors have many types; the file is what failed
                problem = f"{TRAINER_STATE} cannot be read ({type(exc).__name__})"
            else:
                load_weights(model, directory / WEIGHTS, verify=False)  # verified with its manifest just now
                return state, [(d.name, why) for d, why in problems]
        problems.append((directory, problem))
    listing = "; ".join(f"{d.name}: {why}" for d, why in problems)
    raise RunDirError(f"no intact checkpoint in {run_dir / CHECKPOINTS} ({listing})",
                      "start a new run; weights in best/model.safetensors may still be usable to generate")
