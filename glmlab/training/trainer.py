"""The training loop, one for every family and task, on one process or many (torchrun + DDP).

The :class:`Trainer` owns the loop and everything that must happen exactly once: the run directory and its
lock, the process group and the DDP-wrapped module, the optimiser, the budgets (``max_steps``,
``max_time``, early-stopping ``patience``), the collective stop decision, evaluation, checkpoints,
``metrics.jsonl``, ``loss.png``, ``samples.txt`` and the progress display. What differs is composed in:
a :class:`~glmlab.training.tasks.Task` supplies the batches, the model and the validation (language
modelling here, classification and completions in :mod:`glmlab.finetune`); its phases supply the steps
(:class:`~glmlab.training.phases.MaximumLikelihood`, then e.g. SeqGAN's adversarial rounds); the family's
hooks add work to each step (a VAE's aggressive encoder updates). Ctrl-C / SIGTERM finish the step, save a
checkpoint and stop; ``resume`` continues bit-for-bit from the newest intact checkpoint.

A trainer is a context manager: whatever it acquires (the run directory's lock, the process group) it
releases on leaving, and also when setting it up fails half-way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import math
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from glmlab import atomic
from glmlab.config import RunConfig, resolve_config
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError, RunDirError
from glmlab.generation.chat import TEMPLATE_FILE
from glmlab.models import get_family
from glmlab.models.transformer import (
    SLOW_BF16_ATTENTION,
    attend_in_fp32,
    attention_layers,
    measured_attention_slowdown,
)
from glmlab.runs import BEST_DIR, CONFIG, LOSS_PLOT, METRICS, TOKENIZER, WEIGHTS, read_run_config, save_weights
from glmlab.runtime import (
    PRECISIONS,
    autocast,
    keep_freed_memory,
    precision_name,
    resolve_precision,
    select_device,
    set_threads,
)
from glmlab.training import distributed
from glmlab.training.checkpoint import checkpoint_dirs, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glmlab.training.checkpoint import write_error as training_write_error
from glmlab.training.initial import InitialWeights
from glmlab.training.metrics import MetricsLog, plot_losses
from glmlab.training.optim import load_optimizer_state, make_optimizer
from glmlab.training.phases import MaximumLikelihood, Optimisation, Phase, RunLog
from glmlab.training.progress import Progress
from glmlab.training.tasks import LanguageModelingTask, Task
from glmlab.version import __version__


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


# loss.png and samples.txt are written at an evaluation unless the last ones were written so recently that doing
# it again would spend more than this share of the time since (a short run evaluating every few seconds redrew them
# at each: ~4% of nanoGPT's recipe); the run's last evaluation is always written
REPORT_SHARE = 0.02


class _StopFlag:
    """Set by SIGINT/SIGTERM so the loop stops between steps; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True


@contextlib.contextmanager
def _graceful_stop(flag: _StopFlag) -> Iterator[None]:
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
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if others:  # the user's files: samples.txt or loss.png there would be overwritten
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise RunDirError(f"{out} is not empty ({shown}) and holds no run: training would overwrite files there",
                              "choose a new or empty --out directory")


def _probe_writable(out: Path) -> None:
    """Fail before training, not at the first checkpoint, when the output directory cannot be written."""
    probe = out / f".write-probe-{uuid.uuid4().hex}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        probe.unlink(missing_ok=True)
        raise training_write_error(out, exc) from None


