"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from glmlab.config import TrainConfig
from glmlab.models.contract import decays


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (dim >= 2: linear weights, embeddings); none on biases and norms, nor on
    parameters marked ``no_weight_decay`` (a learned prior's means and variances)."""
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() de-duplicates tied weights
        if p.requires_grad:
            (decay if decays(p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where this PyTorch supports it on ``device`` (one kernel for the whole update)."""
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """LR at ``step``: linear warm-up, then decay to ``min_lr`` as training ``progress`` goes 0 -> 1.

    ``progress`` is the fraction of the budget used (steps, or time when ``max_time`` binds first),
    so a time-limited run still finishes its decay.
    """
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr + (min_lr - cfg.lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def budget_used(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """The fraction of the budget used, which drives the decay: the larger of steps (after warm-up) and time."""
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    by_time = elapsed / cfg.max_time if cfg.max_time else 0.0
    return max(by_steps, by_time)
