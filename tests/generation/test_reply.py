"""Chat replies (leading whitespace dropped before stop strings apply, logprobs of the shown tokens only) and
the text offsets of OpenAI's completion logprobs, with tokenizers whose tokens are not characters."""

import pytest
import torch

from glmlab.data.tokenizer import train_bpe, train_word
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.generation.text import find_stop, text_offsets
from glmlab.models.gpt import GPT, GPTConfig

TEXT = ["  Hé said: «bonjour» — naïve café\n\nthe end.\n", "\n\n 日本語 the cat\n sat.  "] * 30


@pytest.fixture(scope="module")
def bpe_lm():
    tok = train_bpe(TEXT, 300)
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval(), tok


def test_text_offsets_index_the_decoded_text():
    word = train_word(["the cat\nsat on the mat"], 50)
    ids = word.encode("the cat\nsat on")
    text = word.decode(ids)
    offsets = text_offsets(word, ids)
    pieces = [text[a:b] for a, b in zip(offsets, [*offsets[1:], len(text)], strict=True)]
    # a word brings the space before it
    assert pieces == ["the", " cat", "\n", "sat", " on"]
    bpe = train_bpe(TEXT, 300)
    ids = bpe.encode("日本語 café")
    offsets = text_offsets(bpe, ids, base=10)
    # a token starts where the text before it ends (exactly, wherever that text is whole characters); the bytes
    # of a character not yet whole add no text
    assert offsets == sorted(offsets) and offsets[0] == 10 and offsets[-1] < 10 + len("日本語 café")
    for i in range(len(ids)):
        before = bpe.decode(ids[:i])
        if "\ufffd" not in before:
            assert offsets[i] == 10 + len(before), i
    assert len(set(offsets)) < len(ids)  # some character here takes more than one token


def test_a_reply_drops_leading_whitespace_first_and_keeps_only_its_tokens_logprobs(bpe_lm):
    model, tok = bpe_lm
    checked = 0
    for seed in range(60):
        settings = GenerationSettings(max_new_tokens=25, seed=seed, logprobs=0, stop=["\n", "。"], chat_reply=True)
        raw = generate_batch(model, tok, ["x"], GenerationSettings(max_new_tokens=25, seed=seed, logprobs=0))[0][0]
        reply = generate_batch(model, tok, ["x"], settings)[0][0]
        visible = raw.text.lstrip()
        cut = find_stop(visible, settings.stop)
        assert reply.text == (visible[:cut] if cut >= 0 else visible)
        kept = [e.shown if e.shown is not None else tok.token_bytes[e.token_id] for e in reply.logprobs]
        joined = b"".join(kept).decode("utf-8", errors="replace")  # a random model writes broken UTF-8 too
        if "\ufffd" not in reply.text:
            assert joined == reply.text  # the bytes the reply shows, token by token, are the reply
        else:
            assert joined.startswith(reply.text.split("\ufffd")[0])
            assert raw.logprobs[: len(reply.logprobs)] != reply.logprobs or raw.text[:1].strip()
        checked += raw.text[:1].isspace() and bool(reply.text)
    assert checked >= 3
