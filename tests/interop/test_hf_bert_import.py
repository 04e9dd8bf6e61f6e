"""A Hugging Face BERT in: glmlab import-hf (and train --init, prepare --tokenizer-from) of a tiny random
BertForMaskedLM built by transformers (nothing downloaded), against transformers itself: the same logits under the
renumbered vocabulary, the fill-mask pipeline's answers, an export that computes the original's function, and clear
refusals of what glmlab's bert cannot be."""

import json
import shutil

import pytest
import torch

from glmlab.cli import main
from glmlab.data.tokenizer import CLS_ID, FIRST_TEXT_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID
from glmlab.errors import GlmlabError
from glmlab.interop.hf_bert import bert_tokenizer, read_bert
from glmlab.interop.hf_gpt2 import import_hf
from glmlab.models.bert import word_starts
from glmlab.runs import load_run

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [".", ",", "the", "a", "cat", "dog", "sat", "on", "mat", "##s", "ran", "bird", "sang", "paris", "is",
         "capital", "of", "france", "big", "small", "##ly", "quick", "##er", "and", "to", "in"]
# BERT's layout: [PAD] first, reserved [unusedN] slots, then [UNK] [CLS] [SEP] [MASK] and the text
VOCAB = ["[PAD]", *[f"[unused{i}]" for i in range(12)], "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TEXT = "the cat sat on the [MASK] ."


def save_bert(root, vocab=VOCAB, model_class="BertForMaskedLM", **config):
    """A tiny random BERT (every weight perturbed, token types included) and its tokenizer, as save_pretrained
    writes them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(root)
    settings = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=32, type_vocab_size=2) | config
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(transformers.BertConfig(**settings))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-in")
    hf_dir = save_bert(root / "hf")
    assert main(["import-hf", str(hf_dir), "--out", str(root / "run")]) == 0
    return hf_dir, root / "run"


def test_the_special_tokens_move_to_glmlabs_ids_and_the_text_keeps_its_order(imported):
    hf_dir, run_dir = imported
    run = load_run(run_dir)
    tok = run.tokenizer
    assert run.config.model.family == "bert" and tok.kind == "wordpiece" and tok.vocab_size == len(VOCAB)
    for token_id, token in ((PAD_ID, "[PAD]"), (UNK_ID, "[UNK]"), (MASK_ID, "[MASK]"), (CLS_ID, "[CLS]"),
                            (SEP_ID, "[SEP]")):
        assert tok.hf.id_to_token(token_id) == token
    assert tok.eos_id == SEP_ID and tok.pad_id == PAD_ID
    assert all(tok.hf.id_to_token(i).startswith("[unused") for i in range(FIRST_TEXT_ID) if i not in
               (PAD_ID, UNK_ID, MASK_ID, CLS_ID, SEP_ID))
    assert [tok.hf.id_to_token(i) for i in range(FIRST_TEXT_ID, len(VOCAB)) if not
            tok.hf.id_to_token(i).startswith("[unused")] == WORDS
    assert tok.encode("The Cats sat.") == [tok.hf.token_to_id(t) for t in ("the", "cat", "##s", "sat", ".")]
    assert tok.decode(tok.encode("the cats sat quickly.")) == "the cats sat quickly."
    assert tok.encode("[CLS] the [MASK] [SEP]") == [CLS_ID, tok.hf.token_to_id("the"), MASK_ID, SEP_ID]
    starts = word_starts(tok)
    assert [tok.hf.id_to_token(i) for i in range(tok.vocab_size) if not starts[i]] == ["##s", "##ly", "##er"]


def test_logits_equal_transformers_under_the_renumbering(imported):
    hf_dir, run_dir = imported
    run = load_run(run_dir)
    _, order = bert_tokenizer(hf_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    theirs_ids = transformers.AutoTokenizer.from_pretrained(hf_dir)(TEXT)["input_ids"]  # [CLS] ... [SEP]
    ours_ids = run.tokenizer.encode(f"[CLS] {TEXT} [SEP]")
    assert [order[i] for i in ours_ids] == theirs_ids
    with torch.no_grad():
        ours = run.model(torch.tensor([ours_ids]))
        theirs = hf(torch.tensor([theirs_ids])).logits[..., order]
    difference = (ours - theirs).abs().max().item()
    print(f"max |logit difference| vs transformers: {difference:.2e} (logits span {theirs.abs().max().item():.1f})")
    assert difference < 1e-4


def test_glmlab_fill_answers_as_the_fill_mask_pipeline_on_the_original(imported, capsys):
    hf_dir, run_dir = imported
    pipe = transformers.pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir), top_k=5, device="cpu")
    theirs = pipe(TEXT)  # the pipeline's tokenizer adds [CLS] / [SEP]; glmlab's reads them in the text
    assert main(["fill", str(run_dir), f"[CLS] {TEXT} [SEP]", "--top-k", "5", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert [c["token_str"] for c in ours] == [c["token_str"] for c in theirs]
    assert [c["sequence"] for c in ours] == [c["sequence"] for c in theirs]
    worst = max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs, strict=True))
    print(f"max |score difference| vs the fill-mask pipeline: {worst:.2e}")
    assert worst < 1e-4


def test_an_export_of_the_import_computes_the_original(imported, tmp_path):
    hf_dir, run_dir = imported
    assert main(["export-hf", str(run_dir), str(tmp_path / "out")]) == 0
    _, order = bert_tokenizer(hf_dir)
    exported = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    original = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(f"[CLS] {TEXT} [SEP]")["input_ids"]
    with torch.no_grad():
        ours = exported(torch.tensor([ids])).logits
        theirs = original(torch.tensor([[order[i] for i in ids]])).logits[..., order]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_a_vocab_txt_alone_gives_the_same_tokenizer(imported, tmp_path):
    hf_dir, _ = imported
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer.json").unlink()
    with_json, order = bert_tokenizer(hf_dir)
    from_vocab, order_vocab = bert_tokenizer(bare)
    assert order == order_vocab and from_vocab.hf.get_vocab() == with_json.hf.get_vocab()
    text = "[CLS] The QUICK birds [MASK], and Paris is big. [SEP]"
    assert from_vocab.encode(text) == with_json.encode(text) and from_vocab.kind == "wordpiece"
    assert from_vocab.encode(text)[:1] == [CLS_ID] and MASK_ID in from_vocab.encode(text)  # specials read whole


def test_a_pretraining_checkpoint_imports_without_its_next_sentence_head(tmp_path):
    hf_dir = save_bert(tmp_path / "pre", model_class="BertForPreTraining")
    model = read_bert(hf_dir).model
    _, order = bert_tokenizer(hf_dir)
    reference = transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()  # drops the pooler and NSP head too
    ids = torch.tensor([[order.index(i) for i in (14, 19, 20, 16, 22, 15)]])
    with torch.no_grad():
        theirs = reference(torch.tensor([[order[i] for i in ids[0].tolist()]])).logits[..., order]
        assert (model.eval()(ids) - theirs).abs().max().item() < 1e-4


def test_continued_pretraining_reads_data_prepared_with_the_berts_tokenizer(imported, tmp_path):
    hf_dir, _ = imported
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat.", "the dog ran to paris.", "a bird sang in france."] * 40))
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer-from", str(hf_dir)]) == 0
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--init", str(hf_dir),
                 "train.max_steps=2", "train.batch_size=2", "model.block_size=16", "train.eval_interval=2",
                 "train.eval_tokens=64", "train.sample_tokens=0"]) == 0
    run = load_run(tmp_path / "run")
    assert run.config.model.family == "bert" and run.config.model.n_layer == 2
    assert run.tokenizer.hf.to_str() == bert_tokenizer(hf_dir)[0].hf.to_str()


def test_a_glmlab_bert_export_comes_back_as_it_left(tmp_path):
    from tests.generation.test_fill_mask import tiny_run

    run_dir = tiny_run(tmp_path / "run", "bert", seed=1)
    assert main(["export-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_run(run_dir), load_run(tmp_path / "back")
    ids = torch.tensor([before.tokenizer.encode("The [MASK]at sat on the mat.")])
    assert after.tokenizer.encode("The [MASK]at sat") == before.tokenizer.encode("The [MASK]at sat")
    with torch.no_grad():
        assert (before.model.eval()(ids) - after.model.eval()(ids)).abs().max().item() < 1e-5
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat on the mat.\n" * 50)
    hf_dir = str(tmp_path / "hf")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer-from", hf_dir]) == 0


def test_weights_of_another_shape_than_the_config_are_one_clear_error(tmp_path):
    hf_dir = save_bert(tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "vocab_size": len(VOCAB) + 8}))
    with pytest.raises(GlmlabError, match="do not match its config.json"):
        import_hf(hf_dir, tmp_path / "run")


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"intermediate_size": 96}, "intermediate_size=96"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
])
def test_a_bert_glmlab_cannot_be_is_refused_by_name(tmp_path, change, message):
    hf_dir = save_bert(tmp_path / "hf", **change)
    with pytest.raises(GlmlabError, match=message):
        import_hf(hf_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_without_room_for_glmlabs_special_ids_is_refused(tmp_path):
    hf_dir = save_bert(tmp_path / "hf", vocab=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
    with pytest.raises(GlmlabError, match=r"has 5 special or reserved \(\[unusedN\]\) tokens"):
        import_hf(hf_dir, tmp_path / "run")


def test_a_bert_without_its_masked_lm_head_is_refused(tmp_path):
    hf_dir = save_bert(tmp_path / "hf", model_class="BertModel")
    with pytest.raises(GlmlabError, match="no masked-LM head"):
        import_hf(hf_dir, tmp_path / "run")


def test_text_written_by_mask_predict_reads_after_its_prompt(imported):
    from glmlab.generation.mask_predict import mask_predict
    from glmlab.generation.settings import GenerationSettings

    run = load_run(imported[1])
    for seed in range(4):
        [done] = mask_predict(run.model, run.tokenizer, "the cat", GenerationSettings(max_new_tokens=4, seed=seed,
                                                                                     stop_at_eos=False))
        assert "the cat" + done.text == run.tokenizer.decode(run.tokenizer.encode("the cat") + done.token_ids)
