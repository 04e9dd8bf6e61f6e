"""Training phases: what one step of the trainer's loop does, and what it logs.

The trainer (:mod:`glmlab.training.trainer`) runs its phases one after the other over one step counter and
owns what every phase shares: the budgets, the collective stop decision, evaluation, checkpoints and the
files they write. A phase supplies its steps, its training records and the record of each evaluation.
:class:`MaximumLikelihood` is every run's first phase (the optimiser step on the task's batches); a
family may ask for more (``traits.phases``: SeqGAN's adversarial rounds,
:class:`~glmlab.training.adversarial.AdversarialPhase`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from glmlab.config import TrainConfig
from glmlab.errors import GlmlabError
from glmlab.models.contract import TrainingHook
from glmlab.runs import checkpoint_dirs
from glmlab.training.distributed import Distributed
from glmlab.training.metrics import MetricsLog
from glmlab.training.optim import budget_used, learning_rate
from glmlab.training.progress import Progress

MAX_CONSECUTIVE_SKIPS = 25


@dataclass
class RunLog:
    """Where phases report: ``metrics.jsonl`` records and the progress display (both silent off rank 0)."""

    metrics: MetricsLog
    progress: Progress


class Phase(Protocol):
    """A stretch of trainer steps ending at step ``end``. Per step the trainer calls :meth:`step`, advances
    the step counter and the clock, then :meth:`record`; it evaluates when :meth:`evaluation_due`, and
    checkpoints then and when :meth:`checkpoint_due`."""

    name: str  # the key of its state in checkpoints
    end: int  # the trainer step at which it is complete
    selects_best: bool  # its evaluations pick the best weights, count for patience, write samples and loss.png
    one_process: str | None  # None: it runs under torchrun too; else why not, as the fix to give

    def begin(self, state: dict[str, Any], log: RunLog) -> None:
        """Before its first step (and when a run resumes within it)."""

    def step(self, state: dict[str, Any]) -> None:
        """One step; ``state`` is the run's checkpointed counters (``state["step"]`` not yet advanced)."""

    def record(self, state: dict[str, Any], log: RunLog) -> None:
        """After the step counter and clock moved: the step's accounting and any training record."""

    def decision_due(self, step: int) -> bool:
        """Whether processes meet at this step to decide on stopping (every step with one process)."""

    def evaluation_due(self, step: int) -> bool: ...

    def checkpoint_due(self, step: int) -> bool: ...

    def settle(self, state: dict[str, Any]) -> None:
        """Before an evaluation or checkpoint: raise if training went wrong; put pending figures in ``state``."""

    def evaluation_record(self, state: dict[str, Any], val: float, figures: dict[str, Any],
                          improved: bool) -> tuple[dict[str, Any], str]:
        """The metrics.jsonl record and the message of an evaluation."""

    def evaluated(self) -> None:
        """After an evaluation and its checkpoint (time spent there is not training time)."""

    def finish(self, save_best: Any) -> None:
        """After its last step; ``save_best()`` writes the current weights as the run's best."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Optimisation:
    """What an optimiser step is made of, set up by the trainer: the model and the module that computes its
    loss (wrapped for DDP and torch.compile), the optimiser, the gradient scaler of fp16, autocast."""

    model: nn.Module
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp: Any
    dist: Distributed
    device: torch.device


class MaximumLikelihood:
    """Every run's first phase, ``train.max_steps`` optimiser steps: ``grad_accum`` micro-batches of the task's
    batches, each ``loss(x, y)`` under autocast, backward (gradients averaged across processes by DDP),
    clipping, AdamW; the family's hooks first (a VAE's aggressive encoder updates). The loss is summed on the
    device and read back only when a training record is written (every ``log_interval`` steps)."""

    name = "mle"
    selects_best = True
    one_process = None

    def __init__(self, cfg: TrainConfig, parts: Optimisation, sampler: Any, hooks: list[TrainingHook],
                 state: dict[str, Any], out: Path) -> None:
        self.cfg, self.parts, self.sampler, self.hooks, self.out = cfg, parts, sampler, hooks, out
        self.end = cfg.max_steps
        self.checkpoint_every = cfg.checkpoint_interval or cfg.eval_interval
        self.loss_sum = torch.tensor(state["window_loss"], device=parts.device, dtype=torch.float64)
        self.bad_step = torch.tensor(-1, device=parts.device)  # first step whose loss was not finite (on device)
        self.stat_sums: dict[str, torch.Tensor] = {}
        self.consecutive_skips = 0
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.lr = cfg.lr
        self.step_tokens = 0
        self._last: tuple[torch.Tensor, bool] | None = None

    # --- the step -----------------------------------------------------------------------------------------------

    def begin(self, state: dict[str, Any], log: RunLog) -> None:
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def step(self, state: dict[str, Any]) -> None:
        cfg = self.cfg
        self.lr = learning_rate(cfg, state["step"], budget_used(cfg, state["step"], state["elapsed"]))
        self.step_tokens = 0
        self._last = self._optimiser_step(state["step"])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch on the device (counted in the step's tokens); a hook's batches too."""
        x, y = self.sampler.next_batch()
        self.step_tokens += self.sampler.last_tokens * self.parts.dist.world_size
        if self.parts.device.type == "cuda":  # pinned memory: the copy does not wait for the GPU (no host sync)
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.parts.device, non_blocking=True), y.to(self.parts.device, non_blocking=True)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A batch's training loss through the wrapped module, under autocast (a hook's updates use it too)."""
        with self.parts.amp:
            return self.parts.step_module(x, y)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parts.optimizer

    @property
    def grad_clip(self) -> float:
        return self.cfg.grad_clip

    def _optimiser_step(self, step: int) -> tuple[torch.Tensor, bool]:
        """One optimiser step; returns the (device) loss and whether the update was applied."""
        cfg, p = self.cfg, self.parts
        for group in p.optimizer.param_groups:
            group["lr"] = self.lr
        p.model.set_step(step)
        for hook in self.hooks:
            hook.before_step(self)
        frozen = [q for hook in self.hooks for q in hook.frozen()]
        total = torch.zeros((), device=p.device)
        for micro in range(cfg.grad_accum):
            x, y = self.next_batch()
            sync = micro == cfg.grad_accum - 1 or not p.dist.enabled
            with nullcontext() if sync else p.step_module.no_sync(), p.amp:
                loss = p.step_module(x, y) / cfg.grad_accum
            (p.scaler.scale(loss) if p.scaler else loss).backward()
            total += loss.detach()
            self._add_stats(1.0 / cfg.grad_accum)
        for q in frozen:  # e.g. the encoder while a VAE trains it aggressively: this step updates the decoder
            q.grad = None
        if p.scaler is not None:
            p.scaler.unscale_(p.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        if cfg.on_nonfinite == "skip":  # one host sync per step, only in this mode
            finite = bool(torch.isfinite(total)) and (norm is None or bool(torch.isfinite(norm)))
            if p.dist.any(not finite, p.device):
                p.optimizer.zero_grad(set_to_none=True)
                if p.scaler is not None:
                    p.scaler.update()
                return total, False
        if p.scaler is not None:
            p.scaler.step(p.optimizer)
            p.scaler.update()
        else:
            p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        return total, True

    def _add_stats(self, scale: float) -> None:
        """Accumulate the model's per-batch statistics (a VAE's reconstruction, KL, beta, ELBO) on device."""
        for key, value in self.parts.model.stats.items():
            value = value.to(self.parts.device, torch.float64) * scale
            self.stat_sums[key] = self.stat_sums[key] + value if key in self.stat_sums else value

    # --- accounting and records ---------------------------------------------------------------------------------

    def record(self, state: dict[str, Any], log: RunLog) -> None:
        loss, applied = self._last
        state["tokens"] += self.step_tokens
        self.window_tokens += self.step_tokens
        self._account(state, loss, applied, log.progress)
        step = state["step"]
        if step % self.cfg.log_interval == 0 or step == self.cfg.max_steps:
            seconds = time.perf_counter() - self.window_start
            self._log(state, self.window_tokens / seconds, seconds, log)
            self.window_start, self.window_tokens = time.perf_counter(), 0

    def _account(self, state: dict[str, Any], loss: torch.Tensor, applied: bool, progress: Progress) -> None:
        """Add a step's loss to the window (on device: no sync), or count a skipped batch."""
        if applied:
            self.consecutive_skips = 0
            self.loss_sum += loss
            state["window_steps"] += 1
            self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), state["step"], self.bad_step)
            return
        self.consecutive_skips += 1
        state["skipped_batches"] += 1
        progress.message(f"step {state['step']}: non-finite loss, batch skipped ({state['skipped_batches']} so far)")
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise GlmlabError(f"{self.consecutive_skips} batches in a row had a non-finite loss (up to step "
                              f"{state['step']}); stopped", "lower train.lr or use train.precision=fp32")

    def _log(self, state: dict[str, Any], rate: float, seconds: float, log: RunLog) -> None:
        """A train line: the window's mean loss over every process, tokens/s; then a fresh window."""
        self._guard(state)
        dist, device = self.parts.dist, self.parts.device
        steps = max(state["window_steps"], 1)
        mean_loss = dist.sum([float(self.loss_sum)], device)[0] / steps / dist.world_size
        stats = {k: float(v) / steps for k, v in self.stat_sums.items()}
        self.stat_sums = {}
        log.metrics.write({"step": state["step"], "split": "train", "loss": mean_loss, "lr": self.lr,
                           "tokens_per_sec": rate, "elapsed": state["elapsed"], **stats})
        log.progress.update(state["step"], mean_loss, rate, state["elapsed"], steps / seconds)
        self.loss_sum.zero_()
        state["window_steps"] = 0

    def _guard(self, state: dict[str, Any]) -> None:
        """Stop (before any checkpoint can save them) when a non-finite loss has reached the weights."""
        step = int(self.bad_step)
        if not self.parts.dist.any(step >= 0, self.parts.device):
            return
        saved = checkpoint_dirs(self.out)
        kept = (f"The last checkpoint ({saved[0].name}, before step {step}) in {self.out} is intact" if saved else
                "No checkpoint had been written yet")
        then = "; then --resume" if saved else "; then start again"
        raise GlmlabError(f"the training loss became non-finite at step {step}; stopped. {kept}",
                          "lower train.lr or raise train.warmup_steps, use train.precision=fp32, or skip such "
                          f"batches with train.on_nonfinite=skip{then}")

    def settle(self, state: dict[str, Any]) -> None:
        self._guard(state)
        state["window_loss"] = float(self.loss_sum)

    # --- the trainer's schedule ---------------------------------------------------------------------------------

    def decision_due(self, step: int) -> bool:
        return step % self.cfg.log_interval == 0 or step == self.cfg.max_steps or self.evaluation_due(step) \
            or self.checkpoint_due(step)

    def evaluation_due(self, step: int) -> bool:
        return step % self.cfg.eval_interval == 0

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint_every == 0

    def evaluation_record(self, state: dict[str, Any], val: float, figures: dict[str, Any],
                          improved: bool) -> tuple[dict[str, Any], str]:
        record = {"step": state["step"], "split": "val", "loss": val, "best_loss": state["best_val_loss"],
                  "elapsed": state["elapsed"], **figures}
        extras = "".join(f", {k.replace('_', ' ')} {v:.3g}" for k, v in figures.items() if not isinstance(v, bool))
        if figures.get("aggressive_ended"):
            extras += "; mutual information stopped rising: aggressive encoder training ends"
        return record, f"step {state['step']}: val loss {val:.4f}{' (best)' if improved else ''}{extras}"

    def evaluated(self) -> None:
        self.window_start = time.perf_counter()  # evaluation time is not training throughput

    def finish(self, save_best: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
