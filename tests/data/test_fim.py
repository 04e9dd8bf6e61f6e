from collections import Counter

import numpy as np
import pytest
import torch

from glmlab.data.dataset import RandomWindows
from glmlab.data.fim import FimWindows, fim_prompt, fim_transform
from glmlab.data.tokenizer import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID
from glmlab.errors import GlmlabError

PRE, MID, SUF, EOS = FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, EOS_ID
SENTINELS = {PRE, MID, SUF}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_documents(rng: np.random.Generator, count: int) -> list[list[int]]:
    """Documents with their <eos>; document k uses only ids 100k..100k+49, so a mix would show."""
    return [[*rng.integers(100 * k, 100 * k + 50, size=int(rng.integers(0, 12))).tolist(), EOS]
            for k in range(1, count + 1)]


def segments(ids: list[int]) -> list[list[int]]:
    """``ids`` cut after each <eos> (the last piece may have none)."""
    out, current = [], []
    for t in ids:
        current.append(t)
        if t == EOS:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def layouts(document: list[int], order: str) -> set[tuple[int, ...]]:
    """Every way ``order`` can lay out ``document`` (its text, then its <eos> if it has one), cuts anywhere."""
    eos = [EOS] if document and document[-1] == EOS else []
    text = document[:len(document) - len(eos)]
    out = set()
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            prefix, middle, suffix = text[:i], text[i:j], text[j:]
            pieces = [PRE, *prefix, SUF, *suffix, MID, *middle] if order == "psm" else \
                [PRE, SUF, *suffix, MID, *prefix, *middle]
            out.add(tuple(pieces + eos))
    return out


def layout_of(segment: list[int], document: list[int]) -> str | None:
    """How ``segment`` lays out ``document``: plain, psm, spm, or None when it is none of them. SPM (the paper's
    variant) is token for token PSM with an empty prefix, so those read as spm."""
    if segment == document:
        return "plain"
    order = "spm" if segment[:2] == [PRE, SUF] else "psm"
    return order if tuple(segment) in layouts(document, order) else None


def test_psm_and_spm_layouts_of_a_hand_made_example():
    seq = [20, 21, 22, 23, 24, 25, EOS, 30, 31, 32, 33, EOS, 40, 41]
    # Seed 2 cuts the first document into prefix 20 21 22, middle 23, suffix 24 25 and the second one at its
    # start (the window ends inside its suffix); the same draws give both orders.
    psm = fim_transform(seq, 1.0, 0.0, seeded(2)).tolist()
    assert psm == [PRE, 20, 21, 22, SUF, 24, 25, MID, 23, EOS, PRE, SUF, 31, 32]
    spm = fim_transform(seq, 1.0, 1.0, seeded(2)).tolist()
    assert spm == [PRE, SUF, 24, 25, MID, 20, 21, 22, 23, EOS, PRE, SUF, 31, 32]


@pytest.mark.parametrize(("spm_rate", "order"), [(0.0, "psm"), (1.0, "spm")])
def test_every_document_is_rearranged_in_the_order_asked_and_undoes_exactly(spm_rate, order):
    rng = np.random.default_rng(0)
    seen = set()
    for seed in range(50):
        docs = [d for d in random_documents(rng, 4) if len(d) > 1]
        seq = [t for d in docs for t in d] + [999] * 20  # room: every document fits whole (3 sentinels each)
        out = fim_transform(seq, 1.0, spm_rate, seeded(seed)).tolist()
        for doc, segment in zip(docs, segments(out)[:len(docs)], strict=True):
            assert tuple(segment) in layouts(doc, order), (seed, seq, out)
            seen.add(layout_of(segment, doc))
    assert seen == {"spm"} if order == "spm" else "psm" in seen


def test_fim_rate_zero_is_the_identity():
    rng = np.random.default_rng(1)
    for seed in range(20):
        seq = np.array([t for d in random_documents(rng, 6) for t in d][:50])
        assert np.array_equal(fim_transform(seq, 0.0, 0.5, seeded(seed)), seq)


