"""Family `bert`: BERT's masking, the pseudo-log-likelihood, bidirectional reading and mask-predict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmlab.data.tokenizer import EOS_ID, FIRST_TEXT_ID, MASK_ID, PAD_ID, train_char
from glmlab.errors import GlmlabError
from glmlab.generation.mask_predict import mask_predict
from glmlab.generation.settings import GenerationSettings
from glmlab.models.bert import BERT, BertConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> BERT:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, **overrides)
    config.validate()
    return BERT(config).eval()


def test_masking_follows_bert_proportions_and_spares_padding_and_specials():
    model = tiny()
    seq = torch.randint(FIRST_TEXT_ID, 60, (256, 16), generator=torch.Generator().manual_seed(0))
    seq[:, -3:] = PAD_ID
    seq[:, 0] = 2  # <bos>: never chosen
    seq[:, 1] = EOS_ID  # <eos> may be
    inputs, targets = model.corrupt(seq, torch.Generator().manual_seed(1))
    chosen = targets != -100
    assert not chosen[:, -3:].any() and not chosen[:, 0].any()
    assert chosen[:, 1].any()
    share = chosen[:, 1:-3].float().mean().item()
    assert 0.13 < share < 0.17
    masked = (inputs == MASK_ID)[chosen].float().mean().item()
    kept = (inputs == seq)[chosen].float().mean().item()
    assert 0.75 < masked < 0.85 and 0.06 < kept < 0.15
    assert torch.equal(inputs[~chosen], seq[~chosen]) and torch.equal(targets[chosen], seq[chosen])


def test_whole_word_masking_takes_every_piece_of_a_chosen_word():
    model = tiny(whole_word=True, mask_prob=0.3)
    starts = torch.zeros(60, dtype=torch.bool)
    starts[FIRST_TEXT_ID:30] = True  # ids 14-29 begin a word, 30-59 continue one
    model.word_starts.copy_(starts)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(FIRST_TEXT_ID, 60, (64, 16), generator=g)
    _, targets = model.corrupt(seq, g)
    chosen = targets != -100
    for row in range(64):
        for t in range(1, 16):
            if not starts[seq[row, t]]:  # a continuation shares its word's decision
                assert chosen[row, t] == chosen[row, t - 1]
    assert chosen.any() and not chosen.all()


def test_pll_masks_each_scored_token_in_turn():
    model = tiny()
    x = torch.randint(FIRST_TEXT_ID, 60, (2, 8), generator=torch.Generator().manual_seed(4))
    y = torch.randint(FIRST_TEXT_ID, 60, (2, 8), generator=torch.Generator().manual_seed(5))
    y[:, :-1] = x[:, 1:]  # windows: y is x shifted
    y[0, :3] = -100  # scored by an earlier window
    expected = 0.0
    with torch.no_grad():
        for r in range(2):
            full = torch.cat([x[r], y[r, -1:]])
            for t in range(8):
                if y[r, t] == -100:
                    continue
                window = full[:8].clone() if t < 7 else full[1:].clone()
                at = t + 1 if t < 7 else 7
                window[at] = MASK_ID
                expected -= F.log_softmax(model(window[None])[0, at], -1)[y[r, t]].item()
        got = model.nll(x, y, chunk=3).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_reading_is_bidirectional_and_ignores_padding():
    model = tiny()
    x = torch.randint(FIRST_TEXT_ID, 60, (1, 10), generator=torch.Generator().manual_seed(6))
    changed = x.clone()
    changed[0, 9] = FIRST_TEXT_ID if x[0, 9] != FIRST_TEXT_ID else FIRST_TEXT_ID + 1
    padded = torch.cat([x, torch.full((1, 4), PAD_ID)], dim=1)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0, 0], model(changed)[0, 0])  # the first token sees the last
        torch.testing.assert_close(model(padded)[0, :10], model(x)[0], atol=1e-5, rtol=1e-4)


def test_mask_predict_is_seeded_greedy_is_the_argmax_and_controls_it_cannot_honour_are_refused():
    model = tiny()
    tok = train_char(["abcdefghijklmnopqrstuvwxyz .,"])
    greedy = GenerationSettings(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    [one] = mask_predict(model, tok, "ab", greedy, iterations=1)
    prompt = tok.encode("ab")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + [MASK_ID] * 4]))[0, 2:]
    logits[:, :FIRST_TEXT_ID] = float("-inf")
    assert one.token_ids == logits.argmax(-1).tolist() and one.finish_reason == "length"
    sampled = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=7, num_return_sequences=3)
    first = [c.token_ids for c in mask_predict(model, tok, "ab", sampled)]
    assert first == [c.token_ids for c in mask_predict(model, tok, "ab", sampled)]
    assert len({tuple(t) for t in first}) > 1
    middle = mask_predict(model, tok, "ab", greedy, suffix="yz")[0]
    assert len(middle.token_ids) == 4 and middle.prompt_tokens == 4
    with pytest.raises(GlmlabError, match="repetition_penalty"):
        mask_predict(model, tok, "ab", GenerationSettings(repetition_penalty=1.2))
    with pytest.raises(GlmlabError, match="do not fit"):
        mask_predict(model, tok, "ab", GenerationSettings(max_new_tokens=16))
