"""The OpenAI-compatible API against a live server on 127.0.0.1, through the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx2 as httpx  # the HTTP client the openai package ships with
import pytest

from glmlab.cli import main
from glmlab.errors import GlmlabError
from glmlab.serve.context import ServeOptions
from glmlab.serve.fields import Limits
from tests.serve.conftest import metric, parallel_and_sequential, wait_for

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    card = httpx.get(live.url + "/v1/models/tiny").json()["card"]
    assert card["family"] == "gpt" and card["parameters"] > 0 and card["tokenizer"]["kind"] == "char"
    assert card["metrics"]["steps"] == 40 and card["training_data"]["train_tokens"] > 0


def test_completion_usage_and_finish_reasons(client):
    out = client.completions.create(model="tiny", prompt="First", max_tokens=7, seed=3, temperature=0.8,
                                    top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                    extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                "ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens == 5 and out.usage.total_tokens == 12 and len(choice.text) == 7
    again = client.completions.create(model="tiny", prompt="First", max_tokens=7, seed=3, temperature=0.8,
                                      top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                      extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                  "ignore_eos": True})
    assert again.choices[0].text == choice.text  # same seed, same text
    greedy = client.completions.create(model="tiny", prompt="First", max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0]
    stop = greedy.text[10:12]  # a stop string the greedy text holds: the stopped text ends before its first
    stopped = client.completions.create(model="tiny", prompt="First", max_tokens=40, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert len(greedy.text) == 40 and (stopped.finish_reason, stopped.text) == ("stop",
                                                                               greedy.text[:greedy.text.find(stop)])


def test_list_prompts_and_n(client):
    out = client.completions.create(model="tiny", prompt=["First", "Second"], n=2, max_tokens=6, seed=1,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text != out.choices[1].text  # two samples of one prompt differ
    assert out.usage.prompt_tokens == 5 + 6 and out.usage.completion_tokens == 24


def test_streamed_chunks_join_to_the_whole_text(client):
    kwargs = dict(model="tiny", prompt="First Citizen", max_tokens=40, seed=11, temperature=0.9)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streams_of_several_choices_join_per_index(client):
    kwargs = dict(model="tiny", prompt=["First", "Second"], n=2, max_tokens=12, seed=2, stop=["e"], echo=True)
    whole = client.completions.create(**kwargs)
    texts = ["", "", "", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert texts[0].startswith("First") and texts[2].startswith("Second")


def test_stream_ends_with_done(live):
    body = {"prompt": "First", "max_tokens": 3, "stream": True, "seed": 0}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_chat_template_and_stream(client):
    messages = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Who are you"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=5)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len("System: Speak.\n\nUser: Who are you\n\nAssistant:")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=5,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    lp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=5, logprobs=True,
                                        top_logprobs=2, extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_logprobs_and_echo(client):
    out = client.completions.create(model="tiny", prompt="Fir", max_tokens=3, temperature=0, logprobs=2, echo=True,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith("Fir") and lp.tokens[:3] == ["F", "i", "r"]
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == 6 and lp.text_offset == [0, 1, 2, 3, 4, 5]
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])


def test_tokenize_and_detokenize(live):
    ids = httpx.post(live.url + "/tokenize", json={"prompt": "First"}).json()
    assert ids["count"] == 5 and len(ids["tokens"]) == 5
    assert httpx.post(live.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "First"
    r = httpx.post(live.url + "/detokenize", json={"tokens": [10**6]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


BAD_REQUESTS = [  # (path, body or raw bytes, status, words in the message)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "First", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "First", "temperature": -0.5}, 400, "temperature=-0.5 is out of range"),
    ("/v1/completions", {"prompt": "First", "n": 50}, 400, "--max-n"),
    ("/v1/completions", {"prompt": "First", "max_tokens": 100000}, 400, "400"),
    ("/v1/completions", {"prompt": "F" * 300}, 400, "at most 200"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": []}, 400, "empty list"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt must be"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt is required"),
    ("/v1/completions", {"prompt": "First", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "First", "stop": [1]}, 400, "stop must be"),
    ("/v1/completions", {"prompt": "First", "top_p": 0}, 400, "top_p=0"),
    ("/v1/completions", {"prompt": "First", "seed": -1}, 400, "seed=-1"),
    ("/v1/completions", {"prompt": "First", "logprobs": 99}, 400, "logprobs=99"),
    ("/v1/completions", {"prompt": "Fé", "max_tokens": 2}, 400, "'é'"),
    ("/v1/completions", {"prompt": "x" * 70_000}, 413, "larger than"),
    ("/v1/completions", {"prompt": "First", "stream": "yes"}, 400, "stream must be true or false"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must be"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content must be"),
    ("/v1/vae/sample", {"n": 2}, 404, "need a vae run"),
    ("/v1/nothing", {}, 404, "no endpoint"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_REQUESTS)
def test_mistakes_are_openai_shaped_4xx(live, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]


def test_the_server_keeps_serving_after_mistakes(live, client):
    for path, body, _, _ in BAD_REQUESTS[:6]:
        httpx.post(live.url + path, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert httpx.get(live.url + "/v1/completions").status_code == 405
    assert client.completions.create(model="tiny", prompt="First", max_tokens=2).usage.completion_tokens <= 2
    assert httpx.get(live.url + "/health").status_code == 200


def test_openai_client_raises_the_right_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="First", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="First")


def test_twenty_parallel_requests_equal_their_sequential_results(live, client):
    parallel, sequential = parallel_and_sequential(client, 20)
    assert parallel == sequential
    assert len(set(sequential)) > 10


def test_a_client_that_disconnects_mid_stream_frees_its_slot(make_server):
    server = make_server(limits=Limits(max_tokens=1_000_000))
    body = {"prompt": "First", "max_tokens": 1_000_000, "stream": True, "ignore_eos": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.scheduler.active == 1
    wait_for(lambda: server.scheduler.active == 0)
    assert server.metrics.value("cancelled_sequences_total") == 1
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 2}).status_code == 200


def test_overload_is_answered_429_with_retry_after(make_server):
    server = make_server(max_batch=1, max_queue=1)
    gate = threading.Event()
    server.scheduler.call(gate.wait)  # hold the model thread: requests stay in the queue
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, server.url + "/v1/completions",
                                 json={"prompt": "First", "max_tokens": 2}, timeout=60)
            wait_for(lambda: server.scheduler.queue_depth == 1)
            refused = httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "queue_full" and "--max-queue" in refused.text
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny", prompt="First", max_tokens=2)
            gate.set()
            assert queued.result().status_code == 200  # the queue drained: the waiting request ran
    finally:
        gate.set()
    assert 'status="429"' in httpx.get(server.url + "/metrics").text
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 2}).status_code == 200


def test_a_failed_decoding_step_is_a_503_and_the_server_goes_on(make_server, capsys):
    server = make_server()
    batch = server.scheduler.batch

    def broken(publish=None):
        raise RuntimeError("simulated failure in /home/someone/glmlab/model.py")

    batch.step = broken  # this batch fails; the scheduler starts a fresh one after it
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 3}, timeout=60)
    # the client learns that it failed and when to retry; what failed, and where, goes to the log only
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "simulated" not in r.text and "/home" not in r.text and "retry" in r.json()["error"]["message"]
    assert "simulated failure" in capsys.readouterr().err
    assert server.scheduler.batch is not batch
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and httpx.get(server.url + "/health").status_code == 200


def test_an_api_key_guards_everything_but_health(make_server):
    server = make_server(api_key="sesame")
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
    assert client.completions.create(model="tiny", prompt="First", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_api_keys_are_normalised_at_start_up_and_the_scheme_is_case_insensitive(make_server, trained_run,
                                                                                   capsys, monkeypatch):
    """Issue 22, item 8: a configured key with surrounding spaces matched nothing (the presented key is stripped);
    a non-ASCII key could never be sent; 'bearer' was refused."""
    server = make_server(api_key="s3cret ")
    for header in ("Bearer s3cret", "bearer s3cret", "BEARER   s3cret", "Bearer  s3cret"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in ("Bearer", "Basic s3cret", "Bearers3cret", "Bearer s3cre"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == 401, header
    assert openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0).models.list().data
    with pytest.raises(GlmlabError, match="HTTP header cannot carry"):
        ServeOptions(api_key="clé")
    with pytest.raises(GlmlabError, match="empty"):
        ServeOptions(api_key="  ")
    assert main(["serve", str(trained_run), "--api-key", "clé", "--port", "0"]) == 1
    assert "HTTP header cannot carry" in capsys.readouterr().err
    monkeypatch.setenv("GLMLAB_API_KEY", "n\u00e9e")
    assert main(["serve", str(trained_run), "--port", "0"]) == 1  # the environment's key is checked as well
    assert "HTTP header cannot carry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "GLMLAB_API_KEY environment variable" in " ".join(capsys.readouterr().out.split())


def test_metrics_are_prometheus_text(live, client):
    client.completions.create(model="tiny", prompt="First", max_tokens=3)
    text = httpx.get(live.url + "/metrics").text
    for name in ("glmlab_requests_total", "glmlab_generated_tokens_total", "glmlab_queue_depth",
                 "glmlab_time_to_first_token_seconds_bucket", "glmlab_request_duration_seconds_count",
                 "glmlab_inter_token_latency_seconds_sum"):
        assert name in text
    assert "# TYPE glmlab_time_to_first_token_seconds histogram" in text
    assert metric(live, "glmlab_generated_tokens_total") >= 3


@pytest.fixture(scope="module")
def word_run(tmp_path_factory, shakespeare_excerpt):
    """A tiny gpt over a word tokenizer, a few steps."""
    from glmlab.data.prepare import prepare
    from glmlab.training.trainer import train
    from tests.conftest import tiny_config

    base = tmp_path_factory.mktemp("serve-word")
    prepare([shakespeare_excerpt], base / "data", tokenizer="word", vocab_size=300)
    train(tiny_config("train.max_steps=4", "train.eval_interval=4"), base / "data", base / "run", show_progress=False)
    return base / "run"


@pytest.mark.parametrize("stream", [False, True])
def test_a_word_level_completion_continues_its_prompt_with_its_spaces(make_server, word_run, stream):
    """The text a completion adds reads after its prompt (it lost the space before its first word), and each
    text_offset indexes its token's word in that text."""
    server = make_server(word_run)
    body = {"prompt": "First Citizen:", "max_tokens": 6, "seed": 2, "logprobs": 1, "stream": stream,
            "extra_body": {"ignore_eos": True}}
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = oai.completions.create(model="tiny", **body)
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert len(tokens) == 6 and text.startswith(" ") and text.split() == [t for t in tokens if t.strip()]
    assert all(text[o:].lstrip(" ").startswith(t) for o, t in zip(offsets, tokens, strict=True))
