"""The optimiser (AdamW with decay / no-decay parameter groups, or Muon for the hidden matrices with AdamW for the
rest) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from glmlab.config import TrainConfig
from glmlab.errors import ConfigError, GlmlabError
from glmlab.models.contract import FamilyModel, decays, is_hidden
from glmlab.models.transformer import Conv1D
from glmlab.runtime import cpu_has_fast_bf16

NARROW_OUTPUT = 16  # a Linear layer with fewer outputs is a head (class scores, a critic's value), not a hidden layer


def parameter_groups(model: nn.Module, weight_decay: float, skip: frozenset[int] = frozenset()) -> list[dict]:
    """Weight decay on matrices (dim >= 2: linear weights, embeddings); none on biases and norms, nor on
    parameters marked ``no_weight_decay`` (a learned prior's means and variances). ``skip``: ids of parameters
    another optimiser takes (Muon's matrices)."""
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() de-duplicates tied weights
        if p.requires_grad and id(p) not in skip:
            (decay if decays(p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon orthogonalises: the matrices of the model's linear layers (``nn.Linear``, and the Transformer
    blocks' ``Conv1D``, GPT-2's transposed layout), except its output layers (every family's logits layer is named
    ``*head`` or shares the token embedding's weight; a layer inside a ``head`` module, like BERT's MLM transform,
    belongs to it; a layer with fewer than 16 outputs is a score or class head; a layer marked ``not_hidden`` is an
    input or output map of a latent), LoRA-adapted layers (their weight is computed; the adapter's factors go to
    AdamW) and modules outside the language model (``traits.auxiliary``: a SeqGAN's discriminator, which maximum
    likelihood does not train).
    Embeddings, heads, recurrent cells, norms and biases stay with AdamW, as in Muon's recipe (Jordan et al.,
    2024)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    auxiliary = model.traits.auxiliary if isinstance(model, FamilyModel) else ()
    chosen, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | Conv1D) or parametrize.is_parametrized(module, "weight"):
            continue  # a LoRA-adapted layer's weight is computed from its frozen base and the adapter's factors
        w = module.weight
        if not w.requires_grad or not is_hidden(w) or name.split(".")[0] in auxiliary:
            continue
        outputs = w.size(1) if isinstance(module, Conv1D) else w.size(0)
        output = outputs < NARROW_OUTPUT or any(part.endswith("head") for part in name.split(".")[-2:])
        if output or id(w) in embedded or id(w) in seen:
            continue
        seen.add(id(w))
        chosen.append(w)
    return chosen


def _adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where this PyTorch supports it on ``device`` (one kernel for the whole update)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


class Fp32Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz orthogonalisation in fp32 instead of bf16, for a CPU without fast
    bf16 matmuls: torch's Muon always orthogonalises in bf16, which such a CPU emulates (an AVX2 EPYC ran a bf16
    matmul at 1 GFLOP/s against fp32's 177). The same algorithm: Nesterov momentum, five quintic iterations on the
    update scaled to unit norm, decoupled weight decay, Moonshot's per-matrix learning-rate scale."""

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for p, grad, buffer in zip(params, grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"]).to(p.dtype),
                       alpha=-lr * muon_lr_scale(group["adjust_lr_fn"], p.shape))


def muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix learning-rate factor, as torch's ``adjust_lr_fn`` names them: Moonshot's
    ``match_rms_adamw`` (0.2 sqrt(max(A, B)): AdamW's update size) or Keller Jordan's ``original``."""
    rows, cols = shape[0], shape[1]
    return 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, rows / cols))


def orthogonalise(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Muon's Newton-Schulz iterations on ``update`` in fp32 (Jordan et al., 2024): roughly U V^T of its SVD."""
    a, b, c = coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonWithAdamW:
    """Muon (``torch.optim.Muon``: momentum, then the update's Newton-Schulz orthogonalisation) on the hidden
    matrices and AdamW on every other parameter, stepped together as one optimiser. Muon's learning rate is scaled
    per matrix to AdamW's update size (Moonshot's ``match_rms_adamw``), so one ``train.lr`` and one schedule drive
    both. ``param_groups`` lists both optimisers' groups (the schedule sets their ``lr``)."""

    kind = "muon"

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer) -> None:
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Both optimisers' groups, read afresh: ``load_state_dict`` replaces an optimiser's group dicts."""
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer | MuonWithAdamW:
    """``train.optimizer``: AdamW on every parameter, or Muon on the hidden matrices with AdamW on the rest."""
    if cfg.optimizer == "adamw":
        # a Muon setting would be ignored: refused here, where training starts (not where a saved run is read)
        if cfg.muon_momentum != TrainConfig.muon_momentum:
            raise ConfigError(f"train.muon_momentum={cfg.muon_momentum} applies to train.optimizer=muon, not adamw",
                              "drop train.muon_momentum, or set train.optimizer=muon")
        return _adamw(parameter_groups(model, cfg.weight_decay), cfg, device)
    hidden = hidden_matrices(model)
    if not hidden:
        raise GlmlabError(f"train.optimizer=muon, but this {type(model).__name__} has no trainable hidden matrices "
                          "for Muon (its trainable layers are embeddings, recurrent cells, input or output maps, "
                          "adapters, or modules outside the language model)",
                          "use train.optimizer=adamw")
    groups = parameter_groups(model, cfg.weight_decay, skip=frozenset(id(p) for p in hidden))
    fast_bf16 = device.type != "cpu" or cpu_has_fast_bf16()  # torch's Muon orthogonalises in bf16
    muon = (torch.optim.Muon if fast_bf16 else Fp32Muon)(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                         momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(_adamw([g for g in groups if g["params"]], cfg, device), muon)


def load_optimizer_state(optimizer: torch.optim.Optimizer | MuonWithAdamW, state: dict[str, Any],
                         cfg: TrainConfig) -> None:
    """Restore a checkpoint's optimiser state; a run resumed with another ``train.optimizer`` is refused."""
    saved = state.get("kind", "adamw")  # what wrote it: a MuonWithAdamW's state says so; AdamW's is torch's own
    if saved != cfg.optimizer:
        raise GlmlabError(f"the run's checkpoints were trained with train.optimizer={saved}, not {cfg.optimizer}",
                          f"resume with train.optimizer={saved}, or train a new run with --out NEW_DIR")
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:  # torch: "loaded state dict contains a parameter group that doesn't match the size ..."
        raise GlmlabError(f"the checkpoint's optimiser state does not fit this model's parameter groups ({exc})",
                          "this glmlab splits the parameters between Muon and AdamW differently from the one that "
                          "wrote the checkpoint: train a new run with --out NEW_DIR, or --init from this one") from exc


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
