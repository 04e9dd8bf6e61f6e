"""``glmlab serve --engine process``: the model decoding in a process of its own gives the same answers as
the one-process server, and its failures are clear."""

from __future__ import annotations

import concurrent.futures
from dataclasses import replace

import httpx2 as httpx
import pytest

from glmlab.runs import load_run
from glmlab.serve.app import create_app
from glmlab.serve.engine_process import EngineSpec, ProcessScheduler
from glmlab.serve.fields import Limits
from glmlab.serve.scheduler import SchedulerStopped
from tests.serve.conftest import OPTIONS, LiveServer, metric, parallel_and_sequential, wait_for

REQUESTS = [
    {"prompt": "First", "max_tokens": 12, "seed": 1, "temperature": 0.9},
    {"prompt": ["Citizen", "O"], "max_tokens": 9, "seed": 2, "top_p": 0.8, "n": 2},
    {"prompt": "You are", "max_tokens": 20, "temperature": 0, "stop": ["e"]},
    {"prompt": "Speak", "max_tokens": 15, "seed": 3, "logprobs": 2, "echo": True, "repetition_penalty": 1.2},
]


def _answer(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    return {"choices": data["choices"], "usage": data["usage"]}


@pytest.fixture(scope="module")
def engine_server(trained_run, serve_threads):
    """A server whose model decodes in an engine process (the tiny gpt run, the shared server's options)."""
    app = create_app(load_run(trained_run), replace(OPTIONS, engine="process", limits=Limits(max_tokens=1_000_000)))
    with LiveServer(app) as server:
        yield server


def test_answers_equal_the_one_process_servers(engine_server, live):
    assert isinstance(engine_server.scheduler, ProcessScheduler)
    for body in REQUESTS:
        assert _answer(engine_server.url, body) == _answer(live.url, body), body


def _client(server):
    """The official client (a dev dependency; where it is missing, only the tests that use it are skipped)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_streamed_chunks_join_to_the_whole_text(engine_server):
    client = _client(engine_server)
    whole = client.completions.create(model="tiny", prompt="First", max_tokens=30, seed=7).choices[0].text
    stream = client.completions.create(model="tiny", prompt="First", max_tokens=30, seed=7, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole


def test_parallel_requests_equal_their_sequential_results(engine_server):
    client = _client(engine_server)
    parallel, sequential = parallel_and_sequential(client, 12)
    assert parallel == sequential and len(set(sequential)) > 6


def test_a_client_that_disconnects_frees_its_slot_in_the_engine(engine_server):
    metrics = engine_server.metrics
    cancelled = metrics.value("cancelled_sequences_total")
    body = {"prompt": "First", "max_tokens": 1_000_000, "stream": True, "ignore_eos": True, "seed": 1}
    with httpx.stream("POST", engine_server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: engine_server.scheduler.active == 1)
    wait_for(lambda: engine_server.scheduler.active == 0)  # the engine reports the dropped row
    wait_for(lambda: metrics.value("cancelled_sequences_total") == cancelled + 1)
    assert _answer(engine_server.url, {"prompt": "First", "max_tokens": 2})["usage"]["completion_tokens"] == 2


def test_the_engines_measurements_reach_metrics(engine_server):
    names = ("glmlab_decode_step_seconds_count", "glmlab_time_to_first_token_seconds_count",
             "glmlab_generated_tokens_total")
    before = {name: metric(engine_server, name) for name in names}
    _answer(engine_server.url, {"prompt": "First", "max_tokens": 5, "ignore_eos": True})
    grown = {name: metric(engine_server, name) - before[name] for name in names}
    assert grown["glmlab_generated_tokens_total"] == 5 and grown["glmlab_time_to_first_token_seconds_count"] == 1
    assert grown["glmlab_decode_step_seconds_count"] >= 5  # one per token (the module's other tests are done)


def test_an_engine_that_cannot_load_the_run_is_a_clear_error(tmp_path):
    scheduler = ProcessScheduler(EngineSpec(str(tmp_path / "nothing")), 2, 4, deliver=lambda pairs: None)
    with pytest.raises(SchedulerStopped, match="could not load the run: .*does not exist"):
        scheduler.start()
    assert not scheduler.alive


def test_overload_is_answered_429_by_the_server_process(make_server):
    server = make_server(engine="process", max_batch=1, max_queue=1, limits=Limits(max_tokens=1_000_000))
    long = {"prompt": "First", "max_tokens": 1_000_000, "stream": True, "ignore_eos": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(lines).startswith("data: ")  # the only slot is taken
        wait_for(lambda: server.scheduler.active == 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, server.url + "/v1/completions",
                                 json={"prompt": "First", "max_tokens": 2}, timeout=60)
            wait_for(lambda: server.scheduler.unstarted == 1)
            refused = httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            r.close()  # the long request goes away: the waiting one gets the slot
            assert queued.result().status_code == 200


def test_a_vae_run_serves_from_an_engine_process(vae_run, make_server):
    """Its decoding in the engine; its latent tools on the server's own copy of the model."""
    server = make_server(run_dir=vae_run, engine="process")
    lm = load_run(vae_run)
    assert httpx.post(server.url + "/v1/vae/sample", json={"n": 2, "seed": 4}).json()["samples"] == \
        lm.sample_prior(2, seed=4)
    one = load_run(vae_run)
    with LiveServer(create_app(one, OPTIONS)) as thread_server:
        word = next(w for w in " ".join(lm.sample_prior(4, seed=1)).split() if not w.startswith("<"))
        body = {"prompt": word, "max_tokens": 6, "seed": 3}
        assert _answer(server.url, body) == _answer(thread_server.url, body)
