"""`glmlab bench oracle` end to end at toy size, and its user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glmlab.cli import main
from glmlab.runs import read_metrics

ORACLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "seqgan-oracle"
pytestmark = [pytest.mark.skipif(not (ORACLE / "oracle_params.npz").is_file(), reason="../shared/data not present"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.slow
def test_bench_oracle_runs_mle_then_variants_and_reuses_finished_stages(tmp_path: Path, capsys) -> None:
    args = ["bench", "oracle", "--out", str(tmp_path / "b"), "--oracle", str(ORACLE / "oracle_params.npz"),
            "--real", str(ORACLE / "real_data.txt"), "--mle-steps", "20", "--rounds", "1", "--oracle-samples", "200",
            "--variants", "seqgan,seqgan-baseline", "model.d_samples=64", "model.d_pretrain_steps=1",
            "model.rollout_num=2"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| MLE |" in table and "| seqgan |" in table and "| seqgan-baseline |" in table
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["name"] for r in results] == ["MLE", "seqgan", "seqgan-baseline"]
    assert all(8.0 < r["nll_oracle"] < 11.3 and 0 < r["nll_test"] < 8.6 for r in results)  # uniform: 11.4 and 8.5
    mle_weights = (tmp_path / "b" / "mle" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # finished stages are reused, not retrained
    assert (tmp_path / "b" / "mle" / "model.safetensors").stat().st_mtime_ns == mle_weights
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == results
    assert main([*args, "--temperatures", "0.8"]) == 0  # every run's curve, scored once and cached
    names = [r["name"] for r in json.loads((tmp_path / "b" / "results.json").read_text())]
    assert names[3:] == ["MLE at temperature 0.8", "seqgan at temperature 0.8", "seqgan-baseline at temperature 0.8"]
    assert (tmp_path / "b" / "seqgan" / "temperature-0.8.json").is_file()
    curve = {r["name"]: r for r in json.loads((tmp_path / "b" / "results.json").read_text())}
    own = curve["seqgan-baseline at temperature 0.8"]
    assert own["nll_oracle"] != curve["MLE at temperature 0.8"]["nll_oracle"]
    # a cache scored for other weights (here the MLE run's, as a copied run would carry) is not trusted
    shutil.copy(tmp_path / "b" / "mle" / "temperature-0.8.json", tmp_path / "b" / "seqgan-baseline")
    assert main([*args, "--temperatures", "0.8"]) == 0
    again = {r["name"]: r for r in json.loads((tmp_path / "b" / "results.json").read_text())}
    assert again["seqgan-baseline at temperature 0.8"]["nll_oracle"] == own["nll_oracle"]


def test_bench_oracle_errors(tmp_path: Path, capsys) -> None:
    assert main(["bench", "oracle", "--out", str(tmp_path), "--oracle", str(tmp_path / "missing.npz")]) == 1
    assert "missing.npz does not exist" in capsys.readouterr().err
    assert main(["bench", "oracle", "--out", str(tmp_path), "--oracle", str(ORACLE / "oracle_params.npz"),
                 "--real", str(ORACLE / "real_data.txt"), "--variants", "leakgan"]) == 1
    assert "unknown variant(s) leakgan" in capsys.readouterr().err


def test_bench_oracle_refuses_overrides_that_change_the_mle_model(tmp_path: Path, capsys) -> None:
    args = ["bench", "oracle", "--out", str(tmp_path / "b"), "--oracle", str(ORACLE / "oracle_params.npz"),
            "--real", str(ORACLE / "real_data.txt"), "--mle-steps", "2", "--rounds", "1", "--oracle-samples", "50",
            "--variants", "seqgan", "model.n_hidden=64"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "model.n_hidden would change the model trained by MLE" in err and "fix:" in err


@pytest.mark.slow
def test_mle_steps_best_trains_mle_for_the_step_count_with_the_lowest_validation_nll(
        tmp_path: Path, capsys, monkeypatch) -> None:
    from glmlab.bench import oracle as oracle_benchmark

    monkeypatch.setattr(oracle_benchmark, "SEARCH_INTERVAL", 4)
    monkeypatch.setattr(oracle_benchmark, "SEARCH_PATIENCE", 2)
    monkeypatch.setattr(oracle_benchmark, "SEARCH_MAX_STEPS", 24)
    out = tmp_path / "b"
    args = ["bench", "oracle", "--out", str(out), "--oracle", str(ORACLE / "oracle_params.npz"),
            "--real", str(ORACLE / "real_data.txt"), "--mle-steps", "best", "--rounds", "1", "--oracle-samples", "100",
            "--variants", "seqgan", "model.d_samples=32", "model.d_pretrain_steps=1", "model.rollout_num=2",
            "--seed", "5"]
    assert main(args) == 0
    search = json.loads((out / "mle-search" / "done.json").read_text())
    curve = [(r["step"], r["loss"]) for r in read_metrics(out / "mle-search" / "metrics.jsonl") if r["split"] == "val"]
    for run in ("mle-search", "mle", "seqgan"):  # --seed seeds every stage's training
        assert json.loads((out / run / "config.json").read_text())["train"]["seed"] == 5
    assert [step for step, _ in curve] == list(range(4, 4 * len(curve) + 1, 4))  # every SEARCH_INTERVAL steps
    assert search["best_step"] == min(curve, key=lambda c: c[1])[0]
    mle = json.loads((out / "mle" / "config.json").read_text())["train"]
    assert mle["max_steps"] == search["best_step"] and mle["patience"] == 0  # retrained to the best step, plainly
    assert f"validation NLL lowest at step {search['best_step']}" in capsys.readouterr().out
    # the finished MLE stage is not silently reused for another step count
    other = 100 + search["best_step"]
    assert main([*args[:9], str(other), *args[10:]]) == 1
    err = capsys.readouterr().err
    assert f"was trained with train.max_steps={search['best_step']}, not the {other} asked for" in err
    assert f"--mle-steps {search['best_step']}" in err
    assert main([*args[:-1], "6"]) == 1  # nor for another seed
    assert "mle-search was trained with train.seed=5, not the 6 asked for" in capsys.readouterr().err
    assert main([*args[:9], str(search["best_step"]), *args[10:-1], "6"]) == 1
    err = capsys.readouterr().err
    assert "mle was trained with train.seed=5, not the 6 asked for" in err and "--seed 5 to reuse it" in err


def test_mle_steps_must_be_a_positive_count_or_best(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "oracle", "--out", str(tmp_path), "--mle-steps", "early"])
    assert "'early' is neither a positive number of steps nor 'best'" in capsys.readouterr().err
