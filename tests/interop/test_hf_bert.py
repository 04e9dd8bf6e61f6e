"""A bert run out as a Hugging Face BertForMaskedLM, against transformers itself (tiny random models, nothing
downloaded): the same logits with and without padding, the same tokens, and the fill-mask pipeline's answers equal
to glmlab fill's."""

import json

import pytest
import torch

from glmlab.cli import main
from glmlab.errors import GlmlabError
from glmlab.interop.hf_gpt2 import export_hf
from glmlab.runs import load_run
from tests.generation.test_fill_mask import tiny_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random bert run and its export through the command line."""
    root = tmp_path_factory.mktemp("bert-hf")
    run_dir = tiny_run(root / "run", "bert", seed=1)
    assert main(["export-hf", str(run_dir), str(root / "hf")]) == 0
    return run_dir, root / "hf"


def test_the_export_loads_as_bert_for_masked_lm_with_every_weight_in_place(exported, capsys):
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "BertForMaskedLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.hidden_act == "gelu" and model.config.max_position_embeddings == 24
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


def _logits_both(run, hf, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """glmlab's and transformers' logits of right-padded rows (glmlab reads <pad> as padding, transformers the
    attention mask), and the mask of real positions."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [run.tokenizer.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return run.model(ids), hf(input_ids=ids, attention_mask=mask).logits, mask.bool()


def test_logits_match_transformers_with_and_without_padding(exported):
    run_dir, out = exported
    run = load_run(run_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    texts = ["The [MASK]at sat on the mat.", "The dog sat on a [MASK]og. A", "The bird", "[MASK]"]
    rows = [run.tokenizer.encode(t) for t in texts]
    ours, theirs, _ = _logits_both(run, hf, rows[:2])  # same length: no padding
    assert len(rows[0]) == len(rows[1]) and ours.shape == theirs.shape
    unpadded = (ours - theirs).abs().max().item()
    ours, theirs, real = _logits_both(run, hf, rows)  # right-padded to the longest
    assert not real.all()
    padded = (ours - theirs)[real].abs().max().item()
    print(f"max |logit difference| vs transformers: {unpadded:.2e} unpadded, {padded:.2e} padded "
          f"(logits span {ours.abs().max().item():.1f})")
    assert unpadded < 1e-4 and padded < 1e-4
    full = torch.tensor([run.tokenizer.encode("The cat sat on the mat. The dog sat on the lo[MASK].")[:24]])
    with torch.no_grad():  # a whole window, and token types (written as zeros) change nothing
        assert (run.model(full) - hf(full, token_type_ids=torch.ones_like(full)).logits).abs().max() < 1e-4


def test_the_tokenizer_adds_nothing_the_model_never_read(exported):
    run_dir, out = exported
    run = load_run(run_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] is None
    text = "The [MASK]at sat on the [MASK]at."
    assert tokenizer(text)["input_ids"] == run.tokenizer.encode(text)  # no [CLS] / [SEP]
    roles = {"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "<pad>",
             "unk_token": "<unk>"}
    assert {k: getattr(tokenizer, k) for k in roles} == roles
    assert tokenizer.mask_token_id == 4 and tokenizer.decode(tokenizer(text)["input_ids"]) == text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and config["model_max_length"] == 24


@pytest.mark.parametrize("text", ["The [MASK]at sat on the mat.", "The [MASK]at sat on the [MASK]at."])
def test_the_fill_mask_pipeline_answers_as_glmlab_fill(exported, text, capsys):
    run_dir, out = exported
    pipe = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), top_k=5, device="cpu")
    theirs = pipe(text)
    assert main(["fill", str(run_dir), text, "--top-k", "5", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    if text.count("[MASK]") == 1:
        ours, theirs = [ours], [theirs]
    assert len(ours) == len(theirs) == text.count("[MASK]")
    worst = 0.0
    for our_mask, their_mask in zip(ours, theirs, strict=True):
        assert [c["token"] for c in our_mask] == [c["token"] for c in their_mask]
        assert [c["token_str"] for c in our_mask] == [c["token_str"] for c in their_mask]
        assert [c["sequence"] for c in our_mask] == [c["sequence"] for c in their_mask]
        worst = max(worst, *(abs(a["score"] - b["score"]) for a, b in zip(our_mask, their_mask, strict=True)))
    print(f"max |score difference| vs the fill-mask pipeline: {worst:.2e}")
    assert worst < 1e-4


def test_only_families_with_a_hugging_face_twin_export(tmp_path):
    glm = tiny_run(tmp_path / "glm", "glm")
    with pytest.raises(GlmlabError, match="no Hugging Face equivalent"):
        export_hf(glm, tmp_path / "hf")
    bert = tiny_run(tmp_path / "bert", "bert")
    export_hf(bert, tmp_path / "hf-bert")
    with pytest.raises(GlmlabError, match="already holds"):
        export_hf(bert, tmp_path / "hf-bert")
