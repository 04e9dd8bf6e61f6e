"""Structured output in the engine: grammars constrain every row, end it when complete, and a tokenizer that
cannot follow is an error, never text that does not parse."""

import json

import pytest
import torch

from glmlab.data.tokenizer import train_bpe, train_char, train_word
from glmlab.errors import GlmlabError
from glmlab.generation.generate import GenerationSettings, generate_batch, stream
from glmlab.generation.grammar import Grammar, GrammarError, compiler, strict_schema
from glmlab.models.gpt import GPT, GPTConfig

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"]}


def _model(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab + 5, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()


def test_every_row_follows_its_own_grammar_and_ends_when_it_is_complete():
    tok = train_bpe(['{"n": 12, "ok": true} yes no maybe 0123456789'] * 20, 300)
    model = _model(tok.vocab_size)  # a padded vocabulary: ids past the tokenizer are never allowed
    free = GenerationSettings(max_new_tokens=20, seed=1)
    schema = GenerationSettings(max_new_tokens=40, seed=2, grammar=Grammar("json_schema", json.dumps(SCHEMA)),
                                stop_at_eos=False, logprobs=0)
    yes_no = GenerationSettings(max_new_tokens=10, seed=3, grammar=Grammar("gbnf", 'root ::= "yes" | "no"'))
    for seed in range(5):
        schema.seed = seed
        out = generate_batch(model, tok, ["a", "b", "c"], [free, schema, yes_no])
        parsed = json.loads(out[1][0].text)
        assert set(parsed) == {"n", "ok"} and 0 <= parsed["n"] <= 99 and out[1][0].finish_reason == "stop"
        assert out[2][0].text in ("yes", "no") and out[2][0].finish_reason == "stop"
        assert not out[1][0].ended_at_eos  # complete: the row ends without drawing <eos>, even with ignore_eos
        assert all(e.logprob <= 0 for e in out[1][0].logprobs)  # the model's own log-probabilities


def test_a_tokenizer_that_cannot_follow_is_refused_or_ends_with_an_error():
    word = train_word(["the cat sat"], 20)
    with pytest.raises(GrammarError, match="char or bpe tokenizer"):
        compiler(word, word.vocab_size).matcher(Grammar("json_object"))
    no_brace = train_char(["abc def"])
    with pytest.raises(GrammarError, match="cannot write the start"):
        compiler(no_brace, no_brace.vocab_size).matcher(Grammar("json_object"))
    no_digits = train_char(['{"n":,ok}truefals'])  # can open the object, cannot write the number it needs
    settings = GenerationSettings(max_new_tokens=30, grammar=Grammar("json_schema", json.dumps(SCHEMA)))
    with pytest.raises(GlmlabError, match="structured output failed"):
        generate_batch(_model(no_digits.vocab_size), no_digits, ["n"], settings)
    with pytest.raises(GlmlabError, match="structured output failed"):  # streaming says so too
        list(stream(_model(no_digits.vocab_size), no_digits, "n", settings))
    with pytest.raises(GrammarError, match="cannot be compiled"):
        compiler(no_digits, no_digits.vocab_size).matcher(Grammar("gbnf", "root ::= ("))
    bpe = train_bpe(["a b c"] * 5, 270)
    with pytest.raises(GrammarError, match="allows no output but the empty one"):
        compiler(bpe, bpe.vocab_size).matcher(Grammar("gbnf", 'root ::= ""'))


def test_object_schemas_are_made_strict_unless_they_say_otherwise():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
              "$defs": {"B": {"type": "object", "properties": {"x": {}}, "additionalProperties": True}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False and strict["properties"]["a"]["additionalProperties"] is False
    assert strict["$defs"]["B"]["additionalProperties"] is True
    with pytest.raises(GlmlabError, match="beam search"):
        GenerationSettings(num_beams=2, grammar=Grammar("json_object")).validate()
