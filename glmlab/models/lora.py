"""LoRA (Hu et al. 2021): W + (alpha / r) B A on chosen weight matrices, as a PyTorch parametrization.

Why not ``peft``: it adapts ``nn.Linear`` and transformers' ``Conv1D`` by class, and glmlab's GPT keeps
its projections in its own ``Conv1D`` (GPT-2's (in, out) layout, so checkpoints copy without transposes);
peft refuses those modules unless a custom-module mapping is registered, which it marks experimental.
A parametrization works on any weight matrix, keeps the module (and so the model's fast decoding path
and its weight names) unchanged, and merges back into a plain weight with one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from glmlab.errors import GlmlabError
from glmlab.models.contract import LanguageModel


class LoRA(nn.Module):
    """The low-rank update of one (rows, cols) matrix; B starts at zero, so training starts from W."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, cols))
        self.b = nn.Parameter(torch.zeros(rows, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.b @ self.a).to(weight.dtype) * self.scale


def lora_targets(model: LanguageModel) -> list[nn.Module]:
    """The modules whose ``weight`` LoRA adapts: those named by the family's ``traits.adapter_targets`` (a
    Transformer's attention and MLP projections)."""
    targets = model.traits.adapter_targets
    if not targets:
        raise GlmlabError(f"--mode lora adapts a Transformer's projection matrices, and this {model.traits.family} "
                          "model has none (an LSTM's gate weights live inside nn.LSTM, which a low-rank update "
                          "would have to bypass)", "use --mode full or --mode probe for this run")
    return [m for name, m in model.named_modules() if name.endswith(targets)]


def add_lora(model: LanguageModel, rank: int, alpha: float) -> int:
    """Freeze ``model`` and add trainable LoRA updates to its projections; returns the LoRA parameter count."""
    for p in model.parameters():
        p.requires_grad_(False)
    added = 0
    for module in lora_targets(model):
        rows, cols = module.weight.shape
        update = LoRA(rows, cols, rank, alpha).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", update)
        added += update.a.numel() + update.b.numel()
    return added


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its weight (W + scale B A) and remove the parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
