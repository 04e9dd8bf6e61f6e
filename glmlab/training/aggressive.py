"""Aggressive encoder training for a sentence VAE (He et al. 2019), run by the trainer before each step
while ``state["aggressive"]`` holds (it ends when mutual information stops rising at an evaluation)."""

from __future__ import annotations

import math
from typing import Any

import torch


def aggressive_encoder_updates(trainer: Any) -> None:
    """Update only the encoder on fresh batches until its loss stops falling (compared every 10 updates,
    at most ``model.aggressive_inner_steps``), through the run's own optimiser: AdamW skips the
    parameters whose gradient is None, so the decoder side stays as it is."""
    model = trainer.model
    encoder = {id(p) for p in model.encoder_parameters()}
    others = [p for p in model.parameters() if id(p) not in encoder]
    previous, window = math.inf, []
    for _ in range(trainer.mcfg.aggressive_inner_steps):
        x, y = trainer._next_batch()
        with trainer.amp:
            loss = trainer.step_module(x, y)
        loss.backward()
        for p in others:
            p.grad = None
        if trainer.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.cfg.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        if len(window) == 10:
            current = sum(window) / len(window)
            if current >= previous:
                break
            previous, window = current, []
