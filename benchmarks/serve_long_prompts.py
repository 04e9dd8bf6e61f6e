"""How long one streaming client waits between chunks while others send very long prompts (issue 22, item 2).

A ``glmlab serve RUN`` process (``--threads 1``) streams one long completion to a client that times the gaps
between its chunks; meanwhile three clients at once post a ~980 KB text (WikiText-2) to ``/v1/completions``
(refused as longer than ``--max-prompt-tokens``) and then to ``/tokenize`` (answered). Printed per phase: the
longest and the median gap the streaming client saw, and each heavy request's status and seconds. With
``--baseline DIR`` (another checkout of glmlab) the same is run with that code, in the same sitting.

    python benchmarks/serve_long_prompts.py RUN --baseline /tmp/old-glmlab
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
JSON = {"Content-Type": "application/json"}


def serving(code_dir: Path, run: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glmlab", "serve", str(run.resolve()), "--port", str(port),
                             "--threads", "1", "--max-tokens", "100000"], stderr=subprocess.DEVNULL, env=env,
                            cwd=tempfile.gettempdir())
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def phase(url: str, path: str, body: dict) -> tuple[list[float], list[tuple[int, float]]]:
    """The stream's gaps while three clients post ``body`` to ``path``; their statuses and seconds."""
    gaps: list[float] = []
    results: list[tuple[int, float]] = []
    stop = threading.Event()

    def stream() -> None:
        long = {"prompt": "The", "max_tokens": 100000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", content=json.dumps(long), headers=JSON,
                          timeout=300) as r:
            last = time.perf_counter()
            for _ in r.iter_lines():
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
                if stop.is_set():
                    break

    def heavy() -> None:
        started = time.perf_counter()
        r = httpx.post(url + path, content=json.dumps(body), headers=JSON, timeout=300)
        results.append((r.status_code, time.perf_counter() - started))

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(1.0)
    before = len(gaps)
    clients = [threading.Thread(target=heavy) for _ in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    during = gaps[before:]
    stop.set()
    streamer.join()
    return during, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    text = (args.shared / "wikitext-2" / "train.txt").read_text(encoding="utf-8")[:980_000]
    codes = [("this checkout", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    print("| code | 3 clients post 980 KB to | stream's longest gap (ms) | median gap (ms) | their answers |")
    print("|---|---|---|---|---|")
    for label, code in codes:
        proc = serving(code, args.run, args.port)
        try:
            url = f"http://127.0.0.1:{args.port}"
            for path, body in (("/v1/completions", {"prompt": text, "max_tokens": 1}), ("/tokenize", {"prompt": text})):
                gaps, results = phase(url, path, body)
                answers = ", ".join(f"{status} in {seconds:.2f} s" for status, seconds in sorted(results))
                print(f"| {label} | `{path}` | {max(gaps) * 1000:,.0f} | {sorted(gaps)[len(gaps) // 2] * 1000:.2f} | "
                      f"{answers} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
