"""Preference tuning: the losses against trl's DPOTrainer on given log-probabilities, and `glmlab finetune dpo` end
to end on a task a tiny model learns in seconds (preferring the answer that repeats the asked word)."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from glmlab.cli import main
from glmlab.errors import GlmlabError
from glmlab.finetune.preferences import (
    ReferenceCache,
    chosen_nll,
    preference_loss,
    read_preferences,
    sequence_logps,
)
from glmlab.finetune.report import write_report
from glmlab.finetune.run import finetune
from glmlab.finetune.tasks import FinetuneOptions
from tests.conftest import metrics_records
from tests.finetune.conftest import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")


def trl_loss(loss_type: str, beta: float, eps: float, policy: torch.Tensor, ref: torch.Tensor,
             mask: torch.Tensor, sft_weight: float = 0.0) -> tuple[float, dict[str, float]]:
    """trl's own DPOTrainer._compute_loss on a batch whose per-token log-probabilities are given: a stand-in model
    returns them (zero outside the completion, as its fused LM head does with -100 labels)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    loss_types, loss_weights = ([loss_type, "sft"], [1.0, sft_weight]) if sft_weight else ([loss_type], [1.0])

    metrics: defaultdict = defaultdict(lambda: defaultdict(list))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    per_token = policy * mask[:, 1:]

    def model(**kwargs):
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())

    model.training = True
    trainer = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
                              loss_weights=loss_weights, beta=beta, label_smoothing=eps, use_weighting=False,
                              _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    chosen_ref, rejected_ref = ref.chunk(2)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": chosen_ref, "ref_rejected_logps": rejected_ref}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize(("loss_type", "beta", "eps", "alpha"),
                         [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 0.0), ("ipo", 0.1, 0.0, 0.0),
                          ("ipo", 0.5, 0.0, 0.0), ("robust", 0.1, 0.1, 0.0), ("robust", 0.3, 0.25, 0.0),
                          ("sigmoid", 0.1, 0.0, 1.0), ("robust", 0.5, 0.1, 0.3)])
def test_losses_and_rewards_equal_trls(loss_type, beta, eps, alpha):
    """Every loss, and RPO's (the loss plus alpha times the chosen answers' NLL: trl's [loss, "sft"])."""
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    pairs, width = 6, 12
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):  # answers of different lengths after prompts of different lengths
        start = int(torch.randint(1, 5, (1,), generator=g))
        mask[row, start: start + int(torch.randint(2, width - start, (1,), generator=g))] = 1
    policy = -torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 20
    theirs, figures = trl_loss(loss_type, beta, eps, policy, ref, mask, alpha)
    sums, tokens = (policy * mask[:, 1:]).sum(1), mask[:, 1:].sum(1)
    chosen, rejected = sums.chunk(2)
    losses, r_chosen, r_rejected = preference_loss(chosen, rejected, *ref.chunk(2), beta, loss_type, eps,
                                                   *tokens.chunk(2))
    ours = losses.mean() + alpha * chosen_nll(chosen, tokens.chunk(2)[0])
    assert float(ours) == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert float(r_chosen.mean()) == pytest.approx(figures["rewards/chosen"], rel=1e-9)
    assert float(r_rejected.mean()) == pytest.approx(figures["rewards/rejected"], rel=1e-9)
    assert float((r_chosen - r_rejected).mean()) == pytest.approx(figures["rewards/margins"], rel=1e-9)
    assert float((r_chosen > r_rejected).double().mean()) == pytest.approx(figures["rewards/accuracies"])


def test_hand_worked_values():
    """DPO's loss at a margin of log-ratios Δ is log(1 + exp(-β Δ)); IPO's, (Δ̄ - 1/2β)²."""
    c, r = torch.tensor([-2.0]), torch.tensor([-5.0])
    rc, rr = torch.tensor([-3.0]), torch.tensor([-4.0])  # Δ = (−2 − −3) − (−5 − −4) = 2
    loss, chosen, rejected = preference_loss(c, r, rc, rr, 0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)))
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)
    ipo, _, _ = preference_loss(c, r, rc, rr, 0.5, "ipo", chosen_tokens=torch.tensor([2]),
                                rejected_tokens=torch.tensor([1]))
    assert float(ipo) == pytest.approx((0.5 - -1.0 - 1.0) ** 2)