class Trainer:
    """One training run of ``task`` into run directory ``out``: set up on construction, then :meth:`run`."""

    def __init__(self, config: RunConfig, task: Task, out: str | Path, resume: bool = False,
                 show_progress: bool = True) -> None:
        self.config, self.task, self.out, self.resume = config, task, Path(out), resume
        self.mcfg, self.cfg = config.model, config.train
        self.tokenizer: Tokenizer = task.tokenizer
        self._held = contextlib.ExitStack()
        try:
            self._set_up(show_progress)
        except BaseException:
            self._held.close()
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory's lock and leave the process group (idempotent)."""
        self._held.close()

    def _set_up(self, show_progress: bool) -> None:
        cfg = self.cfg
        self.dist = distributed.from_environment()
        self.task.check(self.config)
        _check_run_dir(self.out, self.resume)
        self.device = distributed.setup(self.dist, select_device(cfg.device))
        self._held.callback(distributed.teardown, self.dist)
        self.on_main(lambda: _probe_writable(self.out))
        self.on_main(self._take_lock)
        set_threads(cfg.threads)
        keep_freed_memory()  # a fresh process's heap otherwise page-faults its tensors back in every step
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        if cfg.precision == "auto" and self.dist.any(self.amp_dtype is None, self.device):
            self.amp_dtype = None  # every process alike: bf16 only where each measured it faster
        self.amp = autocast(self.device, self.amp_dtype)
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.model = self.task.build_model(self.config, fresh=not self.resume).to(self.device)
        torch.manual_seed(cfg.seed + self.dist.rank)  # distinct dropout masks per process
        self.sampler = self.task.sampler(cfg, self.dist.rank, self.dist.world_size)
        later = self.task.later_phases(self.model, self.sampler, self.device, cfg)
        for phase in later:
            if self.dist.enabled and phase.one_process:
                raise GlmlabError(f"the {phase.name} phase runs on one process, and this run has "
                                  f"{self.dist.world_size} (torchrun)", phase.one_process)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "tokens": 0, "best_val_loss": math.inf,
                                      "last_val_loss": math.inf, "evals_without_improvement": 0,
                                      "skipped_batches": 0, "window_loss": 0.0, "window_steps": 0,
                                      "precision": precision_name(self.amp_dtype), "attention": None}
        self.hooks = self.model.training_hooks()
        self.notes = list(self.task.notes)
        self.saved_step = -1
        self.evaluated_at = -1
        self._report_cost, self._reported_at = 0.0, -math.inf  # loss.png + samples.txt: their last cost and time
        self._report_pending: tuple[int, float] | None = None  # the (step, val) of an evaluation not reported yet
        if self.resume:
            self._restore(later)
            if cfg.precision == "auto" and self.state["precision"] != precision_name(self.amp_dtype):
                self.notes.append(f"training on in {self.state['precision']} as the run began (train.precision=auto "
                                  f"measured {precision_name(self.amp_dtype)} on this machine)")
                self.amp_dtype = PRECISIONS[self.state["precision"]]
                self.amp = autocast(self.device, self.amp_dtype)
            self.state["precision"] = precision_name(self.amp_dtype)  # what the checkpoints say it trained in
        step_module: nn.Module = self.task.loss_module(self.model)
        self.attention_note = self._choose_attention(step_module)
        if self.dist.enabled:
            step_module = DistributedDataParallel(
                step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.some_parameters_unused(self.model))
        use_compile = cfg.compile == "true" or (cfg.compile == "auto" and self.device.type == "cuda")
        if use_compile:
            self.model.keep_host_work_eager()
        self.step_module = torch.compile(step_module) if use_compile else step_module
        parts = Optimisation(self.model, self.step_module, self.optimizer, self.scaler, self.amp, self.dist,
                             self.device)
        self.phases: list[Phase] = [MaximumLikelihood(cfg, parts, self.sampler, self.hooks, self.state, self.out),
                                    *later]
        self.show_progress = show_progress and self.dist.is_main

    # --- what happens once ---------------------------------------------------------------------------------

    def on_main(self, action: Callable[[], Any]) -> None:
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

    def _choose_attention(self, loss_module: nn.Module) -> str:
        """Under bf16 autocast, attention in fp32 or bf16 in every attention layer of the loss (a DPO reference's
        too): as ``train.attention_precision`` names it, or (auto, on a CPU) fp32 where bf16 attention measured
        ``SLOW_BF16_ATTENTION`` times slower at the run's shape. A measured choice is the run's: the same on every
        process (fp32 if any measured it faster), kept in the checkpoints, and a resumed run attends as it began.
        Returns the intro line's note."""
        if self.amp_dtype != torch.bfloat16 or not attention_layers(loss_module):
            return ""
        asked = self.cfg.attention_precision
        if asked != "auto":
            self.state["attention"] = asked
            note = ", attention in fp32 (train.attention_precision=fp32)" if asked == "fp32" else ""
        elif self.device.type != "cpu":
            return ""
        elif self.state["attention"] is None:
            slowdown = measured_attention_slowdown(loss_module, self.cfg.batch_size, self.model.block_size)
            here = slowdown >= SLOW_BF16_ATTENTION
            fp32 = self.dist.any(here, self.device)
            self.state["attention"] = "fp32" if fp32 else "bf16"
            why = f"{slowdown:.1f}x faster than bf16 here" if here else "another process measured it faster"
            note = f", attention in fp32 ({why})" if fp32 else ""
        else:
            note = ", attention in fp32 (as the run began)" if self.state["attention"] == "fp32" else ""
        attend_in_fp32(loss_module, self.state["attention"] == "fp32")
        return note

    def _take_lock(self) -> None:
        """One trainer per run directory: a second one would interleave checkpoints with the first."""
        lock = open(self.out / ".lock", "w")  # noqa: SIM115 - held until the trainer closes
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise RunDirError(f"another glmlab train is using {self.out}",
                              "wait for it to finish, or stop it (Ctrl-C saves a checkpoint)") from None
        self._held.callback(lock.close)

    def _restore(self, later: list[Phase]) -> None:
        if self.tokenizer.hf.to_str() != Tokenizer.from_file(self.out / TOKENIZER).hf.to_str():
            raise GlmlabError(f"the data was tokenized differently from the run in {self.out}",
                              "resume with the data directory the run was trained on (--data)")
        if not checkpoint_dirs(self.out):
            if (self.out / WEIGHTS).exists():
                raise RunDirError(f"{self.out} holds weights but no training checkpoint (an imported model?), "
                                  "so there is nothing to resume", "train a new run with --out NEW_DIR")
            self.notes.append(f"{self.out} has no checkpoint yet; starting from step 0")  # killed before one
            return
        saved, skipped = load_checkpoint(self.out, self.model)
        self.notes.extend(f"checkpoint {name} is damaged ({why}); skipped it" for name, why in skipped)
        load_optimizer_state(self.optimizer, saved["optimizer"], self.config.train)
        self.sampler.load_state_dict(saved["sampler"])
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
        states = saved["rng"]
        set_rng_state(states[self.dist.rank] if len(states) == self.dist.world_size else states[0])
        self.state.update({k: saved[k] for k in self.state if k in saved})
        for hook in self.hooks:  # checkpoints written before hooks kept their state among the trainer's
            hook.load_state_dict(saved.get("hooks", {}).get(hook.name, saved))
        for phase in later:
            if phase.name in saved:
                phase.load_state_dict(saved[phase.name])
        last = later[-1].end if later else self.cfg.max_steps
        if self.state["step"] >= last:
            raise GlmlabError(f"{self.out} already reached train.max_steps={self.cfg.max_steps} "
                              f"(step {self.state['step']})",
                              f"raise the budget to continue, e.g. train.max_steps={self.cfg.max_steps * 2}")

    def _write_run_files(self) -> None:
        kept: dict[str, Any] = {}
        if self.resume:  # keep what other tools recorded (e.g. special-token roles)
            kept = read_run_config(self.out)[1]
        else:
            self.tokenizer.save(self.out / TOKENIZER)
            if self.task.chat_template is not None:
                atomic.write_text(self.out / TEMPLATE_FILE, self.task.chat_template)
        atomic.write_json(self.out / CONFIG, {**kept, **self.config.to_dict(), **self.task.run_files(),
                                              "world_size": self.dist.world_size, "glmlab_version": __version__})

    def _checkpoint(self) -> None:
        if self.saved_step == self.state["step"]:
            return
        rngs = self.dist.gather(rng_state())
        state = {**self.state, "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": rngs}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.hooks:
            state["hooks"] = {hook.name: hook.state_dict() for hook in self.hooks}
        for phase in self.phases[1:]:
            state[phase.name] = phase.state_dict()
        self.on_main(lambda: save_checkpoint(self.out, self.model, state, keep=self.cfg.keep_checkpoints))
        self.saved_step = self.state["step"]

    def _evaluate(self, phase: Phase, log: RunLog) -> None:
        """Validate; record it the phase's way; keep the best weights, loss.png and samples when it selects."""
        state = self.state
        validation = self.task.evaluate(self.model, self.device, self.amp, self.dist)
        val, figures = validation.loss, dict(validation.figures)
        for hook in self.hooks:
            figures.update(hook.after_evaluation(figures))
        state["last_val_loss"] = val
        improved = phase.selects_best and val < state["best_val_loss"]
        if phase.selects_best:
            if improved:
                state["best_val_loss"] = val
                state["evals_without_improvement"] = 0
            else:
                state["evals_without_improvement"] += 1
        record, message = phase.evaluation_record(state, val, figures, improved)

        def write() -> None:
            if improved:
                save_weights(self.model, self.out / BEST_DIR / WEIGHTS)
            log.metrics.write(record)
            if phase.selects_best:
                self._report_pending = (state["step"], val)
                if time.perf_counter() - self._reported_at >= self._report_cost / REPORT_SHARE:
                    self._write_reports(log)
                log.progress.val = val
            log.progress.message(message)

        self.on_main(write)

    def _plot(self, log: RunLog) -> None:
        plot_losses(log.metrics.records, self.out / LOSS_PLOT, title=f"{self.out.name}: {self.mcfg.family}")

    def _write_reports(self, log: RunLog) -> None:
        """loss.png and samples.txt for the latest evaluation (:data:`REPORT_SHARE` says how often); samples only
        while the weights are still those it evaluated (a run stopped, or a later phase begun, after it has moved
        them: the plot alone is brought up to date)."""
        if self._report_pending is None:
            return
        started = time.perf_counter()
        step, val = self._report_pending
        self._plot(log)
        if step == self.state["step"]:
            self.task.write_samples(self.out, self.model, self.cfg, step, val)
        self._reported_at = time.perf_counter()
        self._report_cost, self._report_pending = self._reported_at - started, None

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            result = self._run()
            distributed.barrier(self.dist)  # every rank done with its collectives before any tears down
            return result
        except OSError as exc:
            if exc.errno in atomic.WRITE_ERRNOS:  # metrics, plot or samples hit a full or read-only disk
                raise training_write_error(self.out, exc) from None
            raise

    def _run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        if self.dist.is_main:
            self._write_run_files()
        if not self.resume and self.task.starts_from_weights:
            self._checkpoint()  # step 0: a run killed before its first checkpoint resumes from these weights
        log = RunLog(MetricsLog(self.out / METRICS, resume_step=state["step"] if self.resume else None,
                                enabled=self.dist.is_main),
                     Progress(cfg.max_steps, cfg.max_time, enabled=self.show_progress))
        self._introduce(log)
        stop = _StopFlag()
        self.model.train()
        phase = self.phases[0]
        gc.collect()  # what set-up left for collection (an earlier run's model, in a process that trains several)
        gc.freeze()  # and what it made (PyTorch's modules, the model) is not scanned by each full collection
        try:
            with _graceful_stop(stop):
                stopped_by = "max_steps"
                for phase in self.phases:
                    if state["step"] < phase.end:
                        stopped_by = self._run_phase(phase, stop, log)
                        self.on_main(lambda: self._write_reports(log))  # before a later phase moves the weights
                        if stopped_by != "max_steps":
                            break
                self.phases[0].settle(state)
                if stopped_by == "interrupted":
                    self._checkpoint()
                    log.progress.message(f"interrupted at step {state['step']}: checkpoint saved in {self.out}; "
                                         f"continue with: {self.task.resume_command(self.out)}")
                elif self.evaluated_at != state["step"]:
                    self._evaluate(phase, log)
                    self._checkpoint()
                self.on_main(lambda: self._write_reports(log))  # the last evaluation's, if it was not written
        except BaseException:
            if self.dist.is_main and self._report_pending is not None:  # e.g. a non-finite loss: the curve to it
                with contextlib.suppress(Exception):
                    self._plot(log)
            raise
        finally:
            gc.unfreeze()
            log.metrics.close()
            log.progress.close()
        total = state["elapsed"]
        return TrainResult(self.out, state["step"], state["best_val_loss"], state["last_val_loss"], stopped_by,
                           total, state["tokens"] / total if total else 0.0, self.dist.is_main)

    def _introduce(self, log: RunLog) -> None:
        """Notes, then one line saying what trains where."""
        for note in self.notes:
            log.progress.message(f"note: {note}")
        n_params = sum(p.numel() for p in self.model.parameters())
        processes = f", {self.dist.world_size} processes" if self.dist.enabled else ""
        examples = self.task.describe_step(self.cfg, self.mcfg.block_size, self.dist.world_size)
        log.progress.message(f"{'resuming' if self.resume else 'training'} {self.mcfg.family}: "
                             f"{n_params / 1e6:.2f}M parameters, {precision_name(self.amp_dtype)}{self.attention_note} "
                             f"on {self.device} ({torch.get_num_threads()} threads{processes}), {examples}, "
                             f"from step {self.state['step']} -> {self.out}")

    def _run_phase(self, phase: Phase, stop: _StopFlag, log: RunLog) -> str:
        """Run ``phase`` until its end, a budget, patience or a stop signal; returns which one ended it.
        Stop decisions are collective: every process takes them at the same steps."""
        cfg, state, dist = self.cfg, self.state, self.dist
        start, elapsed_at_start = time.perf_counter(), state["elapsed"]
        phase.begin(state, log)
        while state["step"] < phase.end:
            phase.step(state)
            state["step"] += 1
            state["elapsed"] = elapsed_at_start + time.perf_counter() - start
            phase.record(state, log)
            step = state["step"]
            if not (phase.decision_due(step) or not dist.enabled):  # decisions on the same steps everywhere
                continue
            out_of_time = dist.any(cfg.max_time is not None and state["elapsed"] >= cfg.max_time, self.device)
            if dist.any(stop.set, self.device):
                return "interrupted"
            evaluate = phase.evaluation_due(step) or out_of_time
            if evaluate or phase.checkpoint_due(step):
                phase.settle(state)
                if evaluate:
                    self._evaluate(phase, log)
                    self.evaluated_at = step
                self._checkpoint()
                phase.evaluated()
                if phase.selects_best and cfg.patience and state["evals_without_improvement"] >= cfg.patience:
                    return "patience"
            if out_of_time:
                return "max_time"
        phase.finish(lambda: self.on_main(lambda: save_weights(self.model, self.out / BEST_DIR / WEIGHTS)))
        return "max_steps"


