"""`glmlab compare`: runs trained on the same data scored and sampled side by side (:func:`compare_runs`, a
:class:`Comparison`); :mod:`glmlab.evaluation.compare_report` writes it as ``report.md`` and a self-contained
``report.html``.

Per run: family, parameters, training time, NLL / PPL on a split and the sample metrics of generated
sentences (BLEU-2..5 against references, Self-BLEU-2..5, distinct-1/2, mean length), a few example
samples, and every run's training / validation loss overlaid in ``curves.png``.

Likelihoods come from :mod:`glmlab.evaluation.report`, with its two accountings labelled per row:

- **sentence**: runs trained on sentences (``vae``, ``seqgan``, ``train.batching=sentences``) score each
  sentence on its own from ``<bos>``; NLL summed over its words and ``<eos>``. Exact for ``lstm`` /
  ``gpt`` / ``seqgan``; for a ``vae`` the importance-weighted bound with k samples of z (an upper
  bound on the NLL that includes the KL).
- **window**: runs trained on windows of the token stream score every token in context windows
  that cross sentence boundaries (they see the previous sentences), so their NLL is not comparable
  with sentence-accounting rows: such rows are shown but marked.

Samples are drawn at temperature 1 from one seed, through the shared generation engine: a vae
decodes z ~ p(z) (exactly as :func:`glmlab.generation.latent.sample_prior` draws them), a
sentence-level model starts from ``<bos>`` and stops at ``<eos>``, a window-trained model starts
from an empty prompt and its sample is cut at the first line break or ``<eos>``. Sentences are
compared as whitespace-separated words; ``<unk>`` stays spelled out in samples and references alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmlab.data.corpus import decode_text
from glmlab.data.dataset import open_data_dir
from glmlab.data.sentences import find_sentences
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.evaluation.likelihood import sum_nll
from glmlab.evaluation.report import evaluate_sentences, is_sentence_run
from glmlab.evaluation.sample_metrics import SampleReport, sample_report
from glmlab.evaluation.text_units import resolve
from glmlab.generation.engine import row_seed
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.runs import METRICS, TOKENIZER, LoadedRun, load_run, read_metrics, read_run_config
from glmlab.runtime import select_device

SAMPLES = 500
IW_SAMPLES = 50  # compare's default k for a vae's importance-weighted NLL (glmlab eval uses 500)
EXAMPLES = 5
DECODE_ROWS = 256  # sentences generated per engine call
ORDERS = (2, 3, 4, 5)
ACCOUNTING_NOTES = {
    "sentence": "each sentence scored on its own from `<bos>`; NLL summed over its words and `<eos>`; "
                "PPL = exp(total NLL / tokens, `<eos>` included)",
    "window": "every token scored in context windows of the running token stream (windows cross sentence "
              "boundaries); PPL = exp(NLL per token)",
}


@dataclass
class RunComparison:
    """One run's row of the report."""

    name: str
    run_dir: str
    family: str
    parameters: int  # the language model's (what generates and is scored)
    other_parameters: int  # parameters outside it (a seqgan's discriminator)
    training_time: float | None  # seconds: the largest ``elapsed`` in metrics.jsonl
    steps: int | None
    accounting: str  # "sentence" or "window"
    nll_kind: str  # "exact", "importance-weighted" or "pseudo" (a masked LM's PLL: never comparable)
    iw_samples: int | None
    nll_per_token: float
    nll_per_sentence: float | None  # sentence accounting only
    perplexity: float
    tokens: int
    comparable: bool  # False: its NLL uses another accounting than the report's NLL column
    samples: SampleReport
    empty_samples: int  # samples with no words (an immediate <eos> or line break)
    examples: list[str]
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def nll_label(self) -> str:
        if self.nll_kind == "pseudo":
            return "PLL (pseudo-likelihood)"
        return "exact" if self.nll_kind == "exact" else f"IW bound (k={self.iw_samples})"


@dataclass
class Comparison:
    """What :func:`compare_runs` measured; :func:`write_report` renders it."""

    runs: list[RunComparison]
    data_dir: str
    split: str
    sentences: int  # evaluation sentences scored (after --max-sentences)
    split_sentences: int  # sentences in the split
    tokens: int  # their tokens, <eos> included
    references: list[str]
    references_source: str
    samples: int
    seed: int
    iw_samples: int
    checkpoint: str
    accounting: str  # the accounting of the NLL column's comparable rows
    warnings: list[str] = field(default_factory=list)
    metric_tokenizer: str = "whitespace"  # the units of BLEU / Self-BLEU / distinct (text_units; auto resolved)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Run:
    """A run directory checked before anything is loaded."""

    path: Path
    raw: dict[str, Any]
    tokenizer: str  # canonical tokenizer.json
    data_dir: str | None