def test_conservative_dpo_is_trls_sigmoid_on_soft_labels():
    """cDPO (trl 1.x dropped it from its sigmoid loss) is trl's DPO loss on the pair weighted 1 − ε plus trl's
    DPO loss on the swapped pair weighted ε: the cross-entropy against a label that is right with probability 1 − ε."""
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(1)
    pairs, width, beta, eps = 5, 10, 0.3, 0.15
    mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    mask[:, 2:] = 1
    policy = -torch.rand(2 * pairs, width - 1, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 20
    swap = torch.cat([torch.arange(pairs, 2 * pairs), torch.arange(pairs)])
    as_given, _ = trl_loss("sigmoid", beta, 0.0, policy, ref, mask)
    swapped, _ = trl_loss("sigmoid", beta, 0.0, policy[swap], ref[swap], mask)
    sums = (policy * mask[:, 1:]).sum(1)
    losses, _, _ = preference_loss(*sums.chunk(2), *ref.chunk(2), beta, "cdpo", eps)
    assert float(losses.mean()) == pytest.approx((1 - eps) * as_given + eps * swapped, rel=1e-9)


def test_conservative_dpo_stops_at_its_margin():
    """cDPO has a finite optimum, β Δ = log((1 − ε) / ε): its gradient in Δ is zero there, pushes the margin up
    below it and down above it; DPO's and rDPO's push it up everywhere."""
    eps, beta = 0.1, 0.5
    optimum = math.log((1 - eps) / eps) / beta

    def slope(loss: str, smoothing: float, delta: float) -> float:
        d = torch.tensor([delta], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        preference_loss(d, zero, zero, zero, beta, loss, smoothing)[0].sum().backward()
        return float(d.grad)

    assert slope("cdpo", eps, optimum) == pytest.approx(0.0, abs=1e-12)
    assert slope("cdpo", eps, optimum - 1) < 0 < slope("cdpo", eps, optimum + 1)
    assert slope("sigmoid", 0.0, optimum + 1) < 0 and slope("robust", eps, optimum + 1) < 0


def test_reference_cache_scores_each_answer_once_and_as_the_model_does():
    """The frozen reference's log-probabilities are remembered by content: the same rows padded to another width
    (a later epoch's batch) are not run again, and every value equals the model's own on that row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))  # position-wise: causal too
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    x = torch.randint(1, 20, (4, 6))
    y = torch.full((4, 6), -100)
    y[0, 2:4], y[1, 1:6], y[2, 3:5], y[3, 2:4] = x[0, 3:5], torch.tensor(x[1, 2:6].tolist() + [5]), x[2, 4:6], x[0, 3:5]
    x[3] = x[0]  # row 3 is row 0 again: scored once
    cache = ReferenceCache(model)
    first = cache(x, y)
    direct, _ = sequence_logps(model, x, y)
    assert torch.allclose(first, direct, atol=1e-5) and len(calls) == 2 and calls[0][0] == 3
    wider_x = torch.cat([x, torch.zeros(4, 3, dtype=torch.long)], 1)  # padded further: the same answers
    wider_y = torch.cat([y, torch.full((4, 3), -100)], 1)
    again = cache(wider_x[[2, 0, 1]], wider_y[[2, 0, 1]])
    assert len(calls) == 2 and torch.equal(again, first[[2, 0, 1]])
    y2 = y.clone()
    y2[0, 4] = 7  # another target is another answer
    assert float(cache(x[:1], y2[:1])) != pytest.approx(float(first[0])) and len(calls) == 3


def write_preferences(path: Path, n: int, seed: int) -> Path:
    """Prompts "say W:"; the chosen answer is kind about W, the rejected one rude."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"say {w}:", "chosen": f" fair {w}", "rejected": f" foul {w}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dpo_learns_the_preference_and_logs_rewards(pretrained, tmp_path):
    prefs = write_preferences(tmp_path / "prefs.jsonl", 160, 0)
    out = tmp_path / "dpo"
    options = FinetuneOptions(task="dpo", init=str(pretrained), train=str(prefs), beta=0.1)
    _, results = finetune(options, out, overrides=["train.max_steps=120", "train.eval_interval=40",
                                                   "train.threads=1", "train.lr=3e-3", "train.batch_size=16"],
                          show_progress=False)
    before, after = results["before"]["val"], results["val"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["loss"] < 0.5 and after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 1.0
    trained = metrics_records(out, "train")
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(trained[-1])
    assert trained[-1]["reward_margin"] > trained[0]["reward_margin"]  # accuracy may be 1.0 from the first record
    val = metrics_records(out, "val")
    assert val[-1]["reward_accuracy"] >= 0.9
    assert main(["generate", str(out), "--prompt", "say moon:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    report = write_report([out], tmp_path / "report").read_text()  # a dpo run reads as one: no KeyError 'dpo'
    assert "preference accuracy" in report and "(before)" in report and f"{after['reward_accuracy']:.2%}" in report
    assert (tmp_path / "report" / "metrics.png").is_file()


def test_rpo_adds_the_chosen_answers_nll(pretrained, tmp_path):
    """--rpo-alpha: the chosen answers' NLL is logged, enters the validation loss and falls as the policy learns."""
    prefs = write_preferences(tmp_path / "prefs.jsonl", 80, 1)
    out = tmp_path / "rpo"
    assert main(["finetune", "dpo", "--init", str(pretrained), "--data", str(prefs), "--out", str(out), "--quiet",
                 "--rpo-alpha", "1", "train.max_steps=30", "train.eval_interval=30", "train.threads=1",
                 "train.lr=3e-3", "train.batch_size=16"]) == 0
    results = json.loads((out / "results.json").read_text())
    before, after = results["before"]["val"], results["val"]
    assert before["loss"] == pytest.approx(math.log(2) + before["chosen_nll"], abs=1e-5)
    assert after["chosen_nll"] < before["chosen_nll"] - 0.5 and after["reward_accuracy"] >= 0.9
    assert "chosen_nll" in metrics_records(out, "train")[-1]


def test_conservative_dpo_holds_its_margin_where_dpo_keeps_widening(pretrained, tmp_path):
    """--loss cdpo through the CLI: trained alike, DPO's reward margin runs past cDPO's optimum, log((1 − ε) / ε),
    while cDPO's settles near it."""
    prefs = write_preferences(tmp_path / "prefs.jsonl", 80, 2)
    margins = {}
    for loss in ("sigmoid", "cdpo"):
        out = tmp_path / loss
        extra = ["--label-smoothing", "0.2"] if loss == "cdpo" else []
        assert main(["finetune", "dpo", "--init", str(pretrained), "--data", str(prefs), "--out", str(out), "--quiet",
                     "--beta", "0.5", "--loss", loss, *extra, "train.max_steps=80", "train.eval_interval=80",
                     "train.threads=1", "train.lr=3e-3", "train.batch_size=16"]) == 0
        margins[loss] = [r["reward_margin"] for r in metrics_records(out, "train")][-3:]
    optimum = math.log(0.8 / 0.2)
    assert all(abs(m - optimum) < 0.2 for m in margins["cdpo"])
    assert all(m > optimum + 3 for m in margins["sigmoid"])


def test_dpo_on_messages_uses_the_chat_template_and_refuses_bad_pairs(pretrained, tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}], "chosen": [{"role": "assistant", "content": w}],
             "rejected": [{"role": "assistant", "content": "no"}]} for w in WORDS[:6]]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_preferences(chat)
    assert pairs[0].prompt == [{"role": "user", "content": "say the"}] and pairs[0].chosen == "the"
    code = main(["finetune", "dpo", "--init", str(pretrained), "--data", str(chat), "--out", str(tmp_path / "c"),
                 "--quiet", "train.max_steps=2", "train.eval_interval=2", "train.threads=1"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "preference accuracy" in summary and "reward margin" in summary

    def refused(row: dict, match: str) -> None:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(GlmlabError, match=match):
            read_preferences(bad)

    refused({"prompt": "p", "chosen": "same", "rejected": "same"}, "prefers nothing")
    refused({"chosen": "a", "rejected": "b"}, "no prompt")
    refused({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen is missing or empty")
    refused({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message")
    for args, match in ((["--init", "none"], "needs --init"), (["--label-smoothing", "0.1"], "--loss cdpo or"),
                        (["--loss", "cdpo"], "is plain DPO"),
                        (["--beta", "0"], "--beta > 0"), (["--rpo-alpha", "-1"], "--rpo-alpha >= 0")):
        code = main(["finetune", "dpo", "--data", str(chat), "--out", str(tmp_path / "x"),
                     *(["--init", str(pretrained)] if args[0] != "--init" else []), *args])
        assert code == 1 and match in capsys.readouterr().err


def test_a_second_round_keeps_the_first_rounds_reference(pretrained, tmp_path, capsys):
    """--reference: iterated DPO starts round 2 from round 1's policy and still pulls toward the original run, so
    round 2 starts where round 1 ended (not at log 2, as it would against itself); a reference that reads text
    otherwise than --init is refused."""
    prefs = write_preferences(tmp_path / "prefs.jsonl", 80, 2)
    train = ["train.max_steps=30", "train.eval_interval=30", "train.threads=1", "train.lr=3e-3",
             "train.batch_size=16"]
    first = tmp_path / "round1"
    assert main(["finetune", "dpo", "--init", str(pretrained), "--data", str(prefs), "--out", str(first),
                 "--quiet", *train]) == 0
    ended = json.loads((first / "results.json").read_text())["val"]["loss"]
    assert ended < math.log(2) - 0.1
    second = tmp_path / "round2"
    assert main(["finetune", "dpo", "--init", str(first), "--reference", str(pretrained), "--data", str(prefs),
                 "--out", str(second), "--quiet", "train.max_steps=2", "train.eval_interval=2",
                 "train.threads=1"]) == 0
    results = json.loads((second / "results.json").read_text())
    assert results["before"]["val"]["loss"] == pytest.approx(ended, abs=1e-5)
    assert json.loads((second / "config.json").read_text())["finetune"]["reference"] == str(pretrained)

    other_model, other_tokenizer, older = tmp_path / "other-model", tmp_path / "other-tokenizer", tmp_path / "older"
    for copy in (other_model, other_tokenizer, older):
        copy.mkdir()
        for f in pretrained.iterdir():
            if f.is_file():
                (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((other_model / "config.json").read_text())
    config["model"]["n_layer"] += 1
    (other_model / "config.json").write_text(json.dumps(config))
    (other_tokenizer / "tokenizer.json").write_text((pretrained / "tokenizer.json").read_text() + "\n")
    config = json.loads((older / "config.json").read_text())
    del config["model"]["activation"]  # written before the key existed: its default, the same model
    (older / "config.json").write_text(json.dumps(config))
    assert main(["finetune", "dpo", "--init", str(first), "--reference", str(older), "--data", str(prefs),
                 "--out", str(tmp_path / "older-ref"), "--quiet", "train.max_steps=1", "train.threads=1"]) == 0
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (no_weights / name).write_bytes((pretrained / name).read_bytes())
    for reference, match in ((tmp_path / "missing", "does not exist"), (other_model, "model.n_layer differ"),
                             (other_tokenizer, "another tokenizer"), (no_weights, "has no model weights")):
        code = main(["finetune", "dpo", "--init", str(first), "--reference", str(reference), "--data", str(prefs),
                     "--out", str(tmp_path / "x"), "--quiet", "train.max_steps=1"])
        assert code == 1 and match in capsys.readouterr().err
    with pytest.raises(GlmlabError, match="dpo's frozen reference"):
        FinetuneOptions(task="sft", init=str(pretrained), train=str(prefs), reference=str(pretrained)).check()


def test_the_frozen_reference_attends_as_the_policy_does(pretrained, tmp_path, monkeypatch):
    """Under bf16 on a CPU, the trainer's choice of fp32 attention covers the loss's every attention layer: the DPO
    reference's forward passes run in the same autocast as the policy's."""
    import glmlab.models.transformer as transformer
    import glmlab.training.trainer as trainer_module

    flagged = []

    def spy(module, on):
        transformer.attend_in_fp32(module, on)
        flagged.extend(layer.attend_in_fp32 for layer in transformer.attention_layers(module))

    monkeypatch.setattr(trainer_module, "resolve_precision", lambda name, device: torch.bfloat16)
    monkeypatch.setattr(transformer, "bf16_attention_slowdown", lambda *shape: 3.0)
    monkeypatch.setattr(trainer_module, "attend_in_fp32", spy)
    prefs = write_preferences(tmp_path / "prefs.jsonl", 40, 2)
    finetune(FinetuneOptions(task="dpo", init=str(pretrained), train=str(prefs), beta=0.1), tmp_path / "dpo",
             overrides=["train.max_steps=2", "train.eval_interval=2", "train.threads=1"], show_progress=False)
    n_layer = json.loads((pretrained / "config.json").read_text())["model"]["n_layer"]
    assert flagged == [True] * (2 * n_layer)  # the policy's layers and the reference's


def test_dpo_trains_without_dropout_unless_asked(char_data, tmp_path):
    """As trl's DPOTrainer (disable_dropout=True by default): the policy's log-ratios are taken without dropout,
    as the reference's are; model.dropout sets it, and the other tasks keep the init run's."""
    from glmlab.finetune.run import resolve_finetune_config
    from glmlab.training.trainer import train
    from tests.conftest import tiny_config

    init = tmp_path / "init"
    train(tiny_config("model.dropout=0.2", "train.max_steps=1", "train.eval_interval=1", "train.sample_tokens=0"),
          char_data, init, show_progress=False)
    prefs = write_preferences(tmp_path / "prefs.jsonl", 8, 3)
    dpo = FinetuneOptions(task="dpo", init=str(init), train=str(prefs), beta=0.1)
    assert resolve_finetune_config(dpo, {}, [])[0].model.dropout == 0.0
    assert resolve_finetune_config(dpo, {}, ["model.dropout=0.1"])[0].model.dropout == 0.1
    sft = FinetuneOptions(task="sft", init=str(init), train=str(prefs))
    assert resolve_finetune_config(sft, {}, [])[0].model.dropout == 0.2
