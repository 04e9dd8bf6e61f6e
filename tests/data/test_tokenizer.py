import pytest
from tokenizers import Tokenizer as HFTokenizer

from glmlab.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from glmlab.errors import DataError, EncodingError

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 20


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_saved_tokenizer_loads_with_hf_and_keeps_special_ids(kind, tmp_path):
    tok = train_tokenizer(kind, [TEXT], vocab_size=300 if kind == "bpe" else 50)
    tok.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(14))
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.kind == kind
    assert hf.encode("to be").ids == tok.encode("to be")


def test_char_round_trip_and_unencodable_characters():
    tok = train_tokenizer("char", [TEXT])
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + len(SPECIAL_TOKENS)
    assert tok.unencodable("Tö be €") == ["ö", "€"]
    with pytest.raises(EncodingError) as err:
        tok.encode_checked("zebra")
    assert "'z'" in str(err.value) and "--tokenizer bpe" in str(err.value)


def test_char_pieces_concatenate_to_the_decode_and_other_kinds_have_none():
    """The incremental decoder's fast path: a char tokenizer's per-id texts, joined, are its decode (special
    tokens skipped); word and BPE tokenizers, whose decoding is not concatenation, give None."""
    tok = train_tokenizer("char", [TEXT + "\n"])
    pieces = tok.pieces
    assert pieces is not None and len(pieces) == tok.vocab_size
    ids = tok.encode(TEXT + "\n") + [tok.eos_id, tok.bos_id] + tok.encode("to be")
    assert "".join(pieces[i] for i in ids) == tok.decode(ids)
    assert all(pieces[i] == "" for i in (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id))
    assert train_tokenizer("word", [TEXT], vocab_size=100).pieces is None
    assert train_tokenizer("bpe", [TEXT], vocab_size=300).pieces is None


def test_word_vocab_cap_unknowns_and_line_breaks():
    tok = train_tokenizer("word", [TEXT], vocab_size=20)
    assert tok.vocab_size == 20
    ids = tok.encode("the zyzzyva\nthe")
    assert ids[1] == tok.unk_id
    assert tok.unencodable("the zyzzyva") == ["zyzzyva"]
    full = train_tokenizer("word", [TEXT], vocab_size=1000)
    assert full.decode(full.encode("to be, or not\nto be:")) == "to be, or not\nto be:"


def test_bpe_encodes_any_text():
    tok = train_tokenizer("bpe", [TEXT], vocab_size=300)
    weird = "naïve 😀 日本語 \t tabs\n"
    assert tok.unencodable(weird) == []
    assert tok.decode(tok.encode(weird)) == weird
    assert tok.vocab_size <= 300


def test_vocab_size_too_small_and_unknown_kind():
    with pytest.raises(DataError, match="too small"):
        train_tokenizer("bpe", [TEXT], vocab_size=100)
    with pytest.raises(DataError, match="unknown tokenizer"):
        train_tokenizer("sentencepiece", [TEXT])


def test_word_tokenizer_on_text_that_spells_unk_keeps_ids_dense():
    """PTB writes <unk> for rare words: it must map to the special <unk> (id 1) and leave no hole in the ids."""
    text = "the <unk> sat on the mat\nthe cat saw <unk> <unk>\n" * 5
    tok = train_tokenizer("word", [text], vocab_size=100)
    ids = tok.encode("the <unk> sat")
    assert ids[1] == tok.unk_id == 1
    assert sorted(tok.hf.get_vocab(with_added_tokens=True).values()) == list(range(tok.vocab_size))
    assert max(tok.encode(text)) < tok.vocab_size


def test_vocab_size_counts_past_holes_in_a_foreign_tokenizer():
    from tokenizers import models

    hf = HFTokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2, "b": 7}, unk_token="<unk>"))
    assert Tokenizer(hf).vocab_size == 8  # ids run to 7: an embedding needs 8 rows
