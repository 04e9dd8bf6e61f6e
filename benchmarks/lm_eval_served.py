"""lm-evaluation-harness against a glmlab run three ways, as a user runs them, side by side: ``glmlab eval RUN
--tasks`` (the in-process adapter), ``lm_eval --model hf`` on the run's ``glmlab export-hf`` directory, and
``lm_eval --model local-completions`` against ``glmlab serve RUN``. Prints each task's metrics per path and the
largest per-item difference from the adapter (log-likelihoods in nats; generations: how many differ).

    python benchmarks/lm_eval_served.py RUN_DIR --tasks glmlab_cloze,glmlab_passages,glmlab_starts \\
        --include-path tests/lm_eval_tasks

The served path is told ``max_length = block_size + 2``: local-completions sends at most max_length - 1 tokens,
one of them the generated token, so that is what scores in the same windows as the hf model (whose max_length is
the exported n_positions). Its tokenizer is the server's own (``/tokenizer_info``, found by lm-eval itself).
Needs ``pip install "glmlab[eval]" "lm-eval[hf]"``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], **kwargs) -> None:
    started = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-3000:]}")
    print(f"  {' '.join(cmd[2:5])} ... {time.perf_counter() - started:.1f} s", file=sys.stderr)


def lm_eval_cli(model: str, model_args: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", args.tasks,
           "--log_samples", "--output_path", str(out), "--device", "cpu", "--batch_size", "8"]
    if args.include_path:
        cmd += ["--include_path", args.include_path]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    run(cmd)
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    results["samples"] = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        results["samples"][task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results


def items(results: dict) -> dict[tuple, object]:
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for j, resp in enumerate(s["filtered_resps"]):
                value = resp[0] if isinstance(resp, list) else resp
                out[task, s["doc_id"], j] = value if isinstance(value, str) and task_generates(s) else float(value)
    return out


def task_generates(sample: dict) -> bool:
    return "until" in json.dumps(sample.get("arguments", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--include-path")
    parser.add_argument("--limit", type=float)
    args = parser.parse_args()
    glmlab = [sys.executable, "-m", "glmlab"]
    block = json.loads((Path(args.run_dir) / "config.json").read_text())["model"]["block_size"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("running the three paths", file=sys.stderr)
        cmd = [*glmlab, "eval", args.run_dir, "--tasks", args.tasks, "--log-samples",
               "--output-path", str(tmp / "adapter.json")]
        cmd += ["--include-path", args.include_path] if args.include_path else []
        cmd += ["--limit", str(args.limit)] if args.limit else []
        run(cmd)
        paths = {"adapter": json.loads((tmp / "adapter.json").read_text())}
        run([*glmlab, "export-hf", args.run_dir, str(tmp / "hf")])
        paths["hf"] = lm_eval_cli("hf", f"pretrained={tmp / 'hf'},dtype=float32", args, tmp / "hf-out")
        port = free_port()
        server = subprocess.Popen([*glmlab, "serve", args.run_dir, "--port", str(port), "--model-name", "served"],
                                  env={**os.environ, **OFFLINE}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("glmlab serve did not start")
                time.sleep(0.5)
            paths["server"] = lm_eval_cli("local-completions", f"base_url=http://127.0.0.1:{port}/v1/completions,"
                                          f"model=served,max_length={block + 2}", args, tmp / "served-out")
        finally:
            server.terminate()
            server.wait(30)
    mine = items(paths["adapter"])
    print(f"\n{'task':<18} {'metric':<16} {'adapter':>12} {'hf':>12} {'server':>12}")
    for task, metrics in paths["adapter"]["results"].items():
        for metric, value in metrics.items():
            if isinstance(value, float) and "stderr" not in metric:
                row = [paths[p]["results"][task].get(metric) for p in ("hf", "server")]
                print(f"{task:<18} {metric.split(',')[0]:<16} {value:12.4f} {row[0]:12.4f} {row[1]:12.4f}")
    print(f"\n{'per item, against the adapter':<32} {'hf':>14} {'server':>14}")
    for task in paths["adapter"]["results"]:
        keys = [k for k in mine if k[0] == task]
        cells = []
        for path in ("hf", "server"):
            theirs = items(paths[path])
            if any(isinstance(mine[k], str) for k in keys):
                cells.append(f"{sum(mine[k] != theirs.get(k) for k in keys)}/{len(keys)} differ")
            else:
                cells.append(f"{max(abs(mine[k] - theirs[k]) for k in keys):.1e} nats")
        print(f"{task + f' ({len(keys)} items)':<32} {cells[0]:>14} {cells[1]:>14}")


if __name__ == "__main__":
    main()
