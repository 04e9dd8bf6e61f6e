"""EleutherAI's lm-evaluation-harness on a glmlab run, in process (``glmlab eval RUN --tasks NAMES``).

:class:`GlmlabLM` is the harness's model interface over the run's model and the glmlab engine, with no server
and no export in between: ``loglikelihood`` and ``loglikelihood_rolling`` score with the model's forward pass,
``generate_until`` decodes with :func:`~glmlab.generation.generate.generate_batch`. It follows the harness's
``hf`` model step for step, so the two agree per item on an ``export-hf`` of the run (tested to 1e-4 nats):
the harness's own tokenisation of context and continuation, windows of the model's context
(``block_size``) cut from the left, rolling windows prefixed by the start token the run read (``<eos>`` for
running text, ``<bos>`` for sentences: what export-hf declares as bos), generated text cut at the task's
``until`` strings. A sentence-level run reads ``<bos>`` before every text, as in training (the ``hf`` model
matches with ``add_bos_token=True``).

The harness is an optional dependency (``pip install "glmlab[eval]"``). Nothing is downloaded: a task whose
data lives on the Hugging Face Hub fails with the harness's offline error; local tasks are YAML files in a
directory given with ``--include-path`` (see README.md, and tests/lm_eval_tasks for two examples).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from glmlab.errors import GlmlabError
from glmlab.generation.engine import row_seed, start_id, start_token_id
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.runs import LoadedRun

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

# gen_kwargs a task may give, and the GenerationSettings field each becomes; any other is refused
GEN_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
              "repetition_penalty": "repetition_penalty", "seed": "seed"}


class GlmlabLM(TemplateLM):
    """lm-evaluation-harness's ``LM`` over a loaded glmlab run (see the module docstring)."""

    def __init__(self, run: LoadedRun, batch_size: int = 16, max_gen_toks: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.run, self.model, self.tokenizer = run, run.model, run.tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.seed = seed  # sampled generations: request i draws with a seed made from (seed, i)
        self.start = start_id(run.model, run.tokenizer)  # read before every text (sentence-level runs)
        self.on = run.device  # where the model is

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return start_token_id(self.model, self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.model.block_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.run.run_dir)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tokenizer.encode(string)
        return [self.start, *ids] if self.start is not None and add_special_tokens is not False else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation after its context, in windows of ``max_length`` tokens
        cut from the left, batched longest first."""
        windows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise GlmlabError(f"a continuation of {len(continuation)} tokens is longer than the model's context "
                                  f"({self.max_length})", "use a task with shorter answers")
            whole = (context + continuation)[-(self.max_length + 1):]
            windows.append((whole[:-1], continuation))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = len(windows[chunk[0]][0])
                x = torch.full((len(chunk), width), self.tokenizer.eos_id, dtype=torch.long)
                for row, i in enumerate(chunk):
                    x[row, : len(windows[i][0])] = torch.tensor(windows[i][0])
                logp = self.model(x.to(self.on)).float().log_softmax(-1)
                for row, i in enumerate(chunk):
                    inp, cont = windows[i]
                    scores = logp[row, len(inp) - len(cont): len(inp)]
                    target = torch.tensor(cont, device=scores.device)
                    out[i] = (float(scores.gather(1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
        finally:
            self.model.train(was_training)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in disjoint windows of ``max_length`` predicted tokens, the first
        prefixed by the start token."""
        spans, windows = [], []
        for (text,) in (r.args for r in requests):
            parts = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            spans.append((len(windows), len(windows) + len(parts)))
            windows += [(None, context, predicted) for context, predicted in parts]
        scores = self._loglikelihood_tokens(windows)
        return [sum(s for s, _ in scores[a:b]) for a, b in spans]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task says so) text after each context, cut at the task's ``until``."""
        groups: dict[tuple, list[int]] = {}
        settings_of: dict[tuple, tuple[GenerationSettings, int]] = {}
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            key = repr(sorted(kwargs.items()))
            groups.setdefault(key, []).append(i)
            if key not in settings_of:
                settings_of[key] = self._settings(dict(kwargs))
        out = [""] * len(requests)
        for key, members in groups.items():
            settings, keep = settings_of[key]
            for start in range(0, len(members), self.batch_size):  # at most batch_size rows decode together
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], add_special_tokens=False)[-keep:]
                           or [self.prefix_token_id] for i in chunk]
                per_row = [settings if settings.temperature == 0 or settings.seed is not None
                           else replace(settings, seed=row_seed(self.seed, i)) for i in chunk]
                for i, completions in zip(chunk, generate_batch(self.model, self.tokenizer, prompts, per_row),
                                          strict=True):
                    out[i] = completions[0].text
        return out

    def _settings(self, kwargs: dict[str, Any]) -> tuple[GenerationSettings, int]:
        """GenerationSettings for a task's gen_kwargs, and how many context tokens a prompt keeps (as the ``hf``
        model: the context less the tokens to generate)."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        values = {"temperature": 1.0 if sample else 0.0}
        for name, value in kwargs.items():
            if name not in GEN_KWARGS:
                raise GlmlabError(f"the task's generation_kwargs has {name!r}, which glmlab's engine does not take",
                                  f"use only: until, max_gen_toks, do_sample, {', '.join(GEN_KWARGS)}")
            values[GEN_KWARGS[name]] = value
        if not sample:
            values["temperature"] = 0.0
        keep = self.max_length - new_tokens - (self.start is not None)
        if keep < 1:
            raise GlmlabError(f"the task generates up to {new_tokens} tokens, but the model's context is "
                              f"{self.max_length}", "give the task a smaller max_gen_toks")
        return GenerationSettings(max_new_tokens=new_tokens, stop=[u for u in until if u], **values), keep


@dataclass
class HarnessOptions:
    """``glmlab eval RUN --tasks ...``."""

    tasks: list[str]
    include_path: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    seed: int = 0
    log_samples: bool = False


def task_manager(include_path: str | None, tasks: list[str]) -> TaskManager:
    """lm-evaluation-harness's TaskManager for ``tasks``: indexing its ~15,000 bundled task files takes ~10 s, so
    when every name is a plain task (not a group or tag, which may name bundled tasks) defined under
    ``include_path``, only that directory is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        own = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in own.all_subtasks for name in tasks):
            return own
    return TaskManager(include_path=include_path)


