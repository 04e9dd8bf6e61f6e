"""Family `glm`: the blank-infilling layouts, the attention mask, and the two readings (layout and cache) agreeing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmlab.data.tokenizer import BLANKS, EOP_ID, FIRST_TEXT_ID, GMASK_ID, MASK_ID, SMASK_ID, SOP_ID
from glmlab.models.glm import GLM, GLMConfig, frame, piece_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> GLM:
    torch.manual_seed(0)
    config = GLMConfig(vocab_size=60, block_size=40, n_layer=2, n_head=2, n_embd=16, dropout=0.0, **overrides)
    config.validate()
    return GLM(config).eval()


def refill(layout) -> list[int]:
    """Part A with each blank replaced by its piece: the text the layout was made from."""
    a = layout.tokens[:layout.part_a]
    pieces, current = {}, None
    for tok, pos, target in zip(layout.tokens[layout.part_a:], layout.positions[layout.part_a:],
                                layout.targets[layout.part_a:], strict=True):
        if tok == SOP_ID:
            current = pieces.setdefault(pos, [])
        if target != EOP_ID:
            current.append(target)
    out = []
    for i, tok in enumerate(a):
        out += pieces[i] if tok in BLANKS else [tok]
    return out


def text(n: int, seed: int = 0) -> list[int]:
    return torch.randint(FIRST_TEXT_ID, 60, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_span_layout_hides_spans_that_the_pieces_give_back(seed):
    model = tiny(span_weight=1.0, document_weight=0.0)
    window = text(41, seed)
    layout = model.corrupt(window, torch.Generator().manual_seed(seed))
    budget = model.config.block_size + 2
    assert len(layout.tokens) <= budget
    original = refill(layout)
    assert original == window[:len(original)]
    blanks = [t for t in layout.tokens[:layout.part_a] if t in BLANKS]
    assert blanks and set(blanks) == {MASK_ID}
    masked = len(layout.tokens) - layout.part_a - len(blanks)  # Part B less an opening token per piece
    assert masked >= 0.15 * len(original)
    assert layout.piece_positions[layout.part_a] == 1 and layout.targets[-1] == EOP_ID


def test_document_layout_is_a_suffix_of_half_or_more():
    model = tiny(span_weight=0.0, document_weight=1.0)
    for seed in range(20):
        window = text(41, seed)
        layout = model.corrupt(window, torch.Generator().manual_seed(seed))
        assert layout.tokens[layout.part_a - 1] == GMASK_ID
        piece = len(layout.tokens) - layout.part_a - 1
        assert refill(layout) == window[:40] and piece >= 20


def test_sentence_layout_blanks_whole_sentences():
    model = tiny(span_weight=0.0, sentence_weight=1.0, document_weight=0.0)
    ends = torch.zeros(60, dtype=torch.bool)
    ends[FIRST_TEXT_ID] = True  # the "full stop"
    model.sentence_end.copy_(ends)
    window = []
    for i in range(10):  # sentences of three words and a full stop
        window += [min(t + 1, 59) for t in text(3, i)] + [FIRST_TEXT_ID]
    layout = model.corrupt(window, torch.Generator().manual_seed(0))
    assert refill(layout) == window[:len(refill(layout))]
    a = layout.tokens[:layout.part_a]
    assert SMASK_ID in a
    for i, tok in enumerate(a):
        if tok == SMASK_ID:  # a blank stands after a full stop (or at the start), and for a whole sentence
            assert i == 0 or a[i - 1] in (FIRST_TEXT_ID, SMASK_ID)
    for piece_start in [i for i, t in enumerate(layout.tokens) if t == SOP_ID]:
        end = layout.targets.index(EOP_ID, piece_start)
        assert layout.targets[end - 1] == FIRST_TEXT_ID and end - piece_start == 4


def test_part_a_reads_both_ways_and_part_b_only_what_came_before():
    model = tiny()
    layout = piece_layout([20, 21, MASK_ID, 23, 24], [(2, [30, 31, 32])])
    with torch.no_grad():
        base, _ = model.layout_logits([layout])
        later_a, _ = model.layout_logits([piece_layout([20, 21, MASK_ID, 23, 25], [(2, [30, 31, 32])])])
        later_b, _ = model.layout_logits([piece_layout([20, 21, MASK_ID, 23, 24], [(2, [30, 31, 33])])])
    assert not torch.allclose(base[0, 0], later_a[0, 0])  # the first token of Part A sees its last
    torch.testing.assert_close(base[0, :8], later_b[0, :8])  # no Part A token sees Part B, nor a piece its future
    assert not torch.allclose(base[0, 8], later_b[0, 8])


def test_piece_after_a_framed_prompt_scores_as_the_windowed_nll():
    """nll (the layout path) equals decoding the same piece through the cache (the engine's path)."""
    model = tiny()
    x = torch.tensor([text(10, 1)])
    y = torch.tensor([[*x[0, 1:].tolist(), 33]])
    y[0, :4] = -100  # scored before: context
    with torch.no_grad():
        nll = model.nll(x, y).item()
        cache = model.new_cache(1, torch.device("cpu"))
        prompt = frame([*x[0, :5].tolist(), GMASK_ID])  # the context of y[4] = x[5]: x[0..4]
        logits = model(torch.tensor([prompt]), cache, last_only=True)[0, -1]
        manual = 0.0
        for target in y[0, 4:].tolist():
            manual -= F.log_softmax(logits, -1)[target].item()
            logits = model(torch.tensor([[target]]), cache, last_only=True)[0, -1]
    assert nll == pytest.approx(manual, rel=1e-5)


def test_left_to_right_reading_equals_an_empty_part_a():
    model = tiny()
    x = torch.tensor([text(9, 2)])
    with torch.no_grad():
        plain = model(x)
        layout = piece_layout([GMASK_ID], [(0, x[0].tolist())])
        framed, _ = model.layout_logits([layout])
    torch.testing.assert_close(plain[0], framed[0, 2:11], atol=1e-5, rtol=1e-4)
