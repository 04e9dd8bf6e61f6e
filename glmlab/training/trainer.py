"""The training loop shared by every maximum-likelihood family.

One step: ``grad_accum`` micro-batches of random windows, each ``model.loss(x, y)`` under autocast,
backward, gradient clipping, fused AdamW. Every ``eval_interval`` steps: validation NLL, the ``last``
checkpoint, the ``best`` weights if improved, loss.png and samples.txt. Budgets: ``max_steps``,
``max_time`` and early-stopping ``patience``. Ctrl-C (or SIGTERM) finishes the current step, saves a
checkpoint and stops; ``resume`` continues bit-for-bit from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from glmlab import __version__, atomic
from glmlab.config import RunConfig, TrainConfig
from glmlab.data.dataset import DataDir, RandomWindows, open_data_dir
from glmlab.errors import DataError, GlmlabError, RunDirError
from glmlab.evaluation.likelihood import sum_nll
from glmlab.generation.generate import GenerationSettings, generate
from glmlab.models import build_model
from glmlab.runs import BEST_DIR, CONFIG, LOSS_PLOT, METRICS, SAMPLES, TOKENIZER, WEIGHTS, save_weights
from glmlab.runtime import autocast, precision_name, resolve_precision, select_device, set_threads
from glmlab.training.checkpoint import load_checkpoint, save_checkpoint
from glmlab.training.metrics import MetricsLog, plot_losses
from glmlab.training.optim import learning_rate, make_optimizer
from glmlab.training.progress import Progress


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    last_val_loss: float
    stopped_by: str  # max_steps | max_time | patience | interrupted
    elapsed: float
    tokens_per_sec: float


class _StopFlag:
    """Set by SIGINT/SIGTERM so the loop stops between steps; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True