def _describe_data(run: _Run) -> str:
    data = run.raw.get("data", {})
    return f"{run.path} ({data.get('dir', 'unknown data')}, {data.get('tokenizer', '?')} tokenizer, " \
           f"vocab {data.get('vocab_size', '?')})"


def _check_runs(run_dirs: Sequence[str | Path]) -> tuple[list[_Run], list[str]]:
    """Read every run's config and tokenizer; refuse runs on differently tokenized data; warn on different dirs."""
    if not run_dirs:
        raise GlmlabError("no runs to compare", "name one or more run directories: glmlab compare RUN [RUN ...] "
                                                "--out REPORT_DIR")
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        _, raw = read_run_config(path)  # a missing or foreign directory is a RunDirError here
        tokenizer = Tokenizer.from_file(path / TOKENIZER, raw.get("special_tokens"))
        runs.append(_Run(path, raw, json.dumps(json.loads(tokenizer.hf.to_str()), sort_keys=True),
                         raw.get("data", {}).get("dir")))
    first = runs[0]
    other = [r for r in runs if r.tokenizer != first.tokenizer]
    if other:
        names = ", ".join(str(r.path) for r in other)
        raise GlmlabError(
            f"{names} {'was' if len(other) == 1 else 'were'} trained on data tokenized differently from "
            f"{first.path}: " + "; ".join(_describe_data(r) for r in [first, *other]),
            "compare runs trained on the same data directory (the same tokenizer.json): NLL per token and "
            "BLEU over different tokens do not compare")
    warnings = []
    dirs = {r.data_dir for r in runs}
    if len(dirs) > 1:
        warnings.append("the runs were trained on different data directories (with the same tokenizer): "
                        + "; ".join(f"{r.path}: {r.data_dir}" for r in runs)
                        + ". Their figures compare only as far as those data do")
    return runs, warnings


def read_references(path: str | Path) -> list[str]:
    """One reference sentence per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise GlmlabError(f"reference file {path} does not exist", "check the path given to --references")
    lines = [" ".join(line.split()) for line in decode_text(path.read_bytes(), str(path)).splitlines()]
    references = [line for line in lines if line]
    if not references:
        raise GlmlabError(f"{path} holds no sentences (every line is blank)", "write one reference sentence per line")
    return references


def _sentence_words(tokenizer: Tokenizer, ids: Sequence[int], cut_line: bool = False) -> str:
    """A sentence's ids as whitespace-separated words: up to the first ``<eos>``; special tokens dropped,
    ``<unk>`` spelled out; with ``cut_line``, only the text before the first line break."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    skip = set(tokenizer.role_ids.values()) - {tokenizer.unk_id}  # every special token but <unk>
    text = tokenizer.decode([i for i in ids if i not in skip], skip_special_tokens=False)
    if cut_line:
        text = text.split("\n", 1)[0]
    return " ".join(text.split())


def split_sentences(tokenizer: Tokenizer, tokens: np.ndarray) -> list[str]:
    """A split decoded to text sentence by sentence (each ``<eos>``-terminated segment), empty ones skipped."""
    found = find_sentences(tokens, tokenizer.eos_id, len(tokens) + 2)
    texts = (_sentence_words(tokenizer, tokens[s:s + n]) for s, n in zip(found.starts, found.lengths, strict=True))
    return [t for t in texts if t]


def generate_samples(run: LoadedRun, n: int, seed: int) -> list[str]:
    """``n`` sentences at temperature 1 through the engine; row i is seeded from (seed, i), so the result
    does not depend on how the rows are batched. A vae decodes z ~ p(z) (its prior) drawn from ``seed`` as
    :func:`~glmlab.generation.latent.sample_prior` draws it; a sentence-level model runs from ``<bos>`` to
    ``<eos>``; a model of running text starts from an empty prompt and is cut at its first line break."""
    model, tokenizer = run.model, run.tokenizer
    window = not model.traits.sentence_level
    z = None
    if model.traits.latent_dim:
        z = model.sample_prior(n, torch.Generator().manual_seed(seed)).to(run.device)
    out: list[str] = []
    for begin in range(0, n, DECODE_ROWS):
        count = min(DECODE_ROWS, n - begin)
        settings = [GenerationSettings(temperature=1.0, max_new_tokens=max(1, model.block_size - 1),
                                       seed=row_seed(seed, begin + i), stop=["\n"] if window else [])
                    for i in range(count)]
        decoder = model if z is None else model.given(z[begin:begin + count])
        rows = generate_batch(decoder, tokenizer, [""] * count, settings)
        out.extend(_sentence_words(tokenizer, r[0].token_ids, cut_line=window) for r in rows)
    return out


