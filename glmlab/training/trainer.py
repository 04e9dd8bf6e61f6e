"""The training loop shared by every maximum-likelihood family, on one process or many (torchrun + DDP).

One step: ``grad_accum`` micro-batches of random windows, each ``model.loss(x, y)`` under autocast,
backward (gradients averaged across processes by DDP), clipping, fused AdamW. Every
``eval_interval`` steps: validation NLL (shared across processes), the ``best`` weights if improved,
loss.png and samples.txt; every ``checkpoint_interval`` steps a crash-safe checkpoint. Budgets:
``max_steps``, ``max_time``, early-stopping ``patience``. Ctrl-C / SIGTERM finish the step, save a
checkpoint and stop; ``resume`` continues bit-for-bit from the newest intact checkpoint.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import signal
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from glmlab import __version__, atomic
from glmlab.config import RunConfig, TrainConfig
from glmlab.data.dataset import RandomWindows, open_data_dir
from glmlab.data.sentences import SentenceBatches, find_sentences, sentence_batches
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError, GlmlabError, RunDirError
from glmlab.evaluation.likelihood import sum_nll, sum_nll_batches
from glmlab.models import build_model, get_family
from glmlab.runs import BEST_DIR, CONFIG, LOSS_PLOT, METRICS, TOKENIZER, WEIGHTS, save_weights
from glmlab.runtime import autocast, precision_name, resolve_precision, select_device, set_threads
from glmlab.training import distributed
from glmlab.training.adversarial import AdversarialPhase, adversarial_rounds
from glmlab.training.aggressive import aggressive_encoder_updates
from glmlab.training.checkpoint import (
    checkpoint_dirs,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_error,
)
from glmlab.training.metrics import MetricsLog, plot_losses
from glmlab.training.optim import learning_rate, make_optimizer
from glmlab.training.progress import Progress
from glmlab.training.samples import write_samples

MAX_CONSECUTIVE_SKIPS = 25


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    last_val_loss: float
    stopped_by: str  # max_steps | max_time | patience | interrupted
    elapsed: float
    tokens_per_sec: float
    main_process: bool = True  # False on the other ranks of a distributed run, which print nothing


class LossModule(nn.Module):
    """``forward(x, y) -> loss`` around a family model, so DDP and torch.compile wrap the whole loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


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


def _check_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / CONFIG).is_file():
            raise RunDirError(f"cannot resume: {out} holds no run (no {CONFIG})", "drop --resume to start a new run")
        return
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory", "choose another --out")
    if (out / CONFIG).exists():
        raise RunDirError(f"{out} already holds a run", "pass --resume to continue it, or choose another --out")


