"""What checking weights costs on load: a GPT-2-small-sized ``gpt`` (124M parameters, a 498 MB safetensors
file) written with its checksum, then loaded into the model with and without the check, alternately; the
median of each and the check's share. The file sits in the page cache after the first read, as on a machine
that loads the same run again (a cold read adds the disk's time to both, not to the check).

    python benchmarks/weights_checksum.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glmlab.models.gpt import GPT, GPTConfig
from glmlab.runs import file_sha256, load_weights, save_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_weights(model, path)
        size = path.stat().st_size
        timings: dict[str, list[float]] = {"load, checked": [], "load, unchecked": [], "sha256 alone": []}
        for _ in range(args.rounds):
            for name, fn in (("load, checked", lambda: load_weights(model, path)),
                             ("load, unchecked", lambda: load_weights(model, path, verify=False)),
                             ("sha256 alone", lambda: file_sha256(path))):
                started = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - started)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {size / 1e6:.0f} MB, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}")
    medians = {name: statistics.median(t) for name, t in timings.items()}
    for name, value in medians.items():
        print(f"  {name:<16} {value * 1000:8.0f} ms   ({size / value / 1e9:.2f} GB/s)")
    checked, unchecked = medians["load, checked"], medians["load, unchecked"]
    print(f"the check adds {(checked - unchecked) * 1000:.0f} ms per load ({checked / unchecked:.2f}x the unchecked "
          "load)")


if __name__ == "__main__":
    main()
