"""glmlab fill / LoadedRun.fill: the likeliest tokens for each [MASK], in the fill-mask pipeline's shape — a bert
from one pass, a glm from the first token of the piece for each blank (checked against its decoding path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glmlab import atomic
from glmlab.cli import main
from glmlab.config import resolve_config
from glmlab.data.tokenizer import MASK_ID, SOP_ID, Tokenizer, train_char
from glmlab.errors import GlmlabError
from glmlab.generation.fill_mask import fill_mask
from glmlab.models import FamilyModel, build_model
from glmlab.models.glm import frame, piece_layout
from glmlab.runs import CONFIG, TOKENIZER, WEIGHTS, LoadSpec, load_run, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "The cat sat on the mat. The dog sat on the log.\nA bird in the hand is worth two in the bush.\n"
TINY = dict(block_size=24, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def tiny_run(out: Path, family: str, seed: int = 0, **model: object) -> Path:
    """A run directory holding a tiny model of ``family`` with random weights, spread wider than an untrained
    model's (LayerNorms included), so its predictions are peaked and every weight matters."""
    tokenizer = train_char([TEXT])
    config = resolve_config({"model": {"family": family, "vocab_size": tokenizer.vocab_size, **TINY, **model}})
    torch.manual_seed(seed)
    net: FamilyModel = build_model(config.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            is_norm_weight = p.dim() == 1 and ("ln" in name.split(".")[-2])
            p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm_weight and name.endswith("weight")
                    else 0.3 * torch.randn_like(p))
    out.mkdir(parents=True)
    tokenizer.save(out / TOKENIZER)
    save_weights(net, out / WEIGHTS)
    atomic.write_json(out / CONFIG, {**config.to_dict(), "load": LoadSpec().to_dict()})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fill")
    return {family: tiny_run(root / family, family) for family in ("bert", "glm", "gpt")}


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(dim=-1)


def _check_candidates(candidates, probs: torch.Tensor, tokenizer: Tokenizer, ids: list[int], at: int, single: bool,
                      k: int = 5) -> None:
    scores, tokens = probs.topk(k)
    assert [c["token"] for c in candidates] == tokens.tolist()
    assert [c["score"] for c in candidates] == pytest.approx(scores.tolist(), abs=1e-6)
    for c in candidates:
        assert c["token_str"] == tokenizer.decode([c["token"]], skip_special_tokens=False)
        filled = ids[:at] + [c["token"]] + ids[at + 1:]
        assert c["sequence"] == tokenizer.decode([t for t in filled if t != 0], skip_special_tokens=single)


def test_bert_one_mask_is_one_pass_in_the_pipelines_shape(runs):
    run = load_run(runs["bert"])
    text = "The [MASK]at sat."
    ids = run.tokenizer.encode(text)
    at = ids.index(MASK_ID)
    with torch.no_grad():
        probs = _probs(run.model(torch.tensor([ids]))[0, at])
    candidates = run.fill(text)
    assert isinstance(candidates, list) and len(candidates) == 5 and set(candidates[0]) == {
        "score", "token", "token_str", "sequence"}
    _check_candidates(candidates, probs, run.tokenizer, ids, at, single=True)
    assert candidates[0]["sequence"] == f"The {candidates[0]['token_str']}at sat." or candidates[0]["token"] < 14


def test_bert_two_masks_give_a_list_per_mask_with_the_other_mask_left_in(runs):
    run = load_run(runs["bert"])
    text = "The [MASK]at sat on the [MASK]at."
    ids = run.tokenizer.encode(text)
    where = [i for i, t in enumerate(ids) if t == MASK_ID]
    with torch.no_grad():
        probs = _probs(run.model(torch.tensor([ids]))[0])
    result = fill_mask(run.model, run.tokenizer, text, top_k=3)
    assert len(result) == 2 and all(len(r) == 3 for r in result)
    for candidates, at in zip(result, where, strict=True):
        _check_candidates(candidates, probs[at], run.tokenizer, ids, at, single=False, k=3)
        assert all(c["sequence"].count("[MASK]") == 1 for c in candidates)
    assert result[0][0]["sequence"].endswith("on the [MASK]at.")


def test_glm_last_blank_is_the_first_token_its_decoding_would_write(runs):
    """The last blank: the same distribution as the engine's first step on the framed prompt (Part A, then
    <|startofpiece|>, read through the model's cache)."""
    run = load_run(runs["glm"])
    text = "The [MASK]at sat on the [MASK]at."
    ids = run.tokenizer.encode(text)
    with torch.no_grad():
        first = run.model(torch.tensor([frame(ids)]), cache=run.model.new_cache(1, torch.device("cpu")),
                          last_only=True)[0, -1]
    result = run.fill(text)
    _check_candidates(result[1], _probs(first), run.tokenizer, ids, max(i for i, t in enumerate(ids)
                                                                        if t == MASK_ID), single=False)