def _probe_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, when the output directory cannot be written."""
    probe = out / f".write-probe-{uuid.uuid4().hex}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        probe.unlink(missing_ok=True)
        raise write_error(out, exc) from None


def _progress_fraction(cfg: TrainConfig, step: int, elapsed: float) -> float:
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    by_time = elapsed / cfg.max_time if cfg.max_time else 0.0
    return max(by_steps, by_time)


class Trainer:
    """One training run: set up from a config, then :meth:`run`."""

    def __init__(self, config: RunConfig, data_dir: str | Path, out: str | Path, resume: bool = False,
                 show_progress: bool = True) -> None:
        self.config, self.out, self.resume = config, Path(out), resume
        self.mcfg, self.cfg = config.model, config.train
        self.dist = distributed.from_environment()
        self._open_data(data_dir)
        self._check_data()
        _check_run_dir(self.out, resume)
        device = select_device(self.cfg.device)
        self.device = distributed.setup(self.dist, device)
        self._lock = None
        self.on_main(lambda: _probe_writable(self.out))
        self.on_main(self._take_lock)
        set_threads(self.cfg.threads)
        self.amp_dtype = resolve_precision(self.cfg.precision, self.device)
        self.amp = autocast(self.device, self.amp_dtype)
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every process
        self.model = self._build_model().to(self.device)
        torch.manual_seed(self.cfg.seed + self.dist.rank)  # distinct dropout masks per process
        self.notes: list[str] = []
        if self.sentence_mode:
            self.model.sentence_level = True  # its samples and prompts start with <bos>, as its sentences did
        self._make_sampler()
        self.adversarial = None
        self.adv_rounds = int(getattr(self.mcfg, "adv_rounds", 0))
        if self.adv_rounds:
            self.adversarial = AdversarialPhase(self.model, self.sampler.sentences, self.tokenizer.bos_id,
                                                self.device, self.cfg.seed)
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "tokens": 0, "best_val_loss": math.inf,
                                      "last_val_loss": math.inf, "evals_without_improvement": 0,
                                      "skipped_batches": 0, "window_loss": 0.0, "window_steps": 0,
                                      "aggressive": bool(getattr(self.mcfg, "aggressive", False)),
                                      "last_mutual_info": -math.inf}
        self.stat_sums: dict[str, torch.Tensor] = {}
        self.eval_extras: dict[str, float] = {}
        self.saved_step = -1
        self.consecutive_skips = 0
        if resume:
            self._restore()
        step_module: nn.Module = LossModule(self.model)
        if self.dist.enabled:
            step_module = DistributedDataParallel(
                step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        use_compile = self.cfg.compile == "true" or (self.cfg.compile == "auto" and self.device.type == "cuda")
        self.step_module = torch.compile(step_module) if use_compile else step_module
        self.show_progress = show_progress and self.dist.is_main

    # --- setup ---------------------------------------------------------------------------------------------

    def on_main(self, action: Any) -> None:
        """Run ``action`` on rank 0 only; if it fails there, every rank stops with the error instead of
        waiting for rank 0 in the next collective."""
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                action()
            except (GlmlabError, OSError) as exc:
                failure = exc
        if self.dist.any(failure is not None, self.device):
            if failure is not None:
                raise failure
            raise GlmlabError("rank 0 stopped with an error (see its message above)")

    def _take_lock(self) -> None:
        """One trainer per run directory: a second one would interleave checkpoints with the first."""
        self._lock = open(self.out / ".lock", "w")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise RunDirError(f"another glmlab train is using {self.out}",
                              "wait for it to finish, or stop it (Ctrl-C saves a checkpoint)") from None

    def _open_data(self, data_dir: str | Path) -> None:
        self.data = open_data_dir(data_dir)
        self.tokenizer = self.data.tokenizer

    def _build_model(self) -> nn.Module:
        """The family's model with fresh weights (seeded by the caller)."""
        return build_model(self.mcfg)

    def _make_sampler(self) -> None:
        """Random windows of the token stream, or whole sentences (``train.batching``)."""
        cfg, tok = self.cfg, self.tokenizer
        if not self.sentence_mode:
            self.sampler: RandomWindows | SentenceBatches = RandomWindows(
                self.train_tokens, self.mcfg.block_size, cfg.batch_size, cfg.seed, rank=self.dist.rank,
                world_size=self.dist.world_size)
            return
        if tok.bos_id is None or tok.pad_id is None:
            raise DataError(f"the tokenizer of {self.data.path} has no <bos> or <pad> token, which sentence "
                            "batches need", "prepare the data with glmlab prepare (its tokenizers have both)")
        train = find_sentences(self.train_tokens, tok.eos_id, self.mcfg.block_size)
        self.val_sentences = find_sentences(self.val_tokens, tok.eos_id, self.mcfg.block_size)
        cumulative = self.val_sentences.lengths.cumsum()
        self.val_limit = int((cumulative < cfg.eval_tokens).sum()) + 1 if cfg.eval_tokens else None
        if train.truncated:
            self.notes.append(f"{train.truncated:,} of {len(train):,} training sentences are longer than "
                              f"model.block_size={self.mcfg.block_size} and were cut")
        self.sampler = SentenceBatches(train, cfg.batch_size, cfg.seed, tok.bos_id, tok.pad_id,
                                       rank=self.dist.rank, world_size=self.dist.world_size)

    def _val_batches(self):
        return sentence_batches(self.val_sentences, self.cfg.batch_size, self.tokenizer.bos_id,
                                self.tokenizer.pad_id, limit=self.val_limit)

    def _check_data(self) -> None:
        mcfg = self.mcfg
        batching = self.cfg.batching
        sentence_level = getattr(get_family(mcfg.family).model, "sentence_level", False)
        if batching == "windows" and sentence_level:
            raise GlmlabError(f"model.family={mcfg.family} trains on whole sentences",
                              "drop train.batching=windows (or set train.batching=sentences)")
        self.sentence_mode = batching == "sentences" or (batching == "auto" and sentence_level)
        if mcfg.vocab_size == 0:
            mcfg.vocab_size = self.tokenizer.vocab_size
        elif mcfg.vocab_size < self.tokenizer.vocab_size:
            raise GlmlabError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} tokens", "set model.vocab_size=0 to take it from the data")
        self.train_tokens = self.data.tokens("train")
        self.val_tokens = self.data.tokens("val")
        if len(self.val_tokens) == 0:
            raise DataError(f"{self.data.path} has an empty validation split",
                            "re-run glmlab prepare with a val fraction")
        if not self.sentence_mode and len(self.val_tokens) < mcfg.block_size + 1:
            raise DataError(f"model.block_size={mcfg.block_size} is larger than the validation split "
                            f"({len(self.val_tokens):,} tokens)", "lower model.block_size or give more validation text")

    def _restore(self) -> None:
        if self.tokenizer.hf.to_str() != Tokenizer.from_file(self.out / TOKENIZER).hf.to_str():
            raise GlmlabError(f"{self.data.path} was tokenized differently from the run in {self.out}",
                              "resume with the data directory the run was trained on (--data)")
        if not checkpoint_dirs(self.out):
            if (self.out / WEIGHTS).exists():
                raise RunDirError(f"{self.out} holds weights but no training checkpoint (an imported model?), "
                                  "so there is nothing to resume", "train a new run with --out NEW_DIR")
            self.notes.append(f"{self.out} has no checkpoint yet; starting from step 0")  # killed before one
            return
        saved, skipped = load_checkpoint(self.out, self.model)
        self.notes.extend(f"checkpoint {name} is damaged ({why}); skipped it" for name, why in skipped)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.sampler.load_state_dict(saved["sampler"])
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
        states = saved["rng"]
        set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])
        self.state.update({k: saved[k] for k in self.state if k in saved})
        if self.adversarial is not None and "adversarial" in saved:
            self.adversarial.load_state_dict(saved["adversarial"])
        if self.state["step"] >= self.cfg.max_steps + self.adv_rounds:
            raise GlmlabError(f"{self.out} already reached train.max_steps={self.cfg.max_steps} "
                              f"(step {self.state['step']})",
                              f"raise the budget to continue, e.g. train.max_steps={self.cfg.max_steps * 2}")

    def _write_run_files(self) -> None:
        kept: dict[str, Any] = {}
        if self.resume:  # keep what other tools recorded (e.g. special-token roles)
            kept = json.loads((self.out / CONFIG).read_text(encoding="utf-8"))
        else:
            self.tokenizer.save(self.out / TOKENIZER)
        atomic.write_json(self.out / CONFIG, {
            **kept, **self.config.to_dict(),
            "data": {"dir": str(self.data.path.resolve()), "tokenizer": self.data.meta["tokenizer"],
                     "vocab_size": self.tokenizer.vocab_size},
            "world_size": self.dist.world_size, "glmlab_version": __version__})

    # --- the pieces of a step ------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next_batch()
        self.step_tokens += getattr(self.sampler, "last_tokens", x.numel()) * self.dist.world_size
        if self.device.type == "cuda":  # pinned memory: the copy does not wait for the GPU (no host sync)
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _add_stats(self, scale: float) -> None:
        """Accumulate the model's per-batch statistics (a VAE's reconstruction, KL, beta, ELBO) on device."""
        for key, value in getattr(self.model, "stats", {}).items():
            value = value.to(self.device, torch.float64) * scale
            self.stat_sums[key] = self.stat_sums[key] + value if key in self.stat_sums else value

    def _aggressive_encoder_updates(self) -> None:
        aggressive_encoder_updates(self)

    def _train_step(self, lr: float) -> tuple[torch.Tensor, bool]:
        """One optimiser step; returns the (device) loss and whether the update was applied."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        cfg = self.cfg
        if hasattr(self.model, "set_step"):
            self.model.set_step(self.state["step"])
        aggressive = self.state["aggressive"]
        if aggressive:
            self._aggressive_encoder_updates()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self._next_batch()
            sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
            with nullcontext() if sync else self.step_module.no_sync(), self.amp:
                loss = self.step_module(x, y) / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
            self._add_stats(1.0 / cfg.grad_accum)
        if aggressive:  # the outer step updates the decoder only
            for p in self.model.encoder_parameters():
                p.grad = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        if cfg.on_nonfinite == "skip":  # one host sync per step, only in this mode
            finite = bool(torch.isfinite(total)) and (norm is None or bool(torch.isfinite(norm)))
            if self.dist.any(not finite, self.device):
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.update()
                return total, False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, True

    def _evaluate(self) -> float:
        """Validation loss over the first ``eval_tokens`` tokens, the work shared across processes."""
        shard = (self.dist.rank, self.dist.world_size)
        if self.sentence_mode:
            nll, count = sum_nll_batches(self.model, self._val_batches(), device=self.device, autocast=self.amp,
                                           shard=shard)
        else:
            limit = self.cfg.eval_tokens or len(self.val_tokens)
            nll, count = sum_nll(self.model, self.val_tokens[:limit], self.tokenizer.eos_id,
                                 batch_size=self.cfg.batch_size, device=self.device, autocast=self.amp, shard=shard)
        nll, count = self.dist.sum([nll, float(count)], self.device)
        self.eval_extras = self._latent_extras()
        return nll / count

    def _latent_extras(self) -> dict[str, float]:
        """A latent-variable model's KL, active units and mutual information on the validation sentences;
        while training aggressively, the end of that phase once mutual information stops rising."""
        if not (self.sentence_mode and hasattr(self.model, "latent_dim")):
            return {}
        from glmlab.evaluation.latent import latent_report

        report = latent_report(self.model, self._val_batches(), device=self.device)
        extras = {"kl": report.kl, "active_units": report.active_units, "mutual_info": report.mutual_info}
        if self.state["aggressive"]:
            if report.mutual_info <= self.state["last_mutual_info"]:
                self.state["aggressive"] = False
                extras["aggressive_ended"] = True
            self.state["last_mutual_info"] = report.mutual_info
        return extras

    def _checkpoint(self) -> None:
        if self.saved_step == self.state["step"]:
            return
        rngs = self.dist.gather(rng_state())
        state = {**self.state, "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": rngs}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.adversarial is not None:
            state["adversarial"] = self.adversarial.state_dict()
        self.on_main(lambda: save_checkpoint(self.out, self.model, state, keep=self.cfg.keep_checkpoints))
        self.saved_step = self.state["step"]

    def _after_eval(self, val: float, metrics: MetricsLog, progress: Progress) -> None:
        improved = val < self.state["best_val_loss"]
        self.state["last_val_loss"] = val
        if improved:
            self.state["best_val_loss"] = val
            self.state["evals_without_improvement"] = 0
        else:
            self.state["evals_without_improvement"] += 1
        def write() -> None:
            if improved:
                save_weights(self.model, self.out / BEST_DIR / WEIGHTS)
            metrics.write({"step": self.state["step"], "split": "val", "loss": val,
                           "best_loss": self.state["best_val_loss"], "elapsed": self.state["elapsed"],
                           **self.eval_extras})
            plot_losses(metrics.records, self.out / LOSS_PLOT, title=f"{self.out.name}: {self.mcfg.family}")
            self._write_samples(val)
            progress.val = val
            extras = "".join(f", {k.replace('_', ' ')} {v:.3g}" for k, v in self.eval_extras.items()
                             if not isinstance(v, bool))
            if self.eval_extras.get("aggressive_ended"):
                extras += "; mutual information stopped rising: aggressive encoder training ends"
            progress.message(f"step {self.state['step']}: val loss {val:.4f}{' (best)' if improved else ''}{extras}")

        self.on_main(write)

    def _write_samples(self, val: float) -> None:
        write_samples(self.out, self.model, self.tokenizer, self.cfg, self.state["step"], val)

    def _resume_command(self) -> str:
        return f"glmlab train --resume --out {self.out}"

    def _step_description(self, tokens_per_step: int) -> str:
        if self.sentence_mode:
            return f"{self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size} sentences/step"
        return f"{tokens_per_step:,} tokens/step"

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            result = self._run()
            distributed.barrier(self.dist)  # every rank done with its collectives before any tears down
            return result
        except OSError as exc:
            if exc.errno in atomic.WRITE_ERRNOS:  # metrics, plot or samples hit a full or read-only disk
                raise write_error(self.out, exc) from None
            raise
        finally:
            distributed.teardown(self.dist)
            if self._lock is not None:
                self._lock.close()

    def _run(self) -> TrainResult:
        cfg, mcfg, state = self.cfg, self.mcfg, self.state
        if self.dist.is_main:
            self._write_run_files()
        metrics = MetricsLog(self.out / METRICS, resume_step=state["step"] if self.resume else None,
                             enabled=self.dist.is_main)
        progress = Progress(cfg.max_steps, cfg.max_time, enabled=self.show_progress)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * mcfg.block_size * self.dist.world_size
        examples = self._step_description(tokens_per_step)
        n_params = sum(p.numel() for p in self.model.parameters())
        for note in self.notes:
            progress.message(f"note: {note}")
        processes = f", {self.dist.world_size} processes" if self.dist.enabled else ""
        progress.message(f"{'resuming' if self.resume else 'training'} {mcfg.family}: {n_params / 1e6:.2f}M "
                         f"parameters, {precision_name(self.amp_dtype)} on {self.device} "
                         f"({torch.get_num_threads()} threads{processes}), {examples}, "
                         f"from step {state['step']} -> {self.out}")
        stop = _StopFlag()
        self.model.train()
        try:
            with _graceful_stop(stop):
                stopped_by = self._loop(stop, metrics, progress, tokens_per_step)
                if self.adversarial is not None and stopped_by == "max_steps":
                    stopped_by = adversarial_rounds(self, stop, metrics, progress)
                self._guard()
                state["window_loss"] = float(self.loss_sum)
                if stopped_by == "interrupted":
                    self._checkpoint()
                    progress.message(f"interrupted at step {state['step']}: checkpoint saved in {self.out}; "
                                     f"continue with: {self._resume_command()}")
                elif self.evaluated_at != state["step"]:
                    self._after_eval(self._evaluate(), metrics, progress)
                    self._checkpoint()
        finally:
            metrics.close()
            progress.close()
        total = state["elapsed"]
        return TrainResult(self.out, state["step"], state["best_val_loss"], state["last_val_loss"], stopped_by,
                           total, state["tokens"] / total if total else 0.0, self.dist.is_main)

    def _loop(self, stop: _StopFlag, metrics: MetricsLog, progress: Progress, tokens_per_step: int) -> str:
        """Train until a budget, patience or a stop signal ends it; returns which one did."""
        cfg, state = self.cfg, self.state
        start, elapsed_at_start = time.perf_counter(), state["elapsed"]
        window_start, window_tokens = time.perf_counter(), 0
        self.loss_sum = torch.tensor(state["window_loss"], device=self.device, dtype=torch.float64)
        self.bad_step = torch.tensor(-1, device=self.device)  # first step whose loss was not finite (on device)
        self.evaluated_at = -1
        checkpoint_every = cfg.checkpoint_interval or cfg.eval_interval
        while state["step"] < cfg.max_steps:
            lr = learning_rate(cfg, state["step"], _progress_fraction(cfg, state["step"], state["elapsed"]))
            self.step_tokens = 0
            loss, applied = self._train_step(lr)
            state["step"] += 1
            state["tokens"] += self.step_tokens
            state["elapsed"] = elapsed_at_start + time.perf_counter() - start
            window_tokens += self.step_tokens
            self._account(loss, applied, progress)
            log_now = state["step"] % cfg.log_interval == 0 or state["step"] == cfg.max_steps
            scheduled = state["step"] % cfg.eval_interval == 0 or state["step"] % checkpoint_every == 0
            if log_now:
                seconds = time.perf_counter() - window_start
                self._log(lr, window_tokens / seconds, seconds, metrics, progress)
                window_start, window_tokens = time.perf_counter(), 0
            if not (log_now or scheduled or not self.dist.enabled):  # decisions on the same steps everywhere
                continue
            out_of_time = self.dist.any(cfg.max_time is not None and state["elapsed"] >= cfg.max_time, self.device)
            if self.dist.any(stop.set, self.device):
                return "interrupted"
            eval_now = state["step"] % cfg.eval_interval == 0 or out_of_time
            if eval_now or scheduled:
                self._guard()
                state["window_loss"] = float(self.loss_sum)
                if eval_now:
                    self._after_eval(self._evaluate(), metrics, progress)
                    self.evaluated_at = state["step"]
                self._checkpoint()
                window_start = time.perf_counter()  # evaluation time is not training throughput
                if cfg.patience and state["evals_without_improvement"] >= cfg.patience:
                    return "patience"
            if out_of_time:
                return "max_time"
        return "max_steps"

    def _account(self, loss: torch.Tensor, applied: bool, progress: Progress) -> None:
        """Add a step's loss to the window (on device: no sync), or count a skipped batch."""
        state = self.state
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

    def _log(self, lr: float, rate: float, seconds: float, metrics: MetricsLog, progress: Progress) -> None:
        """A train line: the window's mean loss over every process, tokens/s; then a fresh window."""
        self._guard()
        state = self.state
        steps = max(state["window_steps"], 1)
        mean_loss = self.dist.sum([float(self.loss_sum)], self.device)[0] / steps / self.dist.world_size
        stats = {k: float(v) / steps for k, v in self.stat_sums.items()}
        self.stat_sums = {}
        metrics.write({"step": state["step"], "split": "train", "loss": mean_loss, "lr": lr,
                       "tokens_per_sec": rate, "elapsed": state["elapsed"], **stats})
        progress.update(state["step"], mean_loss, rate, state["elapsed"], steps / seconds)
        self.loss_sum.zero_()
        state["window_steps"] = 0

    def _guard(self) -> None:
        """Stop (before any checkpoint can save them) when a non-finite loss has reached the weights."""
        step = int(self.bad_step)
        if not self.dist.any(step >= 0, self.device):
            return
        raise GlmlabError(f"the training loss became non-finite at step {step}; stopped. The last checkpoint "
                          f"(before step {step}) in {self.out} is intact",
                          "lower train.lr or raise train.warmup_steps, use train.precision=fp32, or skip such "
                          "batches with train.on_nonfinite=skip; then --resume")


def train(config: RunConfig, data_dir: str | Path, out: str | Path, resume: bool = False,
          show_progress: bool = True) -> TrainResult:
    """Train ``config`` on a prepared data directory into run directory ``out``."""
    return Trainer(config, data_dir, out, resume=resume, show_progress=show_progress).run()


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """Model keys that differ between two configs (a resumed run may change train.* keys only)."""
    a, b = dataclasses.asdict(old.model), dataclasses.asdict(new.model)
    resumable = getattr(type(old.model), "RESUMABLE", ())
    return [f"model.{k}" for k in a if a[k] != b.get(k) and not (k == "vocab_size" and b.get(k) == 0)
            and k not in resumable]