def test_length_kept_documents_kept_whole_and_never_mixed():
    rng = np.random.default_rng(2)
    counts = Counter()
    for seed in range(200):
        docs = random_documents(rng, 8)
        cut = int(rng.integers(1, 6))
        seq = [t for d in docs for t in d][cut:][:40]  # the window starts and ends inside documents
        inputs = segments(seq)
        out = fim_transform(seq, 0.5, 0.5, seeded(seed)).tolist()
        assert len(out) == len(seq)
        outputs = segments(out)
        assert len(outputs) <= len(inputs)
        for i, (source, segment) in enumerate(zip(inputs, outputs, strict=False)):
            kept = Counter(t for t in segment if t not in SENTINELS)
            if i < len(outputs) - 1 or segment[-1] == EOS:  # a whole document: the same tokens, rearranged
                assert kept == Counter(source), (seed, seq, out)
                layout = layout_of(segment, source)
                assert layout is not None, (seed, seq, out)
                counts[layout] += 1
            else:  # the one the window cuts: some of its tokens, none of a neighbour's
                assert not kept - Counter(source), (seed, seq, out)
    assert set(counts) == {"plain", "psm", "spm"} and min(counts.values()) > 50, counts


def test_a_document_the_window_cuts_is_rearranged_too():
    seq = list(range(20, 36))  # no <eos>: one document, cut by the window at both ends
    out = fim_transform(seq, 1.0, 0.0, seeded(0)).tolist()
    assert len(out) == 16 and out[0] == PRE and EOS not in out
    suf, mid = out.index(SUF), out.index(MID)
    prefix, suffix, middle = out[1:suf], out[suf + 1:mid], out[mid + 1:]
    assert middle and prefix + middle == seq[:len(prefix) + len(middle)] and suffix == seq[len(seq) - len(suffix):]


def test_empty_documents_stay_as_they_are():
    out = fim_transform([EOS, EOS, 20, 21, EOS, 30], 1.0, 0.0, seeded(0)).tolist()
    assert out[:3] == [EOS, EOS, PRE]


def test_fim_prompt_layouts():
    assert fim_prompt([20, 21], [30]) == [PRE, 20, 21, SUF, 30, MID]
    assert fim_prompt([20, 21], [30], order="spm") == [PRE, SUF, 30, MID, 20, 21]
    assert fim_prompt([], [], order="psm") == [PRE, SUF, MID]
    with pytest.raises(GlmlabError, match="psm or spm"):
        fim_prompt([20], [30], order="pms")


def token_stream(n: int = 5000) -> np.ndarray:
    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 60, size=n)
    tokens[rng.random(n) < 0.08] = EOS
    return tokens.astype(np.uint16)


def fim_sampler(batch_size: int = 4, rank: int = 0, world_size: int = 1, seed: int = 7) -> FimWindows:
    windows = RandomWindows(token_stream(), 32, batch_size, seed, rank=rank, world_size=world_size)
    return FimWindows(windows, 0.5, 0.5, seed)


def test_sampler_rows_are_transformed_windows_shifted_by_one():
    x, y = fim_sampler().next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert bool(torch.isin(x, torch.tensor([PRE, MID, SUF])).any())


def test_sampler_resumes_bit_exact():
    a = fim_sampler()
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = fim_sampler(seed=8)  # another seed: everything must come from the state
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [b.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sampler_state_and_plain_windows_state_load_into_each_other():
    """train.fim_rate may change on resume, like any train key: either state loads into the other sampler."""
    plain = RandomWindows(token_stream(), 32, 4, seed=7)
    plain.next_batch()
    fim = fim_sampler(seed=9)
    fim.load_state_dict(plain.state_dict())
    assert torch.equal(fim.windows.generator.get_state(), plain.generator.get_state())
    other = RandomWindows(token_stream(), 32, 4, seed=9)
    other.load_state_dict(fim_sampler().state_dict())
    assert torch.equal(other.next_batch()[0], RandomWindows(token_stream(), 32, 4, seed=7).next_batch()[0])


def test_processes_together_read_what_one_process_with_their_batch_reads():
    x1, _ = fim_sampler(batch_size=4).next_batch()
    halves = [fim_sampler(batch_size=2, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x1)
    assert not torch.equal(halves[0], halves[1])
