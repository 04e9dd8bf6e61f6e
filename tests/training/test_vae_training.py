"""Training the sentence families end to end: the VAE's KL survives with annealing + word dropout,
its statistics are logged, and a resumed sentence-mode run continues exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.runs import load_run
from glmlab.training.trainer import train
from tests.conftest import metrics_records

TOPICS = {
    "sea": "ship sail wave boat harbor captain storm anchor",
    "farm": "cow field barn tractor wheat farmer hay goat",
    "city": "car street tower subway traffic office taxi bridge",
    "school": "teacher pupil lesson book exam desk chalk class",
}
VAE = ["model.family=vae", "model.n_embd=24", "model.n_hidden=48", "model.encoder_hidden=24", "model.latent_dim=4",
       "model.block_size=16", "model.dropout=0.0", "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=5",
       "train.eval_interval=50", "train.log_interval=10", "train.sample_tokens=0", "train.eval_tokens=0",
       "train.weight_decay=0", "train.threads=1"]


@pytest.fixture(scope="module")
def topic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentences whose words all come from one of four topics: knowing z (the topic) pays."""
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        words = TOPICS[rng.choice(list(TOPICS))].split()
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))))
    root = tmp_path_factory.mktemp("topics")
    (root / "train.txt").write_text("\n".join(lines[:360]) + "\n", encoding="utf-8")
    (root / "val.txt").write_text("\n".join(lines[360:]) + "\n", encoding="utf-8")
    prepare([root / "train.txt"], root / "data", tokenizer="word", val_file=root / "val.txt", split="1,0,0",
            sentences=True)
    return root / "data"




@pytest.mark.slow
def test_vae_with_annealing_and_word_dropout_keeps_its_kl(topic_data: Path, tmp_path: Path) -> None:
    config = resolve_config({}, [*VAE, "model.beta_schedule=linear", "model.anneal_steps=100",
                                 "model.word_dropout=0.4", "train.max_steps=200"])
    train(config, topic_data, tmp_path / "run", show_progress=False)
    logged = metrics_records(tmp_path / "run", "train")
    assert {"recon", "kl", "beta", "elbo"} <= set(logged[0])
    assert logged[0]["beta"] < 0.2 and logged[-1]["beta"] == pytest.approx(1.0)  # the warm-up ran
    assert all(r["elbo"] == pytest.approx(-(r["recon"] + r["kl"]), rel=1e-6) for r in logged)
    val = metrics_records(tmp_path / "run", "val")[-1]
    # not collapsed (the topic is worth at most log 4 = 1.39 nats; this run measured KL 0.25, MI 0.17, AU 4)
    assert val["kl"] > 0.1 and val["active_units"] >= 1 and val["mutual_info"] > 0.05
    run = load_run(tmp_path / "run")
    assert run.model.config.family == "vae" and run.model.latent_dim == 4


def test_sentence_mode_run_resumes_exactly(topic_data: Path, tmp_path: Path) -> None:
    """20 steps + 20 resumed steps = 40 steps in one go (sampler position, beta schedule, RNG)."""
    base = [*VAE, "model.beta_schedule=cyclical", "model.anneal_steps=16", "model.word_dropout=0.2",
            "train.eval_interval=20", "train.checkpoint_interval=20",
            "train.lr_schedule=constant"]  # the lr at step 10 must not depend on max_steps 20 or 40
    train(resolve_config({}, [*base, "train.max_steps=40"]), topic_data, tmp_path / "whole", show_progress=False)
    train(resolve_config({}, [*base, "train.max_steps=20"]), topic_data, tmp_path / "split", show_progress=False)
    train(resolve_config({}, [*base, "train.max_steps=40"]), topic_data, tmp_path / "split", resume=True,
          show_progress=False)
    whole = {k: v for k, v in load_run(tmp_path / "whole", checkpoint="last").model.state_dict().items()}
    split = load_run(tmp_path / "split", checkpoint="last").model.state_dict()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    keys = ("loss", "recon", "kl", "beta")
    last = [{k: r[k] for k in keys} for r in metrics_records(tmp_path / "whole", "train") if r["step"] > 20]
    assert last == [{k: r[k] for k in keys} for r in metrics_records(tmp_path / "split", "train") if r["step"] > 20]


def test_lstm_trains_on_windows_or_sentences_and_vae_refuses_windows(topic_data: Path, tmp_path: Path) -> None:
    lstm = ["model.family=lstm", "model.n_embd=16", "model.n_hidden=32", "model.block_size=16", "train.max_steps=200",
            "train.lr=1e-2", "train.warmup_steps=5", "train.batch_size=8",
            "train.eval_interval=200", "train.sample_tokens=0", "train.threads=1"]
    windows = train(resolve_config({}, lstm), topic_data, tmp_path / "w", show_progress=False)
    sentences = train(resolve_config({}, [*lstm, "train.batching=sentences"]), topic_data, tmp_path / "s",
                      show_progress=False)
    assert windows.last_val_loss < 3.4 and sentences.last_val_loss < 3.4  # log(vocab ~50) = 3.9 at random
    run = load_run(tmp_path / "s")  # trained on <bos>-started sentences, so prompted from <bos>
    assert run.model.traits.sentence_level and not load_run(tmp_path / "w").model.traits.sentence_level
    completion = run.complete("", max_new_tokens=3, temperature=0)[0][0]
    assert completion.prompt_tokens == 1
    from glmlab.errors import GlmlabError

    with pytest.raises(GlmlabError, match="whole sentences"):
        train(resolve_config({}, [*VAE, "train.batching=windows"]), topic_data, tmp_path / "v", show_progress=False)


def test_aggressive_training_updates_encoder_then_decoder_only(topic_data: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    """He et al.: inner steps move only q(z|x); the step after them moves only the decoder side."""
    from glmlab.training.tasks import LanguageModelingTask
    from glmlab.training.trainer import Trainer

    config = resolve_config({}, [*VAE, "model.aggressive=true", "model.aggressive_inner_steps=12", "train.max_steps=5"])
    with Trainer(config, LanguageModelingTask(topic_data), tmp_path / "run", show_progress=False) as trainer:
        model, (hook,), mle = trainer.model, trainer.hooks, trainer.phases[0]
        encoder = {id(p) for p in model.encoder_parameters()}

        def snapshot() -> dict[str, torch.Tensor]:
            return {n: p.detach().clone() for n, p in model.named_parameters()}

        def moved(before: dict[str, torch.Tensor]) -> tuple[set[bool], set[bool]]:
            changes = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
            enc = {changes[n] for n, p in model.named_parameters() if id(p) in encoder}
            dec = {changes[n] for n, p in model.named_parameters() if id(p) not in encoder}
            return enc, dec

        before = snapshot()
        hook.before_step(mle)  # the trainer's step is the hook's context: its batches, loss and optimiser
        assert moved(before) == ({True}, {False})
        assert mle.step_tokens > 0  # the inner steps read fresh batches, counted in the step's tokens
        before = snapshot()
        with monkeypatch.context() as patch:
            patch.setattr(hook, "before_step", lambda context: None)  # isolate the outer step of an aggressive step
            mle.step(trainer.state)
        enc, dec = moved(before)
        assert enc == {False} and True in dec
        result = trainer.run()
    assert result.step == 5
