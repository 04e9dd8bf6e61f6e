"""`glmlab bench oracle`: SeqGAN's synthetic-data experiment, MLE then adversarial training, scored by the oracle.

1. Data: the oracle's ``real_data.txt`` (9,984 sequences of 20 ids) is the training set; 1,000 and
   2,000 fresh oracle samples (seeded) are the validation and test sets. Token ids become words of
   a word-level vocabulary (so the standard pipeline trains on them).
2. MLE: a `seqgan` run with no adversarial rounds (the generator alone, trained like an `lstm`), for the
   CPU preset's 3,000 steps (which reproduce the SeqGAN authors' MLE figure and overfit the 9,984
   sequences) or, with ``mle_steps="best"``, for the number of steps at which the validation NLL is
   lowest: early stopping, found by a first run evaluated every 100 steps (``mle-search``).
3. Adversarial: the same run resumed with ``model.adv_rounds`` > 0 — once per variant (SeqGAN as
   published, and any improvement), each from a copy of the MLE run.
4. Scores after each stage: **NLL-oracle** (the oracle's mean per-token NLL of 10,000 generated
   sequences: sample quality) and **NLL-test** (the generator's per-token NLL of held-out oracle
   samples, the 20 tokens without ``<eos>``: coverage; it rises when the generator drops modes).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmlab import atomic
from glmlab.bench.preset import CPU_MLE_STEPS, CPU_ROUNDS, DEFAULT_VARIANTS, VARIANTS
from glmlab.config import RunConfig, resolve_config
from glmlab.data.dataset import IGNORE_INDEX, open_data_dir
from glmlab.data.prepare import prepare
from glmlab.data.sentences import find_sentences, sentence_batches
from glmlab.errors import GlmlabError
from glmlab.evaluation.oracle import Oracle
from glmlab.models.lstm import token_nll
from glmlab.runs import METRICS, file_sha256, load_run, read_metrics, read_run_config, weights_path
from glmlab.training.adversarial import sample_sequences
from glmlab.training.trainer import config_changes, train

SEQUENCE_LENGTH = 20
MLE = ["model.family=seqgan", f"model.block_size={SEQUENCE_LENGTH + 2}", "train.batch_size=64", "train.lr=1e-2",
       "train.warmup_steps=0", "train.lr_schedule=constant", "train.weight_decay=0", "train.grad_clip=5.0",
       "train.beta2=0.999", "train.sample_tokens=0", "train.eval_interval=500", "train.eval_tokens=0"]


# The CPU preset (2 cores, about 30 minutes in all): SeqGAN's generator, MLE and rollout settings; a
# discriminator with a quarter of SeqGAN's filters refitted once per round on 1,000 + 1,000 sequences,
# where SeqGAN refits 5 times x 3 epochs on 10,000 + 10,000 (the cost that does not fit a CPU). Measured:
# 2,000 + 2,000 makes the discriminator win outright (accuracy ~1, rewards ~0.005) and SeqGAN stalls at
# NLL-oracle 8.78; 500 + 500 is unstable; 1,000 + 1,000 keeps rewards informative and descends steadily.
# mle_steps="best": a first MLE run scored on the validation samples every SEARCH_INTERVAL steps, stopped
# after SEARCH_PATIENCE evaluations without a new best; the MLE stage then trains for the best step count.
SEARCH_INTERVAL = 100
SEARCH_PATIENCE = 5
SEARCH_MAX_STEPS = 20000
CPU_DISCRIMINATOR = ["model.d_num_filters=25,50,50,50,50,25,25,25,25,25,40,40"]
CPU_ADVERSARIAL = ["model.d_samples=1000", "model.d_steps=1", "model.d_epochs=1", "model.d_pretrain_steps=5",
                   "model.rollout_num=16", "model.adv_eval_interval=20"]
@dataclass
class Stage:
    name: str
    nll_oracle: float
    nll_test: float
    seconds: float  # training time of this stage (MLE, or the adversarial rounds alone)
    extra: dict = field(default_factory=dict)


def write_ids(path: Path, sequences: torch.Tensor) -> None:
    atomic.write_text(path, "\n".join(" ".join(map(str, row.tolist())) for row in sequences) + "\n")


def prepare_oracle_data(oracle: Oracle, real_data: Path, out: Path, seed: int = 0) -> Path:
    """The data directory (train = real_data, val/test = fresh oracle samples) under ``out``."""
    data = out / "data"
    if (data / "meta.json").is_file():
        return data
    out.mkdir(parents=True, exist_ok=True)
    fresh = oracle.sample(3000, SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(seed))
    write_ids(out / "val.txt", fresh[:1000])
    write_ids(out / "test.txt", fresh[1000:])
    prepare([real_data], data, tokenizer="word", split="1,0,0", val_file=out / "val.txt",
            test_file=out / "test.txt", sentences=True)
    return data


@torch.no_grad()
def score(run_dir: Path, data_dir: Path, oracle: Oracle, samples: int = 10000, seed: int = 1,
          temperature: float = 1.0) -> tuple[float, float]:
    """(NLL-oracle of ``samples`` generated sequences, NLL-test of the generator) for a run's last weights,
    the generator's distribution taken at ``temperature`` for both."""
    run = load_run(run_dir, checkpoint="last")
    model, tok = run.model, run.tokenizer
    specials = [i for i in (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) if i is not None]
    generated = sample_sequences(model.net, samples, SEQUENCE_LENGTH, tok.bos_id,
                                 generator=torch.Generator().manual_seed(seed), banned=specials,
                                 temperature=temperature)
    words = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    ids = torch.tensor([[int(words[t]) for t in row] for row in generated.tolist()])
    nll_oracle = oracle.nll(ids)
    sentences = find_sentences(open_data_dir(data_dir).tokens("test"), tok.eos_id, model.block_size)
    total, count = 0.0, 0
    for x, y in sentence_batches(sentences, 500, tok.bos_id, tok.pad_id):
        y = y.masked_fill(y == tok.eos_id, IGNORE_INDEX)  # the 20 tokens, as the literature scores them
        total += float(token_nll(model(x) / temperature, y).sum())
        count += int((y != IGNORE_INDEX).sum())
    return nll_oracle, total / count


