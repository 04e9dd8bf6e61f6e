"""`glmlab prepare`'s time and peak memory per 100 MB of text, with and without line breaks (issue 22, items 10-11).

Three corpora of ``--mb`` megabytes are built in a temporary folder from WikiText-2's training text: as it is
(lines of a few hundred characters), the same text on one line (its line breaks made spaces: a file with no
newline at all), and random letters on one line (no space, digit or punctuation: one unbroken word, the worst
case of base64 and minified files, whose punctuation breaks them into shorter runs). Each is prepared in a
process of its own (``--tokenizer``, default bpe, its default vocabulary; a small ``--val`` file so that the
corpus is all training text), and the process's wall time and peak resident memory are printed. With
``--baseline DIR`` (another checkout of glmlab, e.g. the commit before a change) every row is run with that code
too, alternating, so the two are measured in one sitting on one machine.

    python benchmarks/prepare_scale.py                       # 100 MB rows
    python benchmarks/prepare_scale.py --mb 20 --baseline /tmp/old-glmlab
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RUNNER = ("import json, resource, sys, time; from glmlab.cli import main; t = time.perf_counter(); "
          "code = main(sys.argv[1:]); print(json.dumps({'code': code, 'seconds': time.perf_counter() - t, "
          "'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")


def corpora(folder: Path, mb: int, shared: Path) -> dict[str, Path]:
    """The three corpora of about ``mb`` MB (see the module docstring)."""
    text = (shared / "wikitext-2" / "train.txt").read_text(encoding="utf-8")
    size = mb * 1_000_000
    lined = (text * (size // len(text) + 1))[:size]
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = {"lines": lined, "one line": lined.replace("\n", " "),
           "letters, one line": "".join(letters[b % 26] for b in os.urandom(size))}
    paths = {}
    for name, body in out.items():
        path = folder / (name.replace(" ", "_").replace(",", "") + ".txt")
        path.write_text(body, encoding="utf-8")
        paths[name] = path
    (folder / "val.txt").write_text(text[:50_000], encoding="utf-8")
    return paths


def measured(code_dir: Path, corpus: Path, out: Path, tokenizer: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}  # run from the corpus's folder: no checkout on the path first
    argv = [sys.executable, "-c", RUNNER, "prepare", str(corpus), "--val", str(corpus.parent / "val.txt"),
            "--out", str(out), "--tokenizer", tokenizer]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=corpus.parent)
    except subprocess.TimeoutExpired:
        return {"code": None, "seconds": time.perf_counter() - started, "peak_mb": None,
                "error": f"not done in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"code": done.returncode, "seconds": time.perf_counter() - started, "peak_mb": None,
                "error": done.stderr[-300:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--tokenizer", default="bpe")
    parser.add_argument("--baseline", type=Path, default=None, help="another glmlab checkout to run alongside")
    parser.add_argument("--rows", default="lines|one line|letters, one line", help="which corpora ('|'-separated)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a prepare is given up")
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    wanted = args.rows.split("|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = corpora(folder, args.mb, args.shared)
        print(f"glmlab prepare --tokenizer {args.tokenizer}, {args.mb} MB per corpus")
        print("| corpus | code | seconds | peak memory (MB) |\n|---|---|---|---|")
        for name, path in paths.items():
            if name not in wanted:
                continue
            codes = [("this checkout", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
            for label, code_dir in codes:
                out = folder / f"data-{label.replace(' ', '_')}"
                result = measured(code_dir, path, out, args.tokenizer, args.timeout)
                subprocess.run(["rm", "-rf", str(out)], check=False)
                peak = f"{result['peak_mb']:,.0f}" if result.get("peak_mb") else "-"
                status = "" if result.get("code") == 0 else f" (failed: {result.get('error', 'timed out')!r})"
                print(f"| {name} | {label} | {result['seconds']:.1f}{status} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
