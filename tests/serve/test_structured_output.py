"""Structured output through the clients users bring (the ``openai`` client's pydantic helpers), and the rule
that every request parameter OpenAI documents is honoured or refused with a 400 naming it."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx2 as httpx
import pytest
from pydantic import BaseModel, Field

from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.runs import load_run
from glmlab.serve.app import create_app
from glmlab.serve.protocol import BOOKKEEPING, CHAT_FIELDS, COMPLETION_FIELDS, STRUCTURED_FIELDS
from glmlab.training.trainer import train
from tests.serve.conftest import OPTIONS, LiveServer

openai = pytest.importorskip("openai")


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "Rome", "Verona"]
    titles: list[Literal["lord", "lady", "sir"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def bpe_server(tmp_path_factory, shakespeare_excerpt, serve_threads):
    """A tiny gpt on a byte-level BPE tokenizer (which spells any text), served."""
    base = tmp_path_factory.mktemp("bpe")
    prepare([shakespeare_excerpt], base / "data", tokenizer="bpe", vocab_size=400)
    config = resolve_config({}, ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=128",
                                 "train.max_steps=10", "train.eval_interval=10", "train.batch_size=8",
                                 "train.sample_tokens=0", "train.eval_tokens=512"])
    train(config, base / "data", base / "run", show_progress=False)
    with LiveServer(create_app(load_run(base / "run"), OPTIONS)) as server:
        yield server


@pytest.fixture(scope="module")
def client(bpe_server):
    return openai.OpenAI(base_url=bpe_server.url + "/v1", api_key="-", max_retries=0, timeout=60)


def test_the_openai_clients_pydantic_helper_gets_a_valid_object_every_time(client):
    for seed in range(12):
        out = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Who are you?"}],
                                            response_format=Person, seed=seed, max_tokens=120, temperature=1.0)
        choice = out.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person), choice.message.content
        assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_json_object_and_gbnf_on_completions_and_streams(client):
    schema = {"name": "person", "schema": Person.model_json_schema()}
    for seed in range(6):
        text = client.completions.create(model="tiny", prompt="First Citizen:", max_tokens=120, seed=seed,
                                         extra_body={"response_format": {"type": "json_schema",
                                                                         "json_schema": schema}}).choices[0].text
        Person.model_validate_json(text)
        anything = client.completions.create(model="tiny", prompt="First", max_tokens=400, seed=seed, temperature=0.7,
                                             extra_body={"response_format": {"type": "json_object"}}).choices[0]
        if anything.finish_reason == "stop":  # a free object may run past max_tokens; when it ends, it parses
            assert isinstance(json.loads(anything.text), dict)
        gbnf = 'root ::= ("yes" | "no") ", " [0-9] [0-9]? "."'
        said = client.completions.create(model="tiny", prompt="Answer:", max_tokens=20, seed=seed,
                                         extra_body={"grammar": gbnf}).choices[0].text
        assert re.fullmatch(r"(yes|no), [0-9][0-9]?\.", said), said
        streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=120, seed=seed, stream=True,
                                                  response_format={"type": "json_schema", "json_schema": schema})
        Person.model_validate_json("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))


def test_structured_output_mistakes_are_400s_naming_the_field(bpe_server, live, make_server, vae_run):
    bad = [({"response_format": {"type": "xml"}}, "response_format", "must be"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
           ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            "response_format", "cannot be compiled"),
           ({"grammar": "root ::= ("}, "grammar", "cannot be compiled"),
           ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "not both")]
    for extra, param, words in bad:
        r = httpx.post(bpe_server.url + "/v1/completions", json={"prompt": "a", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    char = httpx.post(live.url + "/v1/completions", json={"prompt": "a", "response_format": {"type": "json_object"}})
    assert char.status_code == 400 and "cannot write" in char.json()["error"]["message"]  # no '{' in Shakespeare
    word = httpx.post(make_server(vae_run).url + "/v1/completions",
                      json={"prompt": "the", "response_format": {"type": "json_object"}})
    assert word.status_code == 400 and "char or bpe tokenizer" in word.json()["error"]["message"]


# One value per parameter of OpenAI's request types that asks for something (not the neutral default).
CHAT_VALUES = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"5": 1}, "logprobs": True,
    "max_completion_tokens": 3, "max_tokens": 3, "metadata": {"k": "v"}, "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"}, "n": 2, "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0.5, "prompt_cache_key": "k",
    "prompt_cache_options": {"mode": "explicit"}, "prompt_cache_retention": "24h", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "user-1", "seed": 1, "service_tier": "priority",
    "stop": ["\n"], "store": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}], "top_logprobs": 2,
    "top_p": 0.9, "user": "user-1", "verbosity": "low", "web_search_options": {},
}
COMPLETION_VALUES = {
    "best_of": 3, "echo": True, "frequency_penalty": 0.5, "logit_bias": {"5": 1}, "logprobs": 2, "max_tokens": 3,
    "n": 2, "presence_penalty": 0.5, "seed": 1, "stop": ["\n"], "stream": True,
    "stream_options": {"include_usage": True}, "suffix": " end", "temperature": 0.5, "top_p": 0.9, "user": "user-1",
}
NEEDS = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True}}


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_documented_parameter_is_honoured_or_refused_by_name(bpe_server, chat):
    from openai.types import completion_create_params as completion_types
    from openai.types.chat import completion_create_params as chat_types

    documented = set((chat_types if chat else completion_types).CompletionCreateParamsBase.__annotations__) | {
        "stream"}
    values = CHAT_VALUES if chat else COMPLETION_VALUES
    base = {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"}
    missing = documented - set(values) - set(base) - {"model"}
    assert not missing, f"decide how the server answers these new OpenAI parameters: {sorted(missing)}"
    honoured = (CHAT_FIELDS if chat else COMPLETION_FIELDS) | STRUCTURED_FIELDS | BOOKKEEPING
    honoured -= {"suffix"}  # honoured by runs that can fill in the middle (tests/serve/test_infill.py), not this gpt
    url = bpe_server.url + ("/v1/chat/completions" if chat else "/v1/completions")
    for name, value in values.items():
        r = httpx.post(url, json={**base, "max_tokens": 3, **NEEDS.get(name, {}), name: value}, timeout=60)
        if name in honoured:
            assert r.status_code == 200, (name, r.text)
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)


def test_the_engine_process_follows_grammars_too(bpe_server):
    """glmlab serve's default engine decodes in a process of its own: the grammar crosses to it."""
    from dataclasses import replace

    run_dir = bpe_server.app.state.served.run.run_dir
    with LiveServer(create_app(load_run(run_dir), replace(OPTIONS, engine="process"))) as server:
        body = {"prompt": "Answer:", "max_tokens": 20, "seed": 3, "grammar": 'root ::= ("yes" | "no") "!"'}
        out = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    assert out["choices"][0]["text"] in ("yes!", "no!") and out["choices"][0]["finish_reason"] == "stop"
