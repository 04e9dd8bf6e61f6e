"""Sentence-mode data: finding sentences, batches of them, and prepare --sentences."""

import json

import numpy as np
import pytest
import torch

from glmlab.data.dataset import IGNORE_INDEX
from glmlab.data.prepare import prepare
from glmlab.data.sentences import SentenceBatches, collate, find_sentences, sentence_batches
from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import DataError

PAD, BOS, EOS = 0, 2, 3


def test_find_sentences_offsets_lengths_and_truncation():
    tokens = np.array([5, 6, EOS, 7, EOS, 8, 9, 10, 11, EOS, 12], dtype=np.uint16)
    s = find_sentences(tokens, EOS, max_len=4)  # max_len counts <bos>: 3 targets at most
    assert s.starts.tolist() == [0, 3, 5, 10]
    assert s.lengths.tolist() == [3, 2, 3, 1]  # the trailing piece without <eos> counts too
    assert s.truncated == 1 and len(s) == 4
    assert len(find_sentences(np.array([], dtype=np.uint16), EOS, 8)) == 0


def test_collate_places_bos_padding_and_ignore_index():
    tokens = np.array([5, 6, EOS, 7, EOS, 8, 9, 10, 11, EOS], dtype=np.uint16)
    s = find_sentences(tokens, EOS, max_len=4)
    x, y = collate(s, np.array([0, 1, 2]), BOS, PAD)
    assert x.shape == y.shape == (3, 3) and x.dtype == y.dtype == torch.long
    assert x.tolist() == [[BOS, 5, 6], [BOS, 7, PAD], [BOS, 8, 9]]
    assert y.tolist() == [[5, 6, EOS], [7, EOS, IGNORE_INDEX], [8, 9, 10]]  # the cut sentence loses its end


