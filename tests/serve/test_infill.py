"""Fill-in-the-middle through ``/v1/completions``: OpenAI's ``suffix`` honoured by runs that can infill (a gpt
trained with ``train.fim_rate``, a glm; a bert writes by mask-predict) and refused by name by the others; each row
starts from the ids ``generate_batch`` starts from (``glmlab.generation.infill.prompt_ids``), so the server's
answers equal the library's for the same seed."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import httpx2 as httpx
import pytest

from glmlab.generation.chat import CHAT_STOPS, render_chat
from glmlab.generation.generate import GenerationSettings, generate_batch
from glmlab.generation.infill import prompt_ids
from glmlab.runs import load_run
from glmlab.serve.app import create_app
from tests.serve.conftest import OPTIONS, LiveServer

openai = pytest.importorskip("openai")

PROMPT, SUFFIX = "First Citizen:\nBefore", " hear me"  # framed and written, within a glm's context of 64


@pytest.fixture(scope="module")
def servers(infill_runs, serve_threads):
    """A live server per run (the shared server's options), and the run loaded again for the library's answers."""
    out = {}
    for name in ("fim", "glm", "bert", "lstm"):
        server = LiveServer(create_app(load_run(infill_runs[name]), OPTIONS)).__enter__()
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=60)
        server.run = load_run(infill_runs[name])
        out[name] = server
    yield out
    for server in out.values():
        server.__exit__(None, None, None)


EXTENSIONS = ("top_k", "ignore_eos", "min_tokens", "repetition_penalty", "min_p")


def settings_of(body: dict) -> GenerationSettings:
    """The library's settings for an OpenAI request body."""
    return GenerationSettings(
        max_new_tokens=body.get("max_tokens", 16), min_new_tokens=body.get("min_tokens", 0),
        temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0),
        min_p=body.get("min_p", 0.0), presence_penalty=body.get("presence_penalty", 0.0),
        frequency_penalty=body.get("frequency_penalty", 0.0), repetition_penalty=body.get("repetition_penalty", 1.0),
        stop=list(body.get("stop", [])), stop_at_eos=not body.get("ignore_eos", False), seed=body.get("seed"),
        num_return_sequences=body.get("n", 1), logprobs=body.get("logprobs"),
        logit_bias={int(k): float(v) for k, v in body.get("logit_bias", {}).items()})


def served_and_library(server, prompt, suffix, **body):
    """The openai client's completion and ``generate_batch``'s completions for the same request."""
    extra = {k: body[k] for k in EXTENSIONS if k in body}
    plain = {k: v for k, v in body.items() if k not in EXTENSIONS}
    out = server.client.completions.create(model="tiny", prompt=prompt, suffix=suffix, extra_body=extra or None,
                                           **plain)
    run = server.run
    expected = generate_batch(run.model, run.tokenizer, [prompt], settings_of(body), [suffix])[0]
    return out, expected


def assert_same(out, expected, prompt_tokens: int) -> None:
    assert [c.text for c in out.choices] == [c.text for c in expected]
    assert [c.finish_reason for c in out.choices] == [c.finish_reason for c in expected]
    assert out.usage.prompt_tokens == prompt_tokens  # the ids the row read: the framed prompt
    assert out.usage.completion_tokens == sum(c.generated_tokens for c in expected)
    for choice, c in zip(out.choices, expected, strict=True):
        if choice.logprobs is not None:
            assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in c.logprobs], abs=1e-5)


REQUESTS = [
    dict(max_tokens=20, seed=3, temperature=0.9),
    dict(max_tokens=20, temperature=0, stop=["e", "o"]),
    dict(max_tokens=12, seed=5, n=2, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"20": 5}),
    dict(max_tokens=15, seed=1, logprobs=2, top_k=8, repetition_penalty=1.2, min_p=0.01, min_tokens=3),
    dict(max_tokens=10, seed=9, ignore_eos=True),
]