def _curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float | None, int | None]:
    """Training and validation loss against step, the training time and the last step, from metrics.jsonl."""
    records = read_metrics(run_dir / METRICS)

    def curve(split: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r["loss"])) for r in records if r.get("split") == split
                and isinstance(r.get("loss"), int | float) and math.isfinite(r["loss"])]

    elapsed = [float(r["elapsed"]) for r in records if isinstance(r.get("elapsed"), int | float)]
    steps = [int(r["step"]) for r in records if isinstance(r.get("step"), int)]
    return curve("train"), curve("val"), max(elapsed, default=None), max(steps, default=None)


def _names(paths: Sequence[Path]) -> list[str]:
    names = [p.resolve().name or str(p) for p in paths]
    return [str(p) if names.count(name) > 1 else name for p, name in zip(paths, names, strict=True)]


def _check_options(samples: int, iw_samples: int, batch_size: int, max_sentences: int | None) -> None:
    for name, value in (("--samples", samples), ("--iw-samples", iw_samples), ("--batch-size", batch_size)):
        if value < 1:
            raise GlmlabError(f"{name} {value} must be at least 1", f"give {name} a positive number")
    if max_sentences is not None and max_sentences < 1:
        raise GlmlabError(f"--max-sentences {max_sentences} must be at least 1", "leave it out to score every sentence")


@dataclass
class _Scored:
    """What every run is scored on: a split of one data directory (cut to ``max_sentences``) and the references."""

    directory: str
    tokenizer: Tokenizer
    tokens: np.ndarray
    sentences: int  # in ``tokens``
    split_sentences: int  # in the whole split
    references: list[str]
    references_source: str


def _scored(first: _Run, data_dir: str | Path | None, split: str, max_sentences: int | None,
            references: str | Path | None) -> _Scored:
    directory = data_dir or first.data_dir
    if not directory or not Path(directory).is_dir():
        raise GlmlabError(f"the data directory {directory} (where {first.path} was trained) is not there",
                          "pass --data DATA_DIR: the data directory the runs were trained on")
    data = open_data_dir(directory)
    if json.dumps(json.loads(data.tokenizer.hf.to_str()), sort_keys=True) != first.tokenizer:
        raise GlmlabError(f"{directory} was tokenized with a different tokenizer than the runs",
                          "pass --data with the data directory the runs were trained on")
    tokenizer = data.tokenizer
    tokens = np.asarray(data.tokens(split))
    if len(tokens) == 0:
        raise GlmlabError(f"the {split} split of {directory} is empty", "score another split with --split")
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    in_split = len(find_sentences(tokens, tokenizer.eos_id, len(tokens) + 2))
    if max_sentences is not None and max_sentences < len(ends):
        tokens = tokens[:ends[max_sentences - 1] + 1]
    if references is not None:
        refs, source = read_references(references), str(references)
    else:
        refs, source = split_sentences(tokenizer, np.asarray(data.tokens("test"))), f"the test split of {directory}"
        if not refs:
            raise GlmlabError(f"the test split of {directory} holds no sentences to use as references",
                              "give reference sentences with --references F (one per line)")
    return _Scored(str(directory), tokenizer, tokens, len(find_sentences(tokens, tokenizer.eos_id, len(tokens) + 2)),
                   in_split, refs, source)