def best_mle_steps(data: Path, out: Path, overrides: list[str], log=print) -> int:
    """Early stopping: the MLE step count with the lowest validation NLL (the 1,000 fresh oracle samples of
    ``val.txt``, never the test samples), from a run in ``out/mle-search`` evaluated every
    ``SEARCH_INTERVAL`` steps until ``SEARCH_PATIENCE`` evaluations bring no new best. Cached there."""
    search = out / "mle-search"
    config = resolve_config({}, [*overrides, f"train.max_steps={SEARCH_MAX_STEPS}",
                                 f"train.eval_interval={SEARCH_INTERVAL}", f"train.patience={SEARCH_PATIENCE}"])
    if (search / "done.json").is_file():
        refuse_another_run(search, config, ["seed"])
    else:
        shutil.rmtree(search, ignore_errors=True)
        train(config, data, search, show_progress=False)
        best = min((r for r in read_metrics(search / METRICS) if r.get("split") == "val"), key=lambda r: r["loss"])
        atomic.write_json(search / "done.json", {"best_step": best["step"], "best_val_loss": best["loss"]})
    done = json.loads((search / "done.json").read_text())
    log(f"MLE early stopping: validation NLL lowest at step {done['best_step']} ({done['best_val_loss']:.3f}; "
        f"evaluated every {SEARCH_INTERVAL} steps)")
    return int(done["best_step"])


