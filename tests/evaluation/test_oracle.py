"""The SeqGAN oracle: its NLL of its own samples is SeqGAN's ~5.75, and it is the README's equations exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from glmlab.errors import DataError
from glmlab.evaluation.oracle import Oracle, read_sequences

pytestmark = pytest.mark.usefixtures("one_thread")

ORACLE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "seqgan-oracle"
PARAMS, REAL = ORACLE_DIR / "oracle_params.npz", ORACLE_DIR / "real_data.txt"
needs_data = pytest.mark.skipif(not PARAMS.is_file() or not REAL.is_file(),
                                reason=f"the SeqGAN oracle files are not in {ORACLE_DIR} (../shared/data)")


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(PARAMS)




@needs_data
def test_nll_of_its_own_samples_is_seqgans_and_of_noise_far_higher(oracle: Oracle):
    own = oracle.sample(500, generator=torch.Generator().manual_seed(0))
    assert own.shape == (500, 20) and own.dtype == torch.long
    assert oracle.nll(own) == pytest.approx(5.75, abs=0.15)
    noise = torch.randint(0, 5000, (200, 20), generator=torch.Generator().manual_seed(0))
    assert oracle.nll(noise) > 10
    assert oracle.nll(own[:50], batch_size=16) == pytest.approx(oracle.nll(own[:50]), rel=1e-6)  # batching is invisible


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@needs_data
def test_nll_is_the_readme_equations(oracle: Oracle):
    """One step: i, f, o gates, candidate, c' = f c + i c~, h' = o tanh(c'), logits = h' Wo + bo; start token 0."""
    p = {k: v.astype(np.float64) for k, v in np.load(PARAMS).items()}
    sequences = read_sequences(REAL)[:3]
    total = 0.0
    for seq in sequences.tolist():
        h, c, previous = np.zeros(32), np.zeros(32), 0
        for token in seq:
            x = p["g_embeddings"][previous]
            i = _sigmoid(x @ p["Wi"] + h @ p["Ui"] + p["bi"])
            f = _sigmoid(x @ p["Wf"] + h @ p["Uf"] + p["bf"])
            o = _sigmoid(x @ p["Wog"] + h @ p["Uog"] + p["bog"])
            candidate = np.tanh(x @ p["Wc"] + h @ p["Uc"] + p["bc"])
            c = f * c + i * candidate
            h = o * np.tanh(c)
            logits = h @ p["Wo"] + p["bo"]
            top = logits.max()
            total += top + np.log(np.exp(logits - top).sum()) - logits[token]
            previous = token
    assert oracle.nll(sequences) == pytest.approx(total / 60, abs=1e-4)
    assert (oracle.vocab_size, oracle.hidden) == (5000, 32)


@needs_data
def test_sampling_is_reproducible_with_a_seed(oracle: Oracle):
    a = oracle.sample(40, 12, generator=torch.Generator().manual_seed(3), batch_size=16)
    b = oracle.sample(40, 12, generator=torch.Generator().manual_seed(3), batch_size=16)
    c = oracle.sample(40, 12, generator=torch.Generator().manual_seed(4), batch_size=16)
    assert a.shape == (40, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= int(a.min()) and int(a.max()) < 5000


@needs_data
def test_read_sequences_reads_the_real_data():
    real = read_sequences(REAL)
    assert real.shape == (9984, 20) and real.dtype == torch.long
    assert 0 <= int(real.min()) and int(real.max()) < 5000


def test_missing_or_malformed_files_are_clear_data_errors(tmp_path: Path):
    with pytest.raises(DataError, match="do not exist"):
        Oracle(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="does not exist"):
        read_sequences(tmp_path / "nope.txt")
    bad = tmp_path / "ragged.txt"
    bad.write_text("1 2 3\n4 5\n", encoding="utf-8")
    with pytest.raises(DataError, match="equal-length integer"):
        read_sequences(bad)
    bad.write_text("1 2 x\n", encoding="utf-8")
    with pytest.raises(DataError, match="equal-length integer"):
        read_sequences(bad)
    good = tmp_path / "good.txt"
    good.write_text("1 2 3\n\n4 5 6\n", encoding="utf-8")
    assert read_sequences(good).tolist() == [[1, 2, 3], [4, 5, 6]]