@pytest.mark.parametrize("family", ["fim", "glm"])
def test_a_suffix_is_filled_as_generate_batch_fills_it(servers, family):
    server = servers[family]
    run = server.run
    framed = len(prompt_ids(run.model, run.tokenizer, PROMPT, SUFFIX))
    for body in REQUESTS:
        out, expected = served_and_library(server, PROMPT, SUFFIX, **body)
        assert_same(out, expected, framed)
    assert any(c.text for c in out.choices)


@pytest.mark.parametrize("family", ["gpt", "fim", "glm"])
def test_a_prompt_without_suffix_continues_as_generate_batch_continues_it(servers, live, family):
    """A glm reads its prompt bidirectionally (Part A + [gMASK]): the server frames it as the library does."""
    server = servers[family] if family != "gpt" else SimpleNamespace(
        client=openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0, timeout=60),
        run=load_run(live.app.state.served.run.run_dir))
    run = server.run
    framed = len(prompt_ids(run.model, run.tokenizer, PROMPT))
    for body in REQUESTS[:3]:
        out, expected = served_and_library(server, PROMPT, None, **body)
        assert_same(out, expected, framed)


def test_a_glm_chat_reads_the_conversation_as_part_a(servers):
    server = servers["glm"]
    run = server.run
    messages = [{"role": "user", "content": "Speak, speak."}]
    out = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=4)
    settings = GenerationSettings(max_new_tokens=12, seed=4, stop=list(CHAT_STOPS), chat_reply=True)
    [expected] = generate_batch(run.model, run.tokenizer, [render_chat(messages)], settings)[0]
    assert out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == len(prompt_ids(run.model, run.tokenizer, render_chat(messages)))


def test_runs_that_cannot_infill_refuse_a_suffix_by_name(servers, live):
    for url, family in ((live.url, "gpt"), (servers["lstm"].url, "lstm")):
        r = httpx.post(url + "/v1/completions", json={"prompt": "First", "suffix": " end", "max_tokens": 3})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "suffix" and error["type"] == "invalid_request_error"
        assert f"this {family} run cannot fill in the middle" in error["message"]
        assert "train.fim_rate" in error["message"]
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="First", suffix=" end", max_tokens=3)
    assert caught.value.body["param"] == "suffix"