def train(config: RunConfig, data_dir: str | Path, out: str | Path, resume: bool = False,
          show_progress: bool = True, init: InitialWeights | None = None) -> TrainResult:
    """Train ``config`` on a prepared data directory into run directory ``out`` (from the weights ``init``, whose
    architecture ``config`` keeps: :func:`glmlab.training.initial.init_config`)."""
    with Trainer(config, LanguageModelingTask(data_dir, init), out, resume=resume,
                 show_progress=show_progress) as trainer:
        return trainer.run()


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """Model keys that differ between two configs (a resumed run may change train.* keys, and the model keys
    its family lists as resumable)."""
    a, b = dataclasses.asdict(old.model), dataclasses.asdict(new.model)
    resumable = get_family(old.model.family).resumable
    return [f"model.{k}" for k in a if a[k] != b.get(k) and not (k == "vocab_size" and b.get(k) == 0)
            and k not in resumable]


def resume_config(out: str | Path, overrides: list[str], data_dir: str | None = None) -> tuple[RunConfig, str]:
    """The config and data directory to resume run ``out`` with: its own config.json plus ``overrides``,
    which may change training keys (and a family's resumable model keys), not the model."""
    saved, raw = read_run_config(Path(out))
    config = resolve_config({"model": raw["model"], "train": raw["train"]}, overrides)
    changed = config_changes(saved, config)
    if changed:
        raise GlmlabError(f"a resumed run cannot change its model ({', '.join(changed)})",
                          "start a new run with --out NEW_DIR to train a different model")
    data = data_dir or (raw.get("data") or {}).get("dir")
    if not data:
        raise GlmlabError(f"{out} does not say which data it was trained on", "pass --data DATA_DIR")
    return config, data