@contextmanager
def _graceful_stop(flag: _StopFlag):
    try:
        previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _prepare_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / CONFIG).is_file():
            raise RunDirError(f"cannot resume: {out} holds no run (no {CONFIG})", "drop --resume to start a new run")
        return
    if out.exists() and (out / CONFIG).exists():
        raise RunDirError(f"{out} already holds a run", "pass --resume to continue it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory", "choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _progress_fraction(cfg: TrainConfig, step: int, elapsed: float) -> float:
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    by_time = elapsed / cfg.max_time if cfg.max_time else 0.0
    return max(by_steps, by_time)


def train(config: RunConfig, data_dir: str | Path, out: str | Path, resume: bool = False,
          show_progress: bool = True) -> TrainResult:
    """Train ``config`` on a prepared data directory into run directory ``out``."""
    out = Path(out)
    data: DataDir = open_data_dir(data_dir)
    tokenizer = data.tokenizer
    mcfg, cfg = config.model, config.train
    if mcfg.vocab_size == 0:
        mcfg.vocab_size = tokenizer.vocab_size
    elif mcfg.vocab_size < tokenizer.vocab_size:
        raise GlmlabError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens", "set model.vocab_size=0 to take it from the data")
    train_tokens = data.tokens("train")
    val_tokens = data.tokens("val")
    if len(val_tokens) == 0:
        raise DataError(f"{data.path} has an empty validation split", "re-run glmlab prepare with a val fraction")
    if len(val_tokens) < mcfg.block_size + 1:
        raise DataError(f"model.block_size={mcfg.block_size} is larger than the validation split "
                        f"({len(val_tokens):,} tokens)", "lower model.block_size or give more validation text")
    _prepare_run_dir(out, resume)

    device = select_device(cfg.device)
    set_threads(cfg.threads)
    amp_dtype = resolve_precision(cfg.precision, device)
    amp = autocast(device, amp_dtype)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    sampler = RandomWindows(train_tokens, mcfg.block_size, cfg.batch_size, cfg.seed)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "tokens": 0, "best_val_loss": math.inf,
                             "last_val_loss": math.inf, "evals_without_improvement": 0}
    if resume:
        saved = load_checkpoint(out, model)
        optimizer.load_state_dict(saved["optimizer"])
        sampler.load_state_dict(saved["sampler"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        state.update({k: saved[k] for k in state})
        if state["step"] >= cfg.max_steps:
            raise GlmlabError(f"{out} already reached train.max_steps={cfg.max_steps} (step {state['step']})",
                              f"raise the budget to continue, e.g. train.max_steps={cfg.max_steps * 2}")
    else:
        tokenizer.save(out / TOKENIZER)
    atomic.write_json(out / CONFIG, {**config.to_dict(), "data": {"dir": str(data.path.resolve()),
                                                                   "tokenizer": data.meta["tokenizer"],
                                                                   "vocab_size": tokenizer.vocab_size},
                                     "glmlab_version": __version__})

    loss_fn = torch.compile(model.loss) if cfg.compile else model.loss
    metrics = MetricsLog(out / METRICS, resume_step=state["step"] if resume else None)
    progress = Progress(cfg.max_steps, state["step"], cfg.max_time, enabled=show_progress)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * mcfg.block_size
    n_params = sum(p.numel() for p in model.parameters())
    progress.message(f"{'resuming' if resume else 'training'} {mcfg.family}: {n_params / 1e6:.2f}M parameters, "
                     f"{precision_name(amp_dtype)} on {device} ({torch.get_num_threads()} threads), "
                     f"{tokens_per_step:,} tokens/step, from step {state['step']} -> {out}")

    def checkpoint() -> None:
        extra = {"scaler": scaler.state_dict()} if scaler is not None else {}
        save_checkpoint(out, model, {**state, "optimizer": optimizer.state_dict(),
                                     "sampler": sampler.state_dict(), **extra})

    def evaluate() -> None:
        limit = cfg.eval_tokens or len(val_tokens)
        nll, count = sum_nll(model, val_tokens[:limit], tokenizer.eos_id, batch_size=cfg.batch_size,
                             device=device, autocast=amp)
        val = nll / count
        improved = val < state["best_val_loss"]
        state["last_val_loss"] = val
        if improved:
            state["best_val_loss"] = val
            state["evals_without_improvement"] = 0
            save_weights(model, out / BEST_DIR / WEIGHTS)
        else:
            state["evals_without_improvement"] += 1
        metrics.write({"step": state["step"], "split": "val", "loss": val, "best_loss": state["best_val_loss"],
                       "elapsed": state["elapsed"]})
        checkpoint()
        plot_losses(metrics.records, out / LOSS_PLOT, title=f"{out.name}: {mcfg.family}")
        _write_samples(out, model, tokenizer, cfg, state["step"], val)
        progress.val = val
        progress.message(f"step {state['step']}: val loss {val:.4f}{' (best)' if improved else ''}")

    stop = _StopFlag()
    stopped_by = "max_steps"
    session_start = time.perf_counter()
    elapsed_at_start = state["elapsed"]
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=device)
    evaluated_at = -1
    model.train()
    with _graceful_stop(stop):
        while state["step"] < cfg.max_steps:
            lr = learning_rate(cfg, state["step"], _progress_fraction(cfg, state["step"], state["elapsed"]))
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                x, y = sampler.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp:
                    loss = loss_fn(x, y) / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["elapsed"] = elapsed_at_start + time.perf_counter() - session_start
            window_tokens += tokens_per_step
            window_steps += 1

            if state["step"] % cfg.log_interval == 0 or state["step"] == cfg.max_steps:
                mean_loss = float(loss_sum) / window_steps
                seconds = time.perf_counter() - window_start
                rate = window_tokens / seconds
                if not math.isfinite(mean_loss):
                    metrics.close()
                    progress.close()
                    raise GlmlabError(f"the training loss became {mean_loss} by step {state['step']}; stopped "
                                      f"(the last checkpoint in {out} is from before)",
                                      "lower train.lr, raise train.warmup_steps, or use train.precision=fp32")
                metrics.write({"step": state["step"], "split": "train", "loss": mean_loss, "lr": lr,
                               "tokens_per_sec": rate, "elapsed": state["elapsed"]})
                progress.update(state["step"], mean_loss, rate, state["elapsed"], window_steps / seconds)
                loss_sum.zero_()
                window_start, window_tokens, window_steps = time.perf_counter(), 0, 0

            if stop.set:
                stopped_by = "interrupted"
                break
            out_of_time = cfg.max_time is not None and state["elapsed"] >= cfg.max_time
            if state["step"] % cfg.eval_interval == 0 or out_of_time:
                evaluate()
                evaluated_at = state["step"]
                window_start = time.perf_counter()  # evaluation time is not training throughput
                if cfg.patience and state["evals_without_improvement"] >= cfg.patience:
                    stopped_by = "patience"
                    break
            if out_of_time:
                stopped_by = "max_time"
                break
        if stopped_by == "interrupted":
            checkpoint()
            progress.message(f"interrupted at step {state['step']}: checkpoint saved in {out}; continue with "
                             f"glmlab train --resume --out {out}")
        elif evaluated_at != state["step"]:
            evaluate()
    metrics.close()
    progress.close()
    total_time = state["elapsed"]
    return TrainResult(out, state["step"], state["best_val_loss"], state["last_val_loss"], stopped_by, total_time,
                       state["tokens"] / total_time if total_time else 0.0)


def _write_samples(out: Path, model: nn.Module, tokenizer: Any, cfg: TrainConfig, step: int, val: float) -> None:
    """samples.txt: a short sample from the current weights, so progress can be read, not just plotted."""
    if cfg.sample_tokens == 0:
        return
    prompt = cfg.sample_prompt if not tokenizer.unencodable(cfg.sample_prompt) else ""
    settings = GenerationSettings(max_new_tokens=cfg.sample_tokens, temperature=0.8, seed=cfg.seed)
    text = generate(model, tokenizer, prompt, settings)[0]
    atomic.write_text(out / SAMPLES, f"# step {step}, val loss {val:.4f}, temperature 0.8, seed {cfg.seed}, "
                                     f"prompt {prompt!r}\n{prompt}{text}\n")


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """Model keys that differ between two configs (a resumed run may change train.* keys only)."""
    a, b = dataclasses.asdict(old.model), dataclasses.asdict(new.model)
    return [f"model.{k}" for k in a if a[k] != b.get(k) and not (k == "vocab_size" and b.get(k) == 0)]