def refuse_another_run(run_dir: Path, asked: RunConfig, keys: list[str]) -> None:
    """A finished stage in --out is reused only for the run asked for: its ``train`` ``keys`` must match."""
    trained, wanted = dataclasses.asdict(read_run_config(run_dir)[0].train), dataclasses.asdict(asked.train)
    for key in keys:
        have, want = trained[key], wanted[key]
        if have != want:
            flag = {"max_steps": "--mle-steps", "seed": "--seed"}[key]
            raise GlmlabError(f"{run_dir} was trained with train.{key}={have}, not the {want} asked for",
                              f"use another --out, or {flag} {have} to reuse it")


def run_oracle_benchmark(oracle_path: Path, real_data: Path, out: Path, mle_steps: int | str, adv_rounds: int,
                         variants: dict[str, list[str]], mle_overrides: list[str] | None = None,
                         threads: int = 0, oracle_samples: int = 10000, log=print) -> list[Stage]:
    """MLE once (``mle_steps`` steps, or "best": early stopping on the validation samples), then each
    adversarial variant from a copy of it; returns the scored stages."""
    oracle = Oracle(oracle_path)
    data = prepare_oracle_data(oracle, real_data, out)
    mle_dir = out / "mle"
    common = [*MLE, *(mle_overrides or []), f"train.threads={threads}"]
    if mle_steps == "best":
        mle_steps = best_mle_steps(data, out, common, log)
    base = [*common, f"train.max_steps={mle_steps}"]
    mle_config = resolve_config({}, base)
    for overrides in variants.values():  # before any training: a variant must continue the MLE model as is
        changed = config_changes(mle_config, resolve_config({}, [*base, *overrides]))
        if changed:
            raise GlmlabError(f"{', '.join(changed)} would change the model trained by MLE in {mle_dir}",
                              "override only adversarial keys (model.adv_*, d_steps, d_epochs, d_samples, "
                              "rollout_*, g_steps, g_lr, d_lr, baseline), or use another --out")
    stages = []
    if (mle_dir / "done.json").is_file():
        refuse_another_run(mle_dir, mle_config, ["max_steps", "seed"])
    else:
        shutil.rmtree(mle_dir, ignore_errors=True)
        result = train(mle_config, data, mle_dir, show_progress=False)
        nll_oracle, nll_test = score(mle_dir, data, oracle, oracle_samples)
        atomic.write_json(mle_dir / "done.json", {"nll_oracle": nll_oracle, "nll_test": nll_test,
                                                  "seconds": result.elapsed})
    done = json.loads((mle_dir / "done.json").read_text())
    stages.append(Stage("MLE", done["nll_oracle"], done["nll_test"], done["seconds"]))
    log(f"MLE ({mle_steps} steps): NLL-oracle {done['nll_oracle']:.3f}, NLL-test {done['nll_test']:.3f}, "
        f"{done['seconds']:.0f}s")
    for name, overrides in variants.items():
        run_dir = out / name
        if not (run_dir / "done.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(mle_dir, run_dir, ignore=shutil.ignore_patterns("done.json", ".lock", "temperature-*.json"))
            config = resolve_config({}, [*base, f"model.adv_rounds={adv_rounds}", *overrides])
            started = time.perf_counter()
            train(config, data, run_dir, resume=True, show_progress=False)
            seconds = time.perf_counter() - started
            nll_oracle, nll_test = score(run_dir, data, oracle, oracle_samples)
            atomic.write_json(run_dir / "done.json", {"nll_oracle": nll_oracle, "nll_test": nll_test,
                                                      "seconds": seconds})
        done = json.loads((run_dir / "done.json").read_text())
        stages.append(Stage(name, done["nll_oracle"], done["nll_test"], done["seconds"]))
        log(f"{name} ({adv_rounds} rounds): NLL-oracle {done['nll_oracle']:.3f}, NLL-test {done['nll_test']:.3f}, "
            f"{done['seconds']:.0f}s")
    return stages


def oracle_benchmark(oracle_path: str | Path, real_data: str | Path, out: str | Path,
                     mle_steps: int | str | None = None,
                     rounds: int | None = None, variants: list[str] | None = None, overrides: list[str] | None = None,
                     threads: int = 0, oracle_samples: int = 10000, temperatures: list[float] | None = None,
                     seed: int | None = None, log=print) -> list[Stage]:
    """`glmlab bench oracle` with the CPU preset, ``overrides`` applied to the adversarial stages, ``seed`` (if
    given) the training seed of every stage; writes ``results.json`` in ``out``."""
    oracle_path, real_data, out = Path(oracle_path), Path(real_data), Path(out)
    for path, what in ((oracle_path, "--oracle"), (real_data, "--real")):
        if not path.is_file():
            raise GlmlabError(f"{path} does not exist", f"pass {what} (the files are in ../shared/data/seqgan-oracle)")
    variants = list(variants or DEFAULT_VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise GlmlabError(f"unknown variant(s) {', '.join(unknown)}", f"use: {', '.join(VARIANTS)}")
    if out.exists() and not out.is_dir():
        raise GlmlabError(f"--out {out} is a file", "choose a directory")
    chosen = {v: [*CPU_ADVERSARIAL, *VARIANTS[v].overrides, *(overrides or [])] for v in variants}
    seeded = [f"train.seed={seed}"] if seed is not None else []
    stages = run_oracle_benchmark(oracle_path, real_data, out, mle_steps or CPU_MLE_STEPS, rounds or CPU_ROUNDS,
                                  chosen, mle_overrides=[*CPU_DISCRIMINATOR, *seeded], threads=threads,
                                  oracle_samples=oracle_samples, log=log)
    if temperatures:
        stages += temperature_stages(oracle_path, out, temperatures, oracle_samples, log, runs=["mle", *chosen])
    atomic.write_json(out / "results.json", [s.__dict__ for s in stages])
    return stages


def weights_fingerprint(run_dir: Path) -> str:
    """A digest of the weights :func:`score` reads (the run's last), which a cached score must match: a
    run copied from another (each variant starts as a copy of the MLE run) must not inherit its scores."""
    return file_sha256(weights_path(run_dir, "last"))[:16]


def temperature_stages(oracle_path: Path, out: Path, temperatures: list[float], samples: int = 10000,
                       log=print, runs: list[str] | None = None) -> list[Stage]:
    """Each finished run in ``out`` (``mle`` and the variants) sampled, and scored on held-out data, at each
    temperature: a run's quality-diversity curve. The MLE generator's is the sharpening-only frontier an
    adversarial variant should beat at equal NLL-test; two variants compare by their curves, not by
    one point each (Caccia et al. 2020)."""
    oracle, stages = Oracle(oracle_path), []
    for run in runs or ["mle"]:
        name = "MLE" if run == "mle" else run
        weights = weights_fingerprint(out / run)
        for t in temperatures:
            cached = out / run / f"temperature-{t:g}.json"
            done = json.loads(cached.read_text()) if cached.is_file() else {}
            if done.get("weights") != weights:  # none yet, or scored for other weights (a copied run's)
                nll_oracle, nll_test = score(out / run, out / "data", oracle, samples, temperature=t)
                done = {"nll_oracle": nll_oracle, "nll_test": nll_test, "weights": weights}
                atomic.write_json(cached, done)
            stages.append(Stage(f"{name} at temperature {t:g}", done["nll_oracle"], done["nll_test"], 0.0,
                                {"temperature": t}))
            log(f"{name} at temperature {t:g}: NLL-oracle {done['nll_oracle']:.3f}, NLL-test {done['nll_test']:.3f}")
    return stages


def format_stages(stages: list[Stage]) -> str:
    """The results as a Markdown table (anchors: SeqGAN's log MLE ~9.07 -> SeqGAN ~8.68; LeakGAN ~7.0)."""
    lines = ["| stage | NLL-oracle | NLL-test | training time |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.nll_oracle:.3f} | {s.nll_test:.3f} | {s.seconds / 60:.1f} min |" for s in stages]
    return "\n".join(lines)