def numbered(n: int, seed: int = 0, longest: int = 30):
    """n sentences of random lengths; every token of sentence i is 100 + i, so a batch names its sentences."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest, n)
    tokens = np.concatenate([np.r_[np.full(k, 100 + i), EOS] for i, k in enumerate(lengths)]).astype(np.uint32)
    return find_sentences(tokens, EOS, max_len=64)


def ids(y: torch.Tensor) -> list[int]:
    return [int(row[0]) - 100 for row in y]


def test_batches_are_deterministic_from_the_seed():
    s = numbered(103)
    a, b, c = (SentenceBatches(s, 10, seed, BOS, PAD) for seed in (1, 1, 2))
    first = [ids(a.next_batch()[1]) for _ in range(25)]
    assert first == [ids(b.next_batch()[1]) for _ in range(25)]
    assert first != [ids(c.next_batch()[1]) for _ in range(25)]


def test_an_epoch_covers_each_sentence_once_up_to_the_partial_batch():
    s = numbered(103)
    sampler = SentenceBatches(s, 10, 0, BOS, PAD)
    epochs = []
    for _ in range(3):  # 103 // 10 full batches per epoch; the 3 left over are dropped, a different 3 each time
        seen = [i for _ in range(10) for i in ids(sampler.next_batch()[1])]
        assert len(seen) == len(set(seen)) == 100
        epochs.append(set(range(103)) - set(seen))
    assert sampler.epoch == 2 and len({frozenset(e) for e in epochs}) > 1
    x, y = sampler.next_batch()
    assert sampler.last_tokens == int((y != IGNORE_INDEX).sum()) and x.size(0) == 10


def test_the_dropped_partial_batch_is_random_not_the_longest_sentences():
    s = numbered(103)
    sampler = SentenceBatches(s, 10, 0, BOS, PAD)
    seen = {i for _ in range(50) for i in ids(sampler.next_batch()[1])}  # 5 epochs
    assert seen == set(range(103))
    small = SentenceBatches(numbered(7), 10, 0, BOS, PAD)  # fewer sentences than a batch: one batch of all
    assert sorted(ids(small.next_batch()[1])) == list(range(7))


def test_batches_are_length_bucketed():
    s = numbered(500)
    sampler = SentenceBatches(s, 10, 0, BOS, PAD)
    spread = [np.ptp(s.lengths[ids(sampler.next_batch()[1])]) for _ in range(50)]
    rng = np.random.default_rng(0)
    random = [np.ptp(s.lengths[rng.choice(500, 10, replace=False)]) for _ in range(50)]
    assert np.mean(spread) < 0.25 * np.mean(random)


def test_resuming_from_the_state_continues_with_the_same_batches(tmp_path):
    s = numbered(103)
    sampler = SentenceBatches(s, 10, 7, BOS, PAD)
    for _ in range(13):  # into the second epoch
        sampler.next_batch()
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    fresh = SentenceBatches(s, 10, 999, BOS, PAD)  # a different seed: the state carries everything
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for _ in range(20):  # across the next epoch boundary too
        (x1, y1), (x2, y2) = sampler.next_batch(), fresh.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert fresh.epoch == sampler.epoch == 3


def test_ranks_split_the_global_batch():
    s = numbered(103)
    whole = SentenceBatches(s, 8, 3, BOS, PAD)
    ranks = [SentenceBatches(s, 4, 3, BOS, PAD, rank=r, world_size=2) for r in range(2)]
    for _ in range(15):
        together = ids(whole.next_batch()[1])
        assert ids(ranks[0].next_batch()[1]) + ids(ranks[1].next_batch()[1]) == together


def test_no_sentences_is_a_data_error():
    with pytest.raises(DataError, match="no sentences"):
        SentenceBatches(find_sentences(np.array([], dtype=np.uint16), EOS, 8), 4, 0, BOS, PAD)


def test_evaluation_batches_cover_every_sentence_once():
    s = numbered(53)
    seen = [i for _, y in sentence_batches(s, 8, BOS, PAD) for i in ids(y)]
    assert sorted(seen) == list(range(53))
    assert sorted(i for _, y in sentence_batches(s, 8, BOS, PAD, limit=20) for i in ids(y)) == list(range(20))


def test_prepare_sentences_makes_one_document_per_line(tmp_path):
    train = tmp_path / "train.txt"
    lines = [f"the cat number {i} sat on the mat" for i in range(28)] + ["a dog sat"] * 2
    train.write_text("\n".join(lines[:15]) + "\n\n  \n" + "\n".join(lines[15:]) + "\n", encoding="utf-8")
    val, test = tmp_path / "val.txt", tmp_path / "test.txt"
    val.write_text("the cat sat\r\n  a dog sat  \n", encoding="utf-8")
    test.write_text("the mat\n", encoding="utf-8")
    meta = prepare([train], tmp_path / "d", tokenizer="word", val_file=val, test_file=test, sentences=True)
    on_disk = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["unit"] == on_disk["unit"] == "sentence" and meta["options"]["sentences"] is True
    assert meta["splits"]["val"]["documents"] == 2 and meta["splits"]["test"]["documents"] == 1
    tok = Tokenizer.from_file(tmp_path / "d" / "tokenizer.json")
    stream = np.memmap(tmp_path / "d" / "val.bin", dtype=np.uint16, mode="r")
    s = find_sentences(stream, tok.eos_id, max_len=64)
    decoded = [tok.decode(stream[a:a + n - 1].tolist()) for a, n in zip(s.starts, s.lengths, strict=True)]
    assert decoded == ["the cat sat", "a dog sat"]  # stripped, one <eos> each, no line breaks inside
    train_sentences = find_sentences(np.memmap(tmp_path / "d" / "train.bin", dtype=np.uint16, mode="r"),
                                     tok.eos_id, 64)
    assert meta["splits"]["train"]["documents"] == len(train_sentences) == 30
    plain = prepare([train], tmp_path / "p", tokenizer="word", val_file=val, test_file=test)
    assert plain["unit"] == "document" and plain["splits"]["val"]["documents"] == 1
