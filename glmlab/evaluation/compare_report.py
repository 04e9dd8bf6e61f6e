"""`glmlab compare`'s report: a :class:`~glmlab.evaluation.compare.Comparison` written as ``report.md``, a
self-contained ``report.html`` (inline CSS, the curves as a data URI, nothing fetched) and ``curves.png``.

Every file is written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from glmlab import atomic
from glmlab.errors import GlmlabError
from glmlab.evaluation.compare import ACCOUNTING_NOTES, ORDERS, Comparison
from glmlab.evaluation.sample_metrics import TEXYGEN_SAMPLE_SIZE

REPORT_MD, REPORT_HTML, CURVES = "report.md", "report.html", "curves.png"


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


# --- Markdown ---------------------------------------------------------------------------------------------


def nll_rows(result: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["run", "family", "parameters", "training time", "steps", "accounting", "NLL", "NLL/token",
              "NLL/sentence", "PPL"]
    rows = []
    for r in result.runs:
        mark = "" if r.comparable else " †"
        params = f"{r.parameters:,}" + (f" (+{r.other_parameters:,} D)" if r.other_parameters else "")
        rows.append([r.name, r.family, params, format_duration(r.training_time),
                     "–" if r.steps is None else f"{r.steps:,}", r.accounting, r.nll_label,
                     f"{r.nll_per_token:.4f}{mark}",
                     "–" if r.nll_per_sentence is None else f"{r.nll_per_sentence:.3f}{mark}",
                     f"{r.perplexity:.3f}{mark}"])
    return header, rows

def sample_rows(result: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["run", "samples", "mean length", *(f"BLEU-{n}" for n in ORDERS),
              *(f"Self-BLEU-{n}" for n in ORDERS), "distinct-1", "distinct-2"]
    rows = []
    for r in result.runs:
        s = r.samples
        rows.append([r.name, f"{s.generated:,}", f"{s.mean_length:.2f}",
                     *(_score(s.bleu.get(n)) for n in ORDERS), *(_score(s.self_bleu.get(n)) for n in ORDERS),
                     *(_score(s.distinct.get(n)) for n in (1, 2))])
    return header, rows

UNIT_NAMES = {"whitespace": "whitespace-separated words", "zh": "each Chinese/unspaced character a unit (as "
              "sacreBLEU's zh), other text split at whitespace", "char": "each non-space character a unit"}


def reference_line(result: Comparison) -> str:
    used = min(len(result.references), TEXYGEN_SAMPLE_SIZE)
    return (f"{result.samples:,} samples per run (temperature 1, seed {result.seed}); {len(result.references):,} "
            f"reference sentences from {result.references_source}, BLEU against the first {used:,} of them "
            f"(Texygen), Self-BLEU over the first {min(result.samples, TEXYGEN_SAMPLE_SIZE):,} samples of each "
            f"run (nltk {result.runs[0].samples.nltk_version}, smoothing method 1, "
            f"{UNIT_NAMES[result.metric_tokenizer]})")

def evaluation_line(result: Comparison) -> str:
    capped = "" if result.sentences == result.split_sentences else \
        f" (the first {result.sentences:,} of its {result.split_sentences:,} sentences: --max-sentences)"
    return (f"{len(result.runs)} run(s) scored on the {result.split} split of {result.data_dir}{capped}: "
            f"{result.sentences:,} sentences, {result.tokens:,} tokens (`<eos>` included); {result.checkpoint} weights")

def summary_markdown(result: Comparison) -> str:
    """The tables, their notes and the warnings: what the CLI prints."""
    lines = [evaluation_line(result), ""]
    lines += [f"> warning: {w}" for w in result.warnings]
    if result.warnings:
        lines.append("")
    lines += [f"## Likelihood ({result.split} split)", "", *_markdown_table(*nll_rows(result)), ""]
    lines += [f"- {note}" for note in nll_notes(result)]
    lines += ["", "## Samples", "", *_markdown_table(*sample_rows(result)), "", f"- {reference_line(result)}"]
    return "\n".join(lines)

def nll_notes(result: Comparison) -> list[str]:
    notes = [f"accounting *{kind}*: {ACCOUNTING_NOTES[kind]}"
             for kind in ACCOUNTING_NOTES if any(r.accounting == kind for r in result.runs)]
    if any(r.nll_kind != "exact" for r in result.runs):
        notes.append(f"IW bound: the importance-weighted bound on a vae's NLL with k = {result.iw_samples} samples "
                     "of z per sentence (--iw-samples); an upper bound that includes the KL and tightens as k "
                     "grows (glmlab eval uses k = 500)")
    if any(not r.comparable and r.nll_kind != "pseudo" for r in result.runs):
        notes.append(f"†: scored with another accounting than the {result.accounting}-accounting rows; not "
                     "comparable with them")
    if any(r.nll_kind == "pseudo" for r in result.runs):
        notes.append("†: PLL, a masked LM's pseudo-log-likelihood (each token scored given all the others); not an "
                     "NLL and not comparable with one")
    notes.append("training time: the largest `elapsed` in the run's metrics.jsonl")
    if any(r.other_parameters for r in result.runs):
        notes.append("(+N D): a seqgan's discriminator, which neither generates nor is scored")
    return notes

def markdown(result: Comparison) -> str:
    lines = ["# glmlab compare", "", summary_markdown(result), "", "## Loss curves", "",
             f"![training (dashed) and validation (solid) loss of every run]({CURVES})", "",
             "The training objective each run logged (a vae's includes β·KL), against step.", "",
             "## Example samples", ""]
    for r in result.runs:
        empty = f", {r.empty_samples} of {r.samples.generated} empty" if r.empty_samples else ""
        lines += [f"### {r.name} ({r.family}{empty})", "", "```", *(e or "(empty)" for e in r.examples), "```", ""]
    return "\n".join(lines)


# --- HTML and the files ------------------------------------------------------------------------------------


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
             f"<p>{_inline(evaluation_line(result))}</p>"]
    parts += [f'<div class="warning">warning: {_inline(w)}</div>' for w in result.warnings]
    parts += [f"<h2>Likelihood ({esc(result.split)} split)</h2>", _html_table(*nll_rows(result)),
              '<ul class="notes">' + "".join(f"<li>{_inline(n)}</li>" for n in nll_notes(result))
              + "</ul>"]
    parts += ["<h2>Samples</h2>", _html_table(*sample_rows(result)),
              f'<p class="notes">{_inline(reference_line(result))}</p>']
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
    atomic.write_text(paths["markdown"], markdown(result) + "\n")
    atomic.write_text(paths["html"], render_html(result, paths["curves"].read_bytes()))
    return paths
