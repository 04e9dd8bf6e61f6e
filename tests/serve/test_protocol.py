"""Request checking, the chat template and the Prometheus text, without a server."""

from __future__ import annotations

import pytest

from glmlab.data.tokenizer import train_char
from glmlab.generation.chat import render_chat
from glmlab.serve.fields import APIError, Limits
from glmlab.serve.metrics import Metrics
from glmlab.serve.protocol import chat_request, completion_request

TOK = train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:.\n"])
LIMITS = Limits(max_prompt_tokens=80, max_tokens=100, max_n=4, max_rows=6)


def complete(**body):
    return completion_request(body, TOK, block_size=32, vocab_size=TOK.vocab_size, start=None, limits=LIMITS)


def test_openai_fields_become_generation_settings():
    req = complete(prompt=["ab", "cd"], n=3, max_tokens=9, temperature=0.5, top_p=0.8, top_k=-1, min_p=0.1,
                   presence_penalty=1, frequency_penalty=-1, repetition_penalty=1.2, stop="x", seed=4,
                   logprobs=2, echo=True, ignore_eos=True, min_tokens=2)
    s = req.settings
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed, s.logprobs) == (9, 0.5, 0.8, 0, 0.1,
                                                                                                   4, 2)
    assert s.stop == ["x"] and not s.stop_at_eos and s.min_new_tokens == 2 and s.repetition_penalty == 1.2
    assert req.n == 3 and req.echo and [p.ids for p in req.prompts] == [TOK.encode("ab"), TOK.encode("cd")]
    assert complete(prompt="ab").settings.max_new_tokens == 16  # OpenAI's default


def test_a_prompt_longer_than_the_context_keeps_its_end():
    prompt = complete(prompt="a" * 40 + "b")
    assert len(prompt.prompts[0].ids) == 31 and prompt.prompts[0].tokens == 41
    assert prompt.prompts[0].ids[-1] == TOK.encode("b")[0]


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "ab", "n": 2, "best_of": 3}, "best_of", "not supported"),
    ({"prompt": ["ab"] * 4, "n": 2}, "n", "at most 6"),
    ({"prompt": "ab", "max_tokens": True}, "max_tokens", "must be an integer"),
    ({"prompt": "ab", "temperature": float("nan")}, "temperature", "must be a finite number"),
    ({"prompt": "ab", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"prompt": "ab", "stop": ["x"] * 17}, "stop", "at most 16"),
    ({"prompt": "ab", "min_tokens": 20, "max_tokens": 10}, "min_tokens", "<= 10"),
    ({"prompt": [[1, 2], [99]]}, "prompt", "outside the vocabulary"),
    ({"prompt": "ab", "logit_bias": {"a": 5}}, "logit_bias", "keys are token ids"),
    ({"prompt": "ab", "logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
    ({"prompt": "ab", "suffix": "cd"}, "suffix", "cannot fill in the middle"),  # without a model that infills
    ({"prompt": "ab", "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"prompt": "ab", "do_sample": True}, "do_sample", "unknown parameter"),
    ({"prompt": "ab", "logit_bias": {"999": 1}}, "logit_bias", "token ids of this model"),
    ({"prompt": "ab", "logit_bias": {"²": 1}}, "logit_bias", "token ids of this model"),
    ({"prompt": "ab", "stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation", "not supported"),
    ({"prompt": "ab", "repetition_penalty": 1e-40}, "repetition_penalty", ">= 0.01 and <= 100"),
    ({"prompt": "ab", "top_k": 10**30}, "top_k", "<= 2147483647"),
])
def test_mistakes_name_the_field(body, param, words):
    with pytest.raises(APIError, match=words) as caught:
        complete(**body)
    assert caught.value.status == 400
    assert caught.value.param == param or (param == "prompt" and caught.value.param.startswith("prompt"))


def test_null_means_absent_and_chat_messages_take_role_and_content_only():
    assert complete(prompt="ab", best_of=1, n=None).n == 1
    for extra in ({"name": "bob"}, {"tool_calls": [{"id": "x"}]}, {"role": ["user"]}):
        with pytest.raises(APIError) as caught:
            chat_request({"messages": [{"role": "user", "content": "hi", **extra}]}, TOK, 256, TOK.vocab_size, None,
                         LIMITS)
        assert caught.value.status == 400 and caught.value.param.startswith("messages[0].")


def test_the_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text",
                                                                                           "text": "Who"}]}]
    text = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Who\n\nAssistant:"
    assert render_chat([{**m, "content": m["content"] if isinstance(m["content"], str) else "Who"}
                        for m in messages]) == text
    req = chat_request({"messages": messages, "stop": "."}, TOK, 256, TOK.vocab_size, None, LIMITS)
    assert TOK.decode(req.prompts[0].ids) == text and req.chat
    assert req.settings.stop == [".", "\nUser:", "\nSystem:", "\nAssistant:"]
    assert req.settings.max_new_tokens == 100  # chat's default (256) capped by --max-tokens


def test_prometheus_text():
    m = Metrics()
    m.counter("requests_total", "requests")
    m.histogram("latency_seconds", "latency", buckets=(0.1, 1.0))
    m.gauge("depth", "queue", lambda: 3)
    m.inc("requests_total", endpoint="/x", status="200")
    for value in (0.05, 0.5, 5.0):
        m.observe("latency_seconds", value)
    text = m.render()
    assert 'glmlab_requests_total{endpoint="/x",status="200"} 1' in text
    assert 'glmlab_latency_seconds_bucket{le="0.1"} 1' in text and 'glmlab_latency_seconds_bucket{le="1"} 2' in text
    assert 'glmlab_latency_seconds_bucket{le="+Inf"} 3' in text and "glmlab_latency_seconds_count 3" in text
    assert "# TYPE glmlab_depth gauge\nglmlab_depth 3" in text
    many = Metrics()
    many.histogram("latency_seconds", "latency", buckets=(0.1, 1.0))
    many.observe_many("latency_seconds", [0.05, 0.5, 5.0])
    many.observe_many("latency_seconds", [])
    assert many.render() == "\n".join(line for line in text.splitlines() if "latency" in line) + "\n"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage_null", [False, True])
def test_the_text_chunk_fast_path_writes_what_sse_writes(chat, usage_null):
    from glmlab.serve.responses import sse, text_chunk_format

    rid, kind, created, name = "cmpl-abc", "chat.completion.chunk" if chat else "text_completion", 1700000000, 'm"é'
    fast = text_chunk_format(rid, kind, created, name, chat, usage_null)
    for text, row in [("a", 0), (' "quoted" \\ back\nslash', 3), ("é✓ \u2028 \x00", 12)]:
        choice = ({"index": row, "delta": {"content": text}, "logprobs": None, "finish_reason": None} if chat
                  else {"text": text, "index": row, "logprobs": None, "finish_reason": None})
        body = {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice],
                **({"usage": None} if usage_null else {})}
        assert fast(text, row) == sse(body)