def test_suffix_mistakes_are_400s_naming_the_field(servers):
    url = servers["fim"].url + "/v1/completions"
    cases = [({"suffix": " end", "echo": True}, "echo", "echo with suffix"),
             ({"suffix": 5}, "suffix", "must be a string"),
             ({"suffix": "x" * 300}, "suffix", "at most 200"),
             ({"suffix": "x" * 80}, "suffix", "leaves no room"),
             ({"suffix": "é"}, "suffix", "cannot be encoded")]
    for extra, param, words in cases:
        r = httpx.post(url, json={"prompt": "First", "max_tokens": 3, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
        assert words in r.json()["error"]["message"], (extra, r.text)
    empty = httpx.post(url, json={"prompt": "", "suffix": " end", "max_tokens": 3, "seed": 1}).json()
    assert empty["usage"]["prompt_tokens"] == 3 + len(" end")  # an empty prefix: the sentinels and the suffix


def test_a_glm_echoes_its_prompt_without_a_suffix(servers):
    out = servers["glm"].client.completions.create(model="tiny", prompt="First", max_tokens=4, seed=2, echo=True,
                                                   logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith("First") and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len("First") + out.usage.completion_tokens


@pytest.mark.parametrize("family", ["fim", "glm"])
def test_streamed_fills_are_well_formed_and_join_to_the_whole(servers, family):
    server = servers[family]
    body = dict(model="tiny", prompt=[PROMPT, "O"], suffix=SUFFIX, n=2, max_tokens=16, seed=7, logprobs=1)
    whole = server.client.completions.create(**body)
    texts, finishes, usage = ["", "", "", ""], [None] * 4, None
    for chunk in server.client.completions.create(stream=True, stream_options={"include_usage": True}, **body):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                assert finishes[choice.index] is None  # one finish per choice
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60).text
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_the_model_card_says_whether_the_run_can_infill(servers, live):
    cards = {name: httpx.get(servers[name].url + "/v1/models/tiny").json()["card"] for name in servers}
    cards["gpt"] = httpx.get(live.url + "/v1/models/tiny").json()["card"]
    assert {name: card["infilling"] for name, card in cards.items()} == {
        "fim": "fim", "glm": "blank", "bert": "mask_predict", "lstm": None, "gpt": None}
    assert [name for name, card in cards.items() if not card["left_to_right"]] == ["bert"]


# --- bert: mask-predict ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [None, SUFFIX])
def test_a_bert_writes_its_completions_by_mask_predict(servers, suffix):
    server = servers["bert"]
    for body in (dict(max_tokens=10, seed=3, temperature=0.9), dict(max_tokens=8, seed=1, n=2, top_p=0.9, top_k=10),
                 dict(max_tokens=12, temperature=0, stop=["e"]), dict(max_tokens=6, seed=2, ignore_eos=True)):
        out, expected = served_and_library(server, PROMPT, suffix, **body)
        assert_same(out, expected, expected[0].prompt_tokens)
        assert all(len(c.token_ids) <= body["max_tokens"] for c in expected)


def test_a_bert_refuses_what_mask_predict_cannot_honour_by_name(servers):
    url = servers["bert"].url
    refused = {"logprobs": 1, "echo": True, "presence_penalty": 0.5, "frequency_penalty": 0.5,
               "repetition_penalty": 1.2, "min_p": 0.1, "min_tokens": 2, "logit_bias": {"20": 3},
               "response_format": {"type": "json_object"}}
    for name, value in refused.items():
        r = httpx.post(url + "/v1/completions", json={"prompt": "First", "max_tokens": 3, name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
        assert "mask-predict" in r.json()["error"]["message"]
    neutral = {"echo": False, "presence_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}}
    assert httpx.post(url + "/v1/completions", json={"prompt": "First", "max_tokens": 3, **neutral}).status_code == 200
    too_long = httpx.post(url + "/v1/completions", json={"prompt": "First", "suffix": SUFFIX, "max_tokens": 60})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 400 and "glmlab generate" in chat.json()["error"]["message"]


def test_a_bert_streams_each_text_whole(servers):
    server = servers["bert"]
    body = dict(model="tiny", prompt="First", suffix=SUFFIX, n=2, max_tokens=10, seed=5)
    whole = server.client.completions.create(**body)
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    texts = [c.choices[0] for c in chunks if c.choices]
    assert [(t.index, t.text, t.finish_reason) for t in texts] == [
        (c.index, c.text, c.finish_reason) for c in whole.choices]  # one chunk per choice: its whole text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_bert_needs_no_engine_process(infill_runs, serve_threads):
    """glmlab serve's default engine decodes in a process of its own; a bert has nothing to decode there, so its
    mask-predict runs on the server's model thread, and the answers are the same."""
    app = create_app(load_run(infill_runs["bert"]), replace(OPTIONS, engine="process"))
    assert app.state.served.engine == "thread"
    body = {"prompt": "First", "suffix": SUFFIX, "max_tokens": 8, "seed": 3}
    with LiveServer(app) as server, LiveServer(create_app(load_run(infill_runs["bert"]), OPTIONS)) as thread:
        a = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        b = httpx.post(thread.url + "/v1/completions", json=body, timeout=60).json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_the_engine_process_fills_a_glms_blank_too(infill_runs, servers):
    """The framing happens in the server; the engine process ends a glm's piece at <|endofpiece|> as the thread
    does."""
    body = {"prompt": [PROMPT, "O"], "suffix": SUFFIX, "max_tokens": 16, "seed": 11, "n": 2, "logprobs": 1}
    with LiveServer(create_app(load_run(infill_runs["glm"]), replace(OPTIONS, engine="process"))) as server:
        a = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    b = httpx.post(servers["glm"].url + "/v1/completions", json=body, timeout=60).json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_a_glm_piece_may_fill_the_rest_of_its_context(servers):
    out, expected = served_and_library(servers["glm"], PROMPT, SUFFIX, max_tokens=40, seed=3, ignore_eos=True)
    assert_same(out, expected, 23 + len(SUFFIX))