def test_glm_each_blank_is_scored_as_the_piece_that_fills_it(runs):
    """Blank i, not only the last: the distribution at <|startofpiece|> of a piece written for blank i in GLM's
    training layout (whatever the piece holds after it), with every other [MASK] left in Part A."""
    run = load_run(runs["glm"])
    text = "A [MASK]at sat on a [MASK]og. A [MASK]."
    ids = run.tokenizer.encode(text)
    where = [i for i, t in enumerate(ids) if t == MASK_ID]
    result = run.fill(text, top_k=4)
    piece = run.tokenizer.encode("dog")
    for candidates, at in zip(result, where, strict=True):
        with torch.no_grad():
            logits, _ = run.model.layout_logits([piece_layout(ids, [(at, piece)])])
        assert logits.shape[1] == len(ids) + 1 + len(piece) and ids + [SOP_ID] == \
            piece_layout(ids, [(at, piece)]).tokens[: len(ids) + 1]
        _check_candidates(candidates, _probs(logits[0, len(ids)]), run.tokenizer, ids, at, single=False, k=4)
    firsts = [[c["token"] for c in r] for r in result]
    assert firsts[0] != firsts[1] or firsts[1] != firsts[2]  # each blank is scored where it is


def test_glm_blank_logits_fills_the_blank_it_is_given_else_the_last(runs):
    model = load_run(runs["glm"]).model
    tokenizer = train_char([TEXT])
    ids = tokenizer.encode("A [MASK]at sat on a [MASK]og.")
    where = [i for i, t in enumerate(ids) if t == MASK_ID]
    idx = torch.tensor([ids, ids])
    with torch.no_grad():
        last = model.blank_logits(idx)
        chosen = model.blank_logits(idx, blank_at=[where[1], where[0]])
        assert torch.equal(chosen[0], last[0]) and not torch.allclose(chosen[1], last[1])
        first, _ = model.layout_logits([piece_layout(ids, [(where[0], [])])])
        assert torch.allclose(chosen[1], first[0, len(ids)], atol=1e-6)
    with pytest.raises(ValueError, match="holds no blank"):
        model.blank_logits(idx[:1], blank_at=[0])


def test_refusals_name_the_problem_and_the_fix(runs):
    bert, gpt = load_run(runs["bert"]), load_run(runs["gpt"])
    with pytest.raises(GlmlabError, match="no \\[MASK\\]") as info:
        bert.fill("The cat sat.")
    assert info.value.fix
    with pytest.raises(GlmlabError, match="gpt run cannot fill"):
        gpt.fill("The [MASK] sat.")
    for k in (0, bert.model.vocab_size + 1):
        with pytest.raises(GlmlabError, match="top_k"):
            bert.fill("The [MASK] sat.", top_k=k)
    assert len(bert.fill("The [MASK] sat.", top_k=bert.model.vocab_size)) == bert.model.vocab_size
    long = "The cat sat on the [MASK]at. " * 2  # 48 tokens: more than the window of 24
    with pytest.raises(GlmlabError, match="reads at most 24") as info:
        bert.fill(long)
    assert "shorten" in info.value.fix
    glm = load_run(runs["glm"])
    assert len(glm.fill("a" * 24 + "[MASK]")) == 5  # Part A of block_size + 1, then <|startofpiece|>
    with pytest.raises(GlmlabError, match="reads at most 25"):
        glm.fill("a" * 25 + "[MASK]")


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_glmlab_fill_prints_a_block_per_mask_or_the_pipelines_json(runs, capsys):
    text = "The [MASK]at sat on the [MASK]at."
    expected = load_run(runs["bert"]).fill(text, top_k=3)
    code, out, _ = _cli(capsys, "fill", runs["bert"], text, "--top-k", "3", "--json", "--device", "cpu")
    assert code == 0 and json.loads(out) == expected
    code, out, _ = _cli(capsys, "fill", runs["bert"], text, "--top-k", "3", "--checkpoint", "last")
    blocks = out.strip().split("\n\n")
    assert code == 0 and len(blocks) == 2
    for block, candidates in zip(blocks, expected, strict=True):
        header, *lines = block.splitlines()
        assert header.startswith("[MASK] ") and len(lines) == 3
        for line, c in zip(lines, candidates, strict=True):
            assert line == f"{c['score']:.4f} {json.dumps(c['token_str'], ensure_ascii=False)}  {c['sequence']}"
    code, out, _ = _cli(capsys, "fill", runs["glm"], "The [MASK] sat.\\n", "--json")
    single = json.loads(out)
    assert code == 0 and len(single) == 5 and single[0]["sequence"].endswith("sat.\n")


def test_glmlab_fill_mistakes_exit_1_with_one_message(runs, capsys):
    for args, says in (((runs["bert"], "The cat sat."), "holds no [MASK]"),
                       ((runs["gpt"], "The [MASK] sat."), "cannot fill"),
                       ((runs["bert"], "The [MASK] sat.", "--top-k", "0"), "--top-k 0"),
                       ((runs["bert"], "The [MASK] sat.", "--top-k", "999"), "top_k=999")):
        code, out, err = _cli(capsys, "fill", *args)
        assert code == 1 and out == "" and says in err and "fix:" in err and err.startswith("glmlab fill: error:")
