"""The SeqGAN synthetic-data oracle: a fixed random LSTM whose likelihood of any sequence is known exactly.

Its parameters are ``../shared/data/seqgan-oracle/oracle_params.npz`` (see that folder's README):
vocabulary 5,000, embedding and hidden size 32, sequences of 20 tokens, start token 0, one step

    i = σ(x Wi + h Ui + bi), f = σ(x Wf + h Uf + bf), o = σ(x Wog + h Uog + bog),
    c̃ = tanh(x Wc + h Uc + bc), c' = f·c + i·c̃, h' = o·tanh(c'), logits = h' Wo + bo.

**NLL-oracle** of generated sequences is the oracle's mean per-token NLL of them (teacher-forced from
token 0, all 20 positions), in nats: how plausible a generator's samples are under the true model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glmlab.errors import DataError

GATES = (("Wi", "Ui", "bi"), ("Wf", "Uf", "bf"), ("Wog", "Uog", "bog"), ("Wc", "Uc", "bc"))


class Oracle:
    """The oracle LSTM (fp32 on CPU unless moved): ``sample`` sequences and score their ``nll``."""

    start_token = 0

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"oracle parameters {path} do not exist",
                            "point to ../shared/data/seqgan-oracle/oracle_params.npz")
        arrays = np.load(path)
        t = {k: torch.from_numpy(arrays[k]).float().to(device) for k in arrays.files}
        self.embedding = t["g_embeddings"]
        self.W = torch.cat([t[w] for w, _, _ in GATES], dim=1)  # (32, 128): i, f, o, c̃
        self.U = torch.cat([t[u] for _, u, _ in GATES], dim=1)
        self.b = torch.cat([t[b] for _, _, b in GATES])
        self.Wo, self.bo = t["Wo"], t["bo"]
        self.vocab_size, self.hidden = self.Wo.size(1), self.U.size(0)
        self.device = torch.device(device)

    def _step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gates = x @ self.W + h @ self.U + self.b
        i, f, o, candidate = gates.split(self.hidden, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(candidate)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h @ self.Wo + self.bo, h, c

    @torch.no_grad()
    def sample(self, n: int, length: int = 20, generator: torch.Generator | None = None,
               batch_size: int = 1000) -> torch.Tensor:
        """``n`` sequences (n, length) drawn from the oracle."""
        out = []
        for begin in range(0, n, batch_size):
            b = min(batch_size, n - begin)
            h = c = torch.zeros(b, self.hidden, device=self.device)
            token = torch.full((b,), self.start_token, dtype=torch.long, device=self.device)
            seq = []
            for _ in range(length):
                logits, h, c = self._step(self.embedding[token], h, c)
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
                seq.append(token)
            out.append(torch.stack(seq, dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def nll(self, sequences: torch.Tensor, batch_size: int = 1000) -> float:
        """Mean per-token NLL (nats) of ``sequences`` (n, length) under the oracle: NLL-oracle."""
        sequences = sequences.to(self.device)
        total = 0.0
        for begin in range(0, sequences.size(0), batch_size):
            seq = sequences[begin:begin + batch_size]
            b = seq.size(0)
            h = c = torch.zeros(b, self.hidden, device=self.device)
            previous = torch.full((b,), self.start_token, dtype=torch.long, device=self.device)
            for t in range(seq.size(1)):
                logits, h, c = self._step(self.embedding[previous], h, c)
                total += float(F.cross_entropy(logits, seq[:, t], reduction="sum"))
                previous = seq[:, t]
        return total / sequences.numel()


def read_sequences(path: str | Path) -> torch.Tensor:
    """Space-separated token ids, one sequence per line (the oracle's ``real_data.txt`` format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sequence file {path} does not exist", "check the path")
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return torch.tensor([[int(t) for t in row] for row in rows], dtype=torch.long)
    except ValueError:
        raise DataError(f"{path} is not lines of equal-length integer token ids", "use the oracle's format") from None