def run_tasks(run: LoadedRun, options: HarnessOptions) -> dict[str, Any]:
    """lm-evaluation-harness's ``simple_evaluate`` of ``options.tasks`` on ``run``: its results dict (per-task
    metrics under "results", per-item records under "samples" when ``log_samples``)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # no downloads at run time: fail fast, offline
        os.environ.setdefault(name, "1")
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task notes are for its own CLI

    if options.include_path is not None and not Path(options.include_path).is_dir():
        raise GlmlabError(f"--include-path {options.include_path} is not a directory",
                          "give the directory that holds your task YAML files")
    manager = task_manager(options.include_path, options.tasks)
    unknown = [t for t in options.tasks if t not in manager.all_tasks]
    if unknown:
        raise GlmlabError(f"lm-evaluation-harness knows no task {', '.join(map(repr, unknown))}",
                          "name tasks defined in YAML under --include-path DIR (glmlab downloads no task data; "
                          "tests/lm_eval_tasks has two examples)")
    try:
        return lm_eval.simple_evaluate(model=GlmlabLM(run, batch_size=options.batch_size, seed=options.seed),
                                       tasks=options.tasks,
                                       task_manager=manager, limit=options.limit, num_fewshot=options.num_fewshot,
                                       log_samples=options.log_samples, random_seed=options.seed,
                                       numpy_random_seed=options.seed, torch_random_seed=options.seed,
                                       fewshot_random_seed=options.seed, bootstrap_iters=0)
    except (FileNotFoundError, ConnectionError) as exc:
        raise GlmlabError(f"a task's data could not be read ({str(exc).splitlines()[0]})",
                          "give tasks whose data_files are local (absolute paths, or a loader next to the YAML)"
                          ) from None