def _compare_one(run: LoadedRun, name: str, scored: _Scored, split: str, samples: int, seed: int, iw_samples: int,
                 batch_size: int, device: torch.device, say: Callable[[str], None], unit: str) -> RunComparison:
    """One run's row: its likelihood under its own accounting, its samples' metrics, its curves."""
    model, tokenizer, tokens = run.model, scored.tokenizer, scored.tokens
    other = sum(p.numel() for name_ in model.traits.auxiliary for p in model.get_submodule(name_).parameters())
    if is_sentence_run(run):
        say(f"{name}: scoring {scored.sentences:,} sentences" + (f" (importance-weighted, k={iw_samples})"
                                                                 if model.traits.latent_dim else ""))
        if tokenizer.bos_id is None or tokenizer.pad_id is None:
            raise GlmlabError(f"the tokenizer of {run.run_dir} has no <bos> or <pad> token, which sentence "
                              "scoring needs", "compare runs trained on data from glmlab prepare")
        report = evaluate_sentences(model, tokenizer, find_sentences(tokens, tokenizer.eos_id, model.block_size),
                                    f"{split} split of {scored.directory}", batch_size=batch_size, samples=iw_samples,
                                    bleu_sentences=0, seed=seed, device=device)
        accounting, kind, per_token, per_sentence, ppl, count = ("sentence", report.nll_kind, report.nll_per_token,
                                                                  report.nll_per_sentence, report.perplexity,
                                                                  report.tokens)
    else:
        say(f"{name}: scoring {len(tokens):,} tokens in windows")
        total, count = sum_nll(model, tokens, tokenizer.eos_id, batch_size=batch_size, device=device)
        per_token = total / max(count, 1)
        kind = "pseudo" if model.traits.pseudo_likelihood else "exact"
        accounting, per_sentence, ppl = "window", None, math.exp(min(per_token, 700.0))
    say(f"{name}: generating {samples:,} samples")
    generated = generate_samples(run, samples, seed)
    say(f"{name}: sample metrics")
    metrics = sample_report(generated, scored.references, ORDERS, unit=unit)
    train_curve, val_curve, elapsed, steps = _curves(run.run_dir)
    return RunComparison(
        name=name, run_dir=str(run.run_dir), family=run.config.model.family,
        parameters=sum(p.numel() for p in model.parameters()) - other, other_parameters=other, training_time=elapsed,
        steps=steps, accounting=accounting, nll_kind=kind,
        iw_samples=iw_samples if kind == "importance-weighted" else None,
        nll_per_token=per_token, nll_per_sentence=per_sentence, perplexity=ppl, tokens=count, comparable=True,
        samples=metrics, empty_samples=sum(1 for g in generated if not g), examples=generated[:EXAMPLES],
        train_curve=train_curve, val_curve=val_curve)


def _mark_accountings(results: list[RunComparison], warnings: list[str]) -> str:
    """The accounting of the NLL column (the majority's; a tie goes to sentence); rows of the other are marked."""
    for r in results:  # a pseudo-log-likelihood is comparable with nothing, a likelihood's accounting aside
        r.comparable = r.nll_kind != "pseudo"
    pseudo = [r.name for r in results if r.nll_kind == "pseudo"]
    if pseudo:
        warnings.append(f"{', '.join(pseudo)}: a masked LM's pseudo-log-likelihood (each token given all the others), "
                        "marked †: not comparable with an NLL")
    accountings = [r.accounting for r in results if r.nll_kind != "pseudo"] or ["window"]
    main = max(("sentence", "window"), key=accountings.count)
    if len(set(accountings)) > 1:
        for r in results:
            r.comparable = r.comparable and r.accounting == main
        odd = ", ".join(r.name for r in results if r.accounting != main)
        warnings.append(f"{odd} scored with {'window' if main == 'sentence' else 'sentence'} accounting, the others "
                        f"with {main} accounting: their NLL / PPL (marked †) are not comparable with the others'")
    return main


def compare_runs(run_dirs: Sequence[str | Path], data_dir: str | Path | None = None, split: str = "test",
                 references: str | Path | None = None, samples: int = SAMPLES, seed: int = 0,
                 iw_samples: int = IW_SAMPLES, max_sentences: int | None = None, batch_size: int = 16,
                 checkpoint: str = "best", device: str = "auto",
                 progress: Callable[[str], None] | None = None, metric_tokenizer: str = "auto") -> Comparison:
    """Score and sample every run on one data directory (``data_dir``, default the first run's).

    Runs whose tokenizers differ are refused; runs trained on different data directories with the same
    tokenizer are compared with a warning. ``max_sentences`` caps the sentences scored (default all).
    """
    say = progress or (lambda _message: None)
    _check_options(samples, iw_samples, batch_size, max_sentences)
    checked, warnings = _check_runs(run_dirs)
    scored = _scored(checked[0], data_dir, split, max_sentences, references)
    unit = resolve(metric_tokenizer, scored.references)  # characters for Chinese, words otherwise
    dev = select_device(device)
    results = []
    for run_info, name in zip(checked, _names([r.path for r in checked]), strict=True):
        say(f"{name}: loading")
        results.append(_compare_one(load_run(run_info.path, checkpoint=checkpoint, device=dev), name, scored, split,
                                    samples, seed, iw_samples, batch_size, dev, say, unit))
    main = _mark_accountings(results, warnings)
    return Comparison(runs=results, data_dir=scored.directory, split=split, sentences=scored.sentences,
                      split_sentences=scored.split_sentences, tokens=len(scored.tokens), references=scored.references,
                      references_source=scored.references_source, samples=samples, seed=seed, iw_samples=iw_samples,
                      checkpoint=checkpoint, accounting=main, warnings=warnings, metric_tokenizer=unit)
