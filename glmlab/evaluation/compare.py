"""`glmlab compare`: runs trained on the same data side by side, as ``report.md`` and a self-contained ``report.html``.

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

import base64
import html
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmlab import atomic
from glmlab.data.corpus import decode_text
from glmlab.data.dataset import open_data_dir
from glmlab.data.sentences import find_sentences
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.evaluation.likelihood import sum_nll
from glmlab.evaluation.report import evaluate_sentences, is_sentence_run
from glmlab.evaluation.sample_metrics import TEXYGEN_SAMPLE_SIZE, SampleReport, sample_report
from glmlab.generation.engine import row_seed
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.runs import METRICS, TOKENIZER, LoadedRun, load_run, read_metrics, read_run_config
from glmlab.runtime import select_device

SAMPLES = 500
IW_SAMPLES = 50  # compare's default k for a vae's importance-weighted NLL (glmlab eval uses 500)
EXAMPLES = 5
DECODE_ROWS = 256  # sentences generated per engine call
ORDERS = (2, 3, 4, 5)
REPORT_MD, REPORT_HTML, CURVES = "report.md", "report.html", "curves.png"
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
    nll_kind: str  # "exact" or "importance-weighted"
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # --- Markdown ---------------------------------------------------------------------------------------------

    def nll_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["run", "family", "parameters", "training time", "steps", "accounting", "NLL", "NLL/token",
                  "NLL/sentence", "PPL"]
        rows = []
        for r in self.runs:
            mark = "" if r.comparable else " †"
            params = f"{r.parameters:,}" + (f" (+{r.other_parameters:,} D)" if r.other_parameters else "")
            rows.append([r.name, r.family, params, format_duration(r.training_time),
                         "–" if r.steps is None else f"{r.steps:,}", r.accounting, r.nll_label,
                         f"{r.nll_per_token:.4f}{mark}",
                         "–" if r.nll_per_sentence is None else f"{r.nll_per_sentence:.3f}{mark}",
                         f"{r.perplexity:.3f}{mark}"])
        return header, rows

    def sample_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["run", "samples", "mean length", *(f"BLEU-{n}" for n in ORDERS),
                  *(f"Self-BLEU-{n}" for n in ORDERS), "distinct-1", "distinct-2"]
        rows = []
        for r in self.runs:
            s = r.samples
            rows.append([r.name, f"{s.generated:,}", f"{s.mean_length:.2f}",
                         *(_score(s.bleu.get(n)) for n in ORDERS), *(_score(s.self_bleu.get(n)) for n in ORDERS),
                         *(_score(s.distinct.get(n)) for n in (1, 2))])
        return header, rows

    def reference_line(self) -> str:
        used = min(len(self.references), TEXYGEN_SAMPLE_SIZE)
        return (f"{self.samples:,} samples per run (temperature 1, seed {self.seed}); {len(self.references):,} "
                f"reference sentences from {self.references_source}, BLEU against the first {used:,} of them "
                f"(Texygen), Self-BLEU over the first {min(self.samples, TEXYGEN_SAMPLE_SIZE):,} samples of each "
                f"run (nltk {self.runs[0].samples.nltk_version}, smoothing method 1, whitespace-separated words)")

    def evaluation_line(self) -> str:
        capped = "" if self.sentences == self.split_sentences else \
            f" (the first {self.sentences:,} of its {self.split_sentences:,} sentences: --max-sentences)"
        return (f"{len(self.runs)} run(s) scored on the {self.split} split of {self.data_dir}{capped}: "
                f"{self.sentences:,} sentences, {self.tokens:,} tokens (`<eos>` included); {self.checkpoint} weights")

    def summary_markdown(self) -> str:
        """The tables, their notes and the warnings: what the CLI prints."""
        lines = [self.evaluation_line(), ""]
        lines += [f"> warning: {w}" for w in self.warnings]
        if self.warnings:
            lines.append("")
        lines += [f"## Likelihood ({self.split} split)", "", *_markdown_table(*self.nll_rows()), ""]
        lines += [f"- {note}" for note in self.nll_notes()]
        lines += ["", "## Samples", "", *_markdown_table(*self.sample_rows()), "", f"- {self.reference_line()}"]
        return "\n".join(lines)

    def nll_notes(self) -> list[str]:
        notes = [f"accounting *{kind}*: {ACCOUNTING_NOTES[kind]}"
                 for kind in ACCOUNTING_NOTES if any(r.accounting == kind for r in self.runs)]
        if any(r.nll_kind != "exact" for r in self.runs):
            notes.append(f"IW bound: the importance-weighted bound on a vae's NLL with k = {self.iw_samples} samples "
                         "of z per sentence (--iw-samples); an upper bound that includes the KL and tightens as k "
                         "grows (glmlab eval uses k = 500)")
        if any(not r.comparable for r in self.runs):
            notes.append(f"†: scored with another accounting than the {self.accounting}-accounting rows; not "
                         "comparable with them")
        notes.append("training time: the largest `elapsed` in the run's metrics.jsonl")
        if any(r.other_parameters for r in self.runs):
            notes.append("(+N D): a seqgan's discriminator, which neither generates nor is scored")
        return notes

    def markdown(self) -> str:
        lines = ["# glmlab compare", "", self.summary_markdown(), "", "## Loss curves", "",
                 f"![training (dashed) and validation (solid) loss of every run]({CURVES})", "",
                 "The training objective each run logged (a vae's includes β·KL), against step.", "",
                 "## Example samples", ""]
        for r in self.runs:
            empty = f", {r.empty_samples} of {r.samples.generated} empty" if r.empty_samples else ""
            lines += [f"### {r.name} ({r.family}{empty})", "", "```", *(e or "(empty)" for e in r.examples), "```", ""]
        return "\n".join(lines)


@dataclass
class _Run:
    """A run directory checked before anything is loaded."""

    path: Path
    raw: dict[str, Any]
    tokenizer: str  # canonical tokenizer.json
    data_dir: str | None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---" if i == 0 or not any(_numeric(row[i]) for row in rows) else "---:" for i in range(len(header))]
    return [line(header), line(align), *(line(row) for row in rows)]


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell == "–")


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


def check_out_dir(out: str | Path, create: bool = False) -> Path:
    """The report directory (created with ``create``); a clear error when a file is in the way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GlmlabError(f"--out {out} is a file, and the report needs a directory",
                          "give a directory path (it is created when missing)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise GlmlabError(f"cannot create the report directory {out}: {blocking} is a file",
                          "give a directory path whose parents are directories")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


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
    """A sentence's ids as whitespace-separated words: up to the first ``<eos>``; ``<bos>`` / ``<pad>`` dropped,
    ``<unk>`` spelled out; with ``cut_line``, only the text before the first line break."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    skip = {tokenizer.bos_id, tokenizer.pad_id}
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


def compare_runs(run_dirs: Sequence[str | Path], data_dir: str | Path | None = None, split: str = "test",
                 references: str | Path | None = None, samples: int = SAMPLES, seed: int = 0,
                 iw_samples: int = IW_SAMPLES, max_sentences: int | None = None, batch_size: int = 16,
                 checkpoint: str = "best", device: str = "auto",
                 progress: Callable[[str], None] | None = None) -> Comparison:
    """Score and sample every run on one data directory (``data_dir``, default the first run's).

    Runs whose tokenizers differ are refused; runs trained on different data directories with the same
    tokenizer are compared with a warning. ``max_sentences`` caps the sentences scored (default all).
    """
    say = progress or (lambda _message: None)
    for name, value, least in (("--samples", samples, 1), ("--iw-samples", iw_samples, 1),
                               ("--batch-size", batch_size, 1)):
        if value < least:
            raise GlmlabError(f"{name} {value} must be at least {least}", f"give {name} a positive number")
    if max_sentences is not None and max_sentences < 1:
        raise GlmlabError(f"--max-sentences {max_sentences} must be at least 1", "leave it out to score every sentence")
    checked, warnings = _check_runs(run_dirs)
    directory = data_dir or checked[0].data_dir
    if not directory or not Path(directory).is_dir():
        raise GlmlabError(f"the data directory {directory} (where {checked[0].path} was trained) is not there",
                          "pass --data DATA_DIR: the data directory the runs were trained on")
    data = open_data_dir(directory)
    if json.dumps(json.loads(data.tokenizer.hf.to_str()), sort_keys=True) != checked[0].tokenizer:
        raise GlmlabError(f"{directory} was tokenized with a different tokenizer than the runs",
                          "pass --data with the data directory the runs were trained on")
    tokenizer = data.tokenizer
    tokens = np.asarray(data.tokens(split))
    if len(tokens) == 0:
        raise GlmlabError(f"the {split} split of {directory} is empty", "score another split with --split")
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    split_sentences_count = len(find_sentences(tokens, tokenizer.eos_id, len(tokens) + 2))
    if max_sentences is not None and max_sentences < len(ends):
        tokens = tokens[:ends[max_sentences - 1] + 1]
    scored = len(find_sentences(tokens, tokenizer.eos_id, len(tokens) + 2))
    if references is not None:
        refs, source = read_references(references), str(references)
    else:
        test = data.tokens("test")
        refs, source = split_sentences(tokenizer, np.asarray(test)), f"the test split of {directory}"
        if not refs:
            raise GlmlabError(f"the test split of {directory} holds no sentences to use as references",
                              "give reference sentences with --references F (one per line)")
    dev = select_device(device)
    results = []
    for run_info, name in zip(checked, _names([r.path for r in checked]), strict=True):
        say(f"{name}: loading")
        run = load_run(run_info.path, checkpoint=checkpoint, device=dev)
        model = run.model
        family = run.config.model.family
        other = sum(p.numel() for name in model.traits.auxiliary for p in model.get_submodule(name).parameters())
        parameters = sum(p.numel() for p in model.parameters()) - other
        if is_sentence_run(run):
            say(f"{name}: scoring {scored:,} sentences" + (f" (importance-weighted, k={iw_samples})"
                                                             if model.traits.latent_dim else ""))
            if tokenizer.bos_id is None or tokenizer.pad_id is None:
                raise GlmlabError(f"the tokenizer of {run_info.path} has no <bos> or <pad> token, which sentence "
                                  "scoring needs", "compare runs trained on data from glmlab prepare")
            sentences = find_sentences(tokens, tokenizer.eos_id, model.block_size)
            report = evaluate_sentences(model, tokenizer, sentences, f"{split} split of {directory}",
                                        batch_size=batch_size, samples=iw_samples, bleu_sentences=0, seed=seed,
                                        device=dev)
            accounting, kind, per_token, per_sentence, ppl, count = ("sentence", report.nll_kind,
                                                                      report.nll_per_token, report.nll_per_sentence,
                                                                      report.perplexity, report.tokens)
        else:
            say(f"{name}: scoring {len(tokens):,} tokens in windows")
            total, count = sum_nll(model, tokens, tokenizer.eos_id, batch_size=batch_size, device=dev)
            per_token = total / max(count, 1)
            accounting, kind, per_sentence, ppl = "window", "exact", None, math.exp(min(per_token, 700.0))
        say(f"{name}: generating {samples:,} samples")
        generated = generate_samples(run, samples, seed)
        say(f"{name}: sample metrics")
        metrics = sample_report(generated, refs, ORDERS)
        train_curve, val_curve, elapsed, steps = _curves(run_info.path)
        results.append(RunComparison(
            name=name, run_dir=str(run_info.path), family=family, parameters=parameters, other_parameters=other,
            training_time=elapsed, steps=steps, accounting=accounting, nll_kind=kind,
            iw_samples=iw_samples if kind != "exact" else None, nll_per_token=per_token, nll_per_sentence=per_sentence,
            perplexity=ppl, tokens=count, comparable=True, samples=metrics,
            empty_samples=sum(1 for g in generated if not g), examples=generated[:EXAMPLES],
            train_curve=train_curve, val_curve=val_curve))
        del run, model
    accountings = [r.accounting for r in results]
    main = max(("sentence", "window"), key=accountings.count)  # the majority; a tie goes to sentence
    if len(set(accountings)) > 1:
        for r in results:
            r.comparable = r.accounting == main
        odd = ", ".join(r.name for r in results if not r.comparable)
        warnings.append(f"{odd} scored with {'window' if main == 'sentence' else 'sentence'} accounting, the others "
                        f"with {main} accounting: their NLL / PPL (marked †) are not comparable with the others'")
    return Comparison(runs=results, data_dir=str(directory), split=split, sentences=scored,
                      split_sentences=split_sentences_count, tokens=len(tokens), references=refs,
                      references_source=source, samples=samples, seed=seed, iw_samples=iw_samples,
                      checkpoint=checkpoint, accounting=main, warnings=warnings)


# --- writing the report ----------------------------------------------------------------------------------------


def plot_curves(result: Comparison, path: Path) -> None:
    """Every run's validation loss (solid) and training loss (dashed, same colour) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(result.runs):
        colour = colours[i % len(colours)]
        if r.train_curve:
            ax.plot(*zip(*r.train_curve, strict=True), "--", color=colour, alpha=0.6, linewidth=1,
                    label=f"{r.name} train")
        if r.val_curve:
            ax.plot(*zip(*r.val_curve, strict=True), "o-", color=colour, linewidth=1.5, markersize=3,
                    label=f"{r.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("validation (solid) and training (dashed) loss")
    ax.grid(alpha=0.3)
    if any(r.train_curve or r.val_curve for r in result.runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5em 0.8em; margin: 0.5em 0; }
.notes { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i and _numeric(c) else ""}>{html.escape(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Markdown-ish text as HTML: escaped, with `code` and *emphasis* spans."""
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))
    return re.sub(r"\*(\w+)\*", r"<em>\1</em>", text)


def render_html(result: Comparison, png: bytes) -> str:
    """The report as one HTML file: inline CSS, the curves as a data URI, nothing fetched."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>glmlab compare</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>glmlab compare</h1>",
             f"<p>{_inline(result.evaluation_line())}</p>"]
    parts += [f'<div class="warning">warning: {_inline(w)}</div>' for w in result.warnings]
    parts += [f"<h2>Likelihood ({esc(result.split)} split)</h2>", _html_table(*result.nll_rows()),
              '<ul class="notes">' + "".join(f"<li>{_inline(n)}</li>" for n in result.nll_notes())
              + "</ul>"]
    parts += ["<h2>Samples</h2>", _html_table(*result.sample_rows()),
              f'<p class="notes">{_inline(result.reference_line())}</p>']
    data = base64.b64encode(png).decode("ascii")
    parts += ["<h2>Loss curves</h2>",
              '<img alt="validation (solid) and training (dashed) loss of every run" '
              f'src="data:image/png;base64,{data}">',
              '<p class="notes">The training objective each run logged (a vae\'s includes β·KL), against step.</p>',
              "<h2>Example samples</h2>"]
    for r in result.runs:
        empty = f", {r.empty_samples} of {r.samples.generated} empty" if r.empty_samples else ""
        parts += [f"<h3>{esc(r.name)} ({esc(r.family)}{esc(empty)})</h3>",
                  "<pre>" + "\n".join(esc(e or "(empty)") for e in r.examples) + "</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(result: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """``curves.png``, ``report.md`` and ``report.html`` in ``out_dir`` (created); returns their paths."""
    out = check_out_dir(out_dir, create=True)
    paths = {"curves": out / CURVES, "markdown": out / REPORT_MD, "html": out / REPORT_HTML}
    plot_curves(result, paths["curves"])
    atomic.write_text(paths["markdown"], result.markdown() + "\n")
    atomic.write_text(paths["html"], render_html(result, paths["curves"].read_bytes()))
    return paths
