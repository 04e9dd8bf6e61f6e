"""The before/after report of fine-tunes on one task (``glmlab finetune report``): from scratch, linear probe,
full fine-tune and LoRA side by side, with trainable parameters, time and metrics (report.md, metrics.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmlab import atomic
from glmlab.errors import GlmlabError, RunDirError
from glmlab.runs import CONFIG, METRICS, read_metrics

RESULTS = "results.json"
COLUMNS = {  # task: (key, heading, format) of each metric column
    "classify": [("accuracy", "accuracy", "{:.2%}"), ("macro_f1", "macro-F1", "{:.3f}"), ("loss", "CE loss", "{:.3f}")],
    "sft": [("loss", "NLL/token", "{:.3f}"), ("exact_match", "exact match", "{:.2%}"), ("bleu", "BLEU-4", "{:.3f}"),
            ("rouge_l", "ROUGE-L", "{:.3f}")],
    "dpo": [("loss", "preference loss", "{:.4f}"), ("reward_accuracy", "preference accuracy", "{:.2%}"),
            ("reward_margin", "reward margin", "{:.3f}")],
}
HEADLINE = {"classify": "accuracy", "sft": "rouge_l", "dpo": "reward_accuracy"}  # what metrics.png plots per run


def _read(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESULTS
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {RESULTS} (not a finished fine-tune)",
                          "finish it with glmlab finetune ... --resume --out " + str(run_dir))
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{run_dir} is not a readable fine-tuning run ({exc})",
                          "point to directories written by glmlab finetune") from None
    results["name"] = run_dir.name
    results["sources"] = config.get("finetune", {}).get("sources", {})
    return results


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _label(r: dict[str, Any]) -> str:
    if not r.get("init"):
        return "from scratch"
    return {"full": "full fine-tune", "probe": "linear probe", "lora": "LoRA"}.get(r["mode"], r["mode"])


def _val_curves(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run_dir / METRICS) if r.get("split") == "val" and key in r]


def write_report(run_dirs: list[str | Path], out: str | Path, split: str = "val", title: str | None = None) -> Path:
    """report.md (+ metrics.png) comparing fine-tunes of one task; returns the Markdown path."""
    runs = [Path(r) for r in run_dirs]
    results = [_read(r) for r in runs]
    tasks = {r["task"] for r in results}
    if len(tasks) > 1:
        raise GlmlabError(f"the runs are of different tasks ({', '.join(sorted(tasks))})",
                          "report classify and sft fine-tunes separately")
    task = tasks.pop()
    missing = [r["name"] for r in results if split not in r]
    if missing:
        raise GlmlabError(f"runs {', '.join(missing)} have no {split} figures", "use --split val")
    digests = {(r["sources"].get(split) or {}).get("sha256") for r in results}
    flags = []
    if len(digests) > 1:
        flags.append(f"**Warning: the runs were measured on different {split} files**; their figures do not compare.")
    columns = COLUMNS[task]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title or 'Fine-tuning: before and after'}", "",
             f"Task `{task}`, figures on the **{split}** split "
             f"({results[0][split].get('examples', results[0][split].get('pairs', '?'))} examples). "
             "Each row: the best validation checkpoint of one run.", *flags, "",
             "| run | start | trainable params | of total | train time | steps | "
             + " | ".join(c[1] for c in columns) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(columns)]
    shown_before = set()
    for r in results:
        if task != "classify" and r.get("before") and r["init"] not in shown_before:  # the init model, once
            shown_before.add(r["init"])
            before = r["before"].get(split, {})
            lines.append(f"| (before) {Path(r['init']).name} | pre-trained, not fine-tuned | 0 | — | — | 0 | "
                         + " | ".join(fmt.format(before[k]) if k in before else "—" for k, _, fmt in columns) + " |")
        figures = r[split]
        lines.append(f"| {r['name']} | {_label(r)} | {r['trainable_parameters']:,} | {r['total_parameters']:,} | "
                     f"{_duration(r['train_seconds'])} | {r['steps']} | "
                     + " | ".join(fmt.format(figures[k]) if k in figures else "—" for k, _, fmt in columns) + " |")
    if task == "classify":
        lines += ["", "Confusion matrices (rows: true label, columns: predicted):", ""]
        for r in results:
            labels = r.get("labels", [])
            lines.append(f"- `{r['name']}` ({', '.join(labels)}): {r[split]['confusion']}")
    else:
        for r in results:
            shown = r[split].get("examples_shown", [])[:3]
            if shown:
                lines += ["", f"Completions of `{r['name']}`:", ""]
                lines += [f"- prompt `{s['prompt']!r}` → `{s['generated']!r}` (reference `{s['reference']!r}`)"
                          for s in shown]
    plot = _plot(runs, results, task, split, out / "metrics.png")
    if plot:
        lines += ["", f"![metrics]({plot.name})"]
    path = out / "report.md"
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def _plot(runs: list[Path], results: list[dict[str, Any]], task: str, split: str, path: Path) -> Path | None:
    """Left: the headline metric per run against trainable parameters; right: validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = HEADLINE[task]
    heading = next(name for k, name, _ in COLUMNS[task] if k == key)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        left.scatter(max(r["trainable_parameters"], 1), r[split].get(key, float("nan")), s=40)
        left.annotate(f"{r['name']} ({_label(r)})", (max(r["trainable_parameters"], 1), r[split].get(key, 0.0)),
                      fontsize=8, xytext=(4, 4), textcoords="offset points")
    left.set_xscale("log")
    left.set_xlabel("trainable parameters")
    left.set_ylabel(f"{split} {heading}")
    curve_key = "accuracy" if task == "classify" else "loss"
    for run, r in zip(runs, results, strict=True):
        points = _val_curves(run, curve_key)
        if points:
            right.plot(*zip(*points, strict=True), label=r["name"])
    right.set_xlabel("step")
    right.set_ylabel(f"val {curve_key}")
    right.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
