"""A property-based fuzz test of the server's JSON surface (issue 22): for any body — well-formed requests with
odd values, unknown fields, wrong types, NaN, huge numbers, lone surrogates, deep nesting, bytes that are not
JSON — every POST endpoint answers without a 5xx, every error is in OpenAI's shape, and afterwards the server
answers a normal request exactly as before. ``pytest --fuzz-examples N`` searches longer (with fresh cases;
the default run is a fixed, derandomised set of a few seconds)."""

from __future__ import annotations

import json
import math

import httpx2 as httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmlab.serve.fields import Limits
from glmlab.serve.protocol import BOOKKEEPING, CHAT_FIELDS, COMPLETION_FIELDS, EXTENSIONS, NEUTRAL, UNSUPPORTED

PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/embeddings"]
FIELDS = sorted(COMPLETION_FIELDS | CHAT_FIELDS | EXTENSIONS | BOOKKEEPING | set(NEUTRAL) | set(UNSUPPORTED)
                | {"response_format", "grammar", "text", "tokens", "add_special_tokens", "input", "encoding_format",
                   "dimensions", "return_token_strs"})
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=24)  # lone surrogates included
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 40)
           | st.floats(allow_nan=True, allow_infinity=True) | ANY_TEXT | st.sampled_from(["First", "", "user"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                      max_leaves=10)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | VALUES,
                                           "content": st.sampled_from(["Hi", ""]) | ANY_TEXT | VALUES}),
                    max_size=3)
PLAUSIBLE = st.fixed_dictionaries({}, optional={  # the fields a request usually has, with likely values
    "prompt": st.sampled_from(["First", "Citizen"]) | ANY_TEXT | st.lists(st.integers(-2, 70), max_size=5) | VALUES,
    "messages": MESSAGES, "max_tokens": st.integers(-1, 8) | VALUES, "n": st.integers(0, 3),
    "stream": st.booleans(), "temperature": st.floats(-1, 3) | VALUES, "logprobs": st.integers(-1, 3) | VALUES,
    "echo": st.booleans(), "stop": st.sampled_from(["e", ["a", "b"], []]) | VALUES, "seed": st.integers(-1, 9),
    "suffix": ANY_TEXT, "tokens": st.lists(st.integers(-2, 70), max_size=5) | VALUES, "input": ANY_TEXT | VALUES})
COMPLETION = st.fixed_dictionaries({"prompt": st.sampled_from(["First", "Citizen", "O"]) | ANY_TEXT},
                                   optional={"max_tokens": st.integers(0, 8), "n": st.integers(1, 3),
                                             "stream": st.booleans(), "temperature": st.floats(0, 2),
                                             "top_p": st.floats(0.01, 1), "logprobs": st.integers(0, 3),
                                             "echo": st.booleans(), "stop": st.sampled_from(["e", ["a", "b"]]),
                                             "seed": st.integers(0, 9), "top_k": st.integers(-1, 5),
                                             "logit_bias": st.dictionaries(st.integers(0, 40).map(str),
                                                                           st.floats(-100, 100), max_size=2)})
CHAT = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant"]), "content": st.sampled_from(["Hi", "O"]) | ANY_TEXT}),
    min_size=1, max_size=3)}, optional={"max_tokens": st.integers(1, 8), "stream": st.booleans(),
                                        "logprobs": st.booleans(), "temperature": st.floats(0, 2)})
WELL_FORMED = st.one_of(st.tuples(st.just("/v1/completions"), COMPLETION), st.tuples(st.just("/v1/chat/completions"),
                        CHAT), st.tuples(st.just("/tokenize"), st.fixed_dictionaries({"prompt": ANY_TEXT})))


def mutated(pair: tuple[str, dict], name: str, value: object) -> tuple[str, bytes]:
    """A well-formed request with one field set to any value."""
    path, body = pair
    return path, json.dumps({**body, name: value}).encode()


BODIES = st.one_of(
    st.builds(lambda likely, extra: {**likely, **extra}, PLAUSIBLE,
              st.dictionaries(st.sampled_from(FIELDS) | ANY_TEXT, VALUES, max_size=3)).map(
        lambda body: json.dumps(body).encode()),
    VALUES.map(lambda value: json.dumps(value).encode()),  # not an object
    st.binary(max_size=64),  # not JSON, or not UTF-8
    st.integers(1, 200).map(lambda depth: b"[" * depth + b"]" * depth),
)


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all(isinstance(json.loads(e), dict) for e in events[:-1])
    else:
        assert isinstance(r.json(), dict)


NORMAL = {"prompt": "First", "max_tokens": 8, "temperature": 0.8, "seed": 5, "logprobs": 2}


def test_no_body_gets_a_5xx_and_the_server_answers_as_before(make_server, request):
    server = make_server(limits=Limits(max_prompt_tokens=200, max_tokens=8, max_n=3, max_body_bytes=64 * 1024))
    before = httpx.post(server.url + "/v1/completions", json=NORMAL).json()["choices"]
    examples = request.config.getoption("--fuzz-examples")
    seen: dict[int, int] = {}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=examples <= 40,
              suppress_health_check=list(HealthCheck))
    @given(request=st.one_of(WELL_FORMED.map(lambda pair: (pair[0], json.dumps(pair[1]).encode())),
                             st.builds(mutated, WELL_FORMED, st.sampled_from(FIELDS), VALUES),
                             st.tuples(st.sampled_from(PATHS), BODIES)))
    def answers(request: tuple[str, bytes]) -> None:
        path, body = request
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        check_answer(r)

    answers()
    assert httpx.get(server.url + "/health").status_code == 200
    after = httpx.post(server.url + "/v1/completions", json=NORMAL).json()["choices"]
    assert after == before and not any(math.isnan(t or 0) for t in after[0]["logprobs"]["token_logprobs"])
    assert seen.get(200, 0) > 0 and sum(n for status, n in seen.items() if status >= 400) > 0, seen  # both kinds met
