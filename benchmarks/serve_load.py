"""Load test of ``glmlab serve``: 1, 4, 16 and 64 concurrent streaming clients against one server on loopback.

The server runs in its own process on the default model (``runs/shakespeare-char``, what ``make run``
trains; when it is missing, the same configuration is trained for ``--train-time``). Each client sends
``--requests`` streaming completions one after the other (``--tokens`` tokens each, end-of-text ignored,
seeded), and the script reports per concurrency level: total generated tokens/s (from each stream's
``usage``), the speed-up over one client, p50/p99 time to first token and inter-token latency (per
request: the time from its first to its last token over the tokens in between; the server may send
several tokens in one chunk to a client that reads slower than they come), errors, and the server's
resident memory before and after. A soak phase then sends ``--soak`` requests (16 clients) and
compares memory before and after. Each client holds one keep-alive connection and speaks HTTP/1.1 over
raw asyncio streams (see :class:`Connection`): on loopback the load generator competes with the server
for the same cores, and an HTTP library's per-chunk work would be measured as the server's.

``--compile-decode both`` starts two servers, one with ``glmlab serve --compile-decode`` (its steps compiled, or
loaded from the disk cache, before it answers), and measures each level on both, alternating ``--rounds`` times in
one sitting: the ratio of their tokens/s is the median of the rounds' ratios (no memory soak).

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --levels 1,4,16 --requests 4 --tokens 32 --soak 0
    python benchmarks/serve_load.py --compile-decode both --levels 1,4,16 --requests 16 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:", "To be, or not",
           "MENENIUS:\nWhat work's, my countrymen", "HAMLET:", "O, "]
# `glmlab serve` through its module, whether or not glmlab/cli.py wires it in yet.
SERVE = ("import sys; from argparse import ArgumentParser; from glmlab.serve.cli import add_parser; "
         "p = ArgumentParser(prog='glmlab'); add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); "
         "sys.exit(a.handler(a))")


def default_run(run: Path, train_time: str) -> Path:
    """The run to serve: ``run`` when it exists, else the default model trained for ``train_time``."""
    if (run / "config.json").is_file():
        return run
    from glmlab.config import read_yaml, resolve_config
    from glmlab.data.prepare import prepare
    from glmlab.training.trainer import train

    data = ROOT / "data" / "shakespeare-char"
    if not (data / "meta.json").is_file():
        prepare([], data, tokenizer="char")
    print(f"no run at {run}: training the default model for {train_time} ...", file=sys.stderr, flush=True)
    config = resolve_config(read_yaml(ROOT / "configs" / "shakespeare-char.yaml"),
                            [f"train.max_time={train_time}"])
    train(config, data, run, show_progress=False)
    return run


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the server and its engine process), MiB (Linux /proc)."""
    total, pids = 0.0, [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total if total else float("nan")


def start_server(run: Path, max_batch: int, threads: int, engine: str = "process", compile_decode: bool = False
                 ) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-c", SERVE, "serve", str(run), "--port", "0", "--max-batch", str(max_batch),
           "--max-queue", "4096", "--threads", str(threads), "--engine", engine] \
        + (["--compile-decode"] if compile_decode else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stderr.readline()
    while line.startswith("compiling the decoding step"):  # (--compile-decode, before the server answers)
        line = proc.stderr.readline()
    if " on http" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    url = line.split(" on ", 1)[1].split()[0].rstrip("/")
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the server did not answer /health")


class Connection:
    """One client's keep-alive HTTP/1.1 connection, spoken over raw asyncio streams: the load generator
    shares the machine's cores with the server, so it does as little as it can per token (no HTTP
    library, no JSON parsing of text chunks) to leave the CPU to what is being measured."""

    def __init__(self, url: str) -> None:
        self.host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: bytes):
        """Send a POST and yield the response's server-sent events (bytes, one per event)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        reader = self.reader
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if status != 200:
            detail = await reader.readexactly(int(headers.get("content-length", "0")))
            raise RuntimeError(f"HTTP {status}: {detail[:200]!r}")
        pending = b""
        while True:  # chunked transfer encoding
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            pending += (await reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                yield event

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def one_request(conn: Connection, prompt: str, tokens: int, seed: int, ttft: list[float],
                      gaps: list[float]) -> int:
    """One streaming completion; its generated tokens (from usage). Appends its TTFT and mean inter-token
    latency."""
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    started = time.perf_counter()
    first = last = None
    generated = 0
    async for event in conn.post_stream("/v1/completions", body):
        # text chunks are recognised without parsing them; only the usage chunk and errors are parsed
        if b'"text":"' in event and b'"text":""' not in event:
            last = time.perf_counter()
            if first is None:
                first = last
                ttft.append(first - started)
        elif event.startswith(b"data: {") and (b'"usage":{' in event or b'"error":' in event):
            chunk = json.loads(event[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            generated = chunk["usage"]["completion_tokens"]
    if first is not None and generated > 1:
        gaps.append((last - first) / (generated - 1))
    return generated


async def level(url: str, clients: int, requests: int, tokens: int) -> dict:
    """``clients`` concurrent clients, ``requests`` each; tokens/s, latencies and errors."""
    ttft: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []

    async def run_client(c: int) -> int:
        total, conn = 0, Connection(url)
        try:
            for i in range(requests):
                try:
                    total += await one_request(conn, PROMPTS[(c + i) % len(PROMPTS)], tokens, seed=c * 1000 + i,
                                               ttft=ttft, gaps=gaps)
                except Exception as exc:  # noqa: BLE001 — counted and reported
                    errors.append(str(exc)[:200])
                    conn.close()
                    conn = Connection(url)
        finally:
            conn.close()
        return total

    started = time.perf_counter()
    totals = await asyncio.gather(*(run_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": clients * requests, "tokens": sum(totals), "seconds": elapsed,
            "tokens_per_s": sum(totals) / elapsed, "ttft": ttft, "gaps": gaps, "errors": errors}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def compare_compile_decode(args: argparse.Namespace, run: Path) -> None:
    """Each level on a scripted and a ``--compile-decode`` server, alternating ``--rounds`` times."""
    servers = {}
    try:
        for name, compiled in (("scripted", False), ("compiled", True)):
            started = time.perf_counter()
            servers[name] = start_server(run, args.max_batch, args.threads, args.engine, compiled)
            print(f"{name} server ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            asyncio.run(level(servers[name][1], 2, 2, 8))  # warm-up
        rows = []
        for clients in [int(c) for c in args.levels.split(",")]:
            got: dict[str, list[dict]] = {"scripted": [], "compiled": []}
            for r in range(args.rounds):
                for name in (("scripted", "compiled") if r % 2 == 0 else ("compiled", "scripted")):
                    got[name].append(asyncio.run(level(servers[name][1], clients, args.requests, args.tokens)))
            ratios = [c["tokens_per_s"] / s["tokens_per_s"] for s, c in zip(got["scripted"], got["compiled"],
                                                                           strict=True)]
            rows.append((clients, got, ratios))
            print(f"{clients} clients: compiled / scripted {statistics.median(ratios):.2f}", file=sys.stderr,
                  flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nserver: {run} (max batch {args.max_batch}, {args.threads} PyTorch thread(s), engine {args.engine}); "
          f"{args.requests} requests per client, {args.tokens} tokens each, {args.rounds} alternations\n")
    print("| clients | scripted tokens/s | compiled tokens/s | compiled / scripted (rounds) | ITL p50 scripted → "
          "compiled | errors |")
    print("|---|---|---|---|---|---|")
    for clients, got, ratios in rows:
        med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in got.items()}
        itl = {k: statistics.median(pct(r["gaps"], 50) for r in v) * 1000 for k, v in got.items()}
        errors = sum(len(r["errors"]) for v in got.values() for r in v)
        print(f"| {clients} | {med['scripted']:,.0f} | {med['compiled']:,.0f} | **{statistics.median(ratios):.2f}** "
              f"({', '.join(f'{x:.2f}' for x in ratios)}) | {itl['scripted']:.2f} → {itl['compiled']:.2f} ms "
              f"| {errors} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "shakespeare-char")
    ap.add_argument("--train-time", default="60s", help="training budget when the run has to be made")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=8, help="requests per client per level")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--soak", type=int, default=2000, help="requests of the memory soak (16 clients; 0 = none)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="the server's PyTorch threads")
    ap.add_argument("--engine", default="process", choices=("process", "thread"),
                    help="glmlab serve --engine: the model in its own process (default) or the server's")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--compile-decode", default="off", choices=("off", "on", "both"),
                    help="glmlab serve --compile-decode: off (default), on, or both (two servers compared)")
    ap.add_argument("--rounds", type=int, default=3, help="--compile-decode both: alternations per level")
    args = ap.parse_args()

    run = default_run(args.run, args.train_time)
    if args.compile_decode == "both":
        compare_compile_decode(args, run)
        return
    proc, url = start_server(run, args.max_batch, args.threads, args.engine, args.compile_decode == "on")
    try:
        asyncio.run(level(url, 2, 2, 8))  # warm-up: first-call costs out of the way
        rows = []
        for clients in [int(c) for c in args.levels.split(",")]:
            before = rss_mb(proc.pid)
            result = asyncio.run(level(url, clients, args.requests, args.tokens))
            result.update(rss_before=before, rss_after=rss_mb(proc.pid))
            rows.append(result)
            print(f"{clients} clients: {result['tokens_per_s']:.0f} tokens/s, {len(result['errors'])} errors",
                  file=sys.stderr, flush=True)
        soak = None
        if args.soak:
            before = rss_mb(proc.pid)
            per_client = max(1, args.soak // 16)
            result = asyncio.run(level(url, 16, per_client, args.tokens))
            soak = {"requests": result["requests"], "errors": len(result["errors"]), "rss_before": before,
                    "rss_after": rss_mb(proc.pid), "tokens_per_s": result["tokens_per_s"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    base = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"\nserver: {run} (max batch {args.max_batch}, {args.threads} PyTorch thread(s), engine {args.engine}); "
          f"{args.requests} requests per client, {args.tokens} tokens each\n")
    print("| clients | requests | tokens | tokens/s | vs 1 client | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | errors "
          "| server RSS before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['tokens_per_s'] / base:.1f}×" if base else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | {speedup} "
              f"| {pct(r['ttft'], 50) * 1000:.0f} ms | {pct(r['ttft'], 99) * 1000:.0f} ms "
              f"| {pct(r['gaps'], 50) * 1000:.1f} ms | {pct(r['gaps'], 99) * 1000:.1f} ms | {len(r['errors'])} "
              f"| {r['rss_before']:.0f} → {r['rss_after']:.0f} MiB |")
    if soak:
        print(f"\nsoak: {soak['requests']:,} requests at 16 clients, {soak['errors']} errors, "
              f"{soak['tokens_per_s']:,.0f} tokens/s; server RSS {soak['rss_before']:.0f} → "
              f"{soak['rss_after']:.0f} MiB")
    errors = [e for r in rows for e in r["errors"]]
    if errors:
        print("\nfirst errors:", *errors[:5], sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps({"levels": [{k: v for k, v in r.items() if k not in ("ttft", "gaps")}
                                                    for r in rows], "soak": soak}, indent=2))


if __name__ == "__main__":
    main()
