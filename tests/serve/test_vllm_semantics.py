"""Log-probabilities and chat replies as the clients written against vLLM's server read them (lm-evaluation-
harness sums ``token_logprobs[ctxlen:-1]`` of an echoed prompt, taking the last entry for the generated token)."""

from __future__ import annotations

import httpx2 as httpx
import pytest
import torch

from glmlab.generation.chat import CHAT_STOPS, render_chat
from glmlab.generation.text import find_stop
from glmlab.runs import load_run
from tests.conftest import excerpt_lines

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def short_docs(short_docs_run):
    return load_run(short_docs_run)


@pytest.fixture
def short_server(make_server, short_docs_run):
    return make_server(short_docs_run)


def _model_logprobs(run, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, straight from the model's forward pass."""
    with torch.no_grad():
        logp = run.model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _lines_ending_in_eos(run, count: int) -> list[str]:
    """Lines after which the model's greedy next token is ``<eos>``."""
    tok, out = run.tokenizer, []
    for line in excerpt_lines():
        ids = tok.encode(line)
        if len(ids) >= run.model.block_size:
            continue
        with torch.no_grad():
            if run.model(torch.tensor([ids])).float()[0, -1].argmax().item() == tok.eos_id:
                out.append(line)
        if len(out) == count:
            return out
    raise AssertionError("the short-documents model never ends a line with <eos>")


def test_an_echoed_prompt_followed_by_eos_keeps_the_eos_logprob(short_docs, short_server):
    """max_tokens 1, echo, logprobs: the prompt's entries, then the generated <eos>'s (text dropped, counted)."""
    client = openai.OpenAI(base_url=short_server.url + "/v1", api_key="-", max_retries=0)
    tok = short_docs.tokenizer
    for line in _lines_ending_in_eos(short_docs, 3):
        out = client.completions.create(model="tiny", prompt=line, max_tokens=1, temperature=0, echo=True,
                                        logprobs=1)
        choice, lp = out.choices[0], out.choices[0].logprobs
        assert choice.text == line and choice.finish_reason == "stop"
        assert out.usage.completion_tokens == 1 and out.usage.prompt_tokens == len(line)
        assert len(lp.token_logprobs) == len(line) + 1 and lp.tokens[-1] == "<eos>"
        expected = _model_logprobs(short_docs, [*tok.encode(line), tok.eos_id])
        assert lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
        assert lp.text_offset == [*range(len(line)), len(line)]  # <eos> adds no text
        streamed = [c.choices[0] for c in client.completions.create(
            model="tiny", prompt=line, max_tokens=1, temperature=0, echo=True, logprobs=1, stream=True)]
        assert sum((c.logprobs.token_logprobs for c in streamed if c.logprobs), []) == lp.token_logprobs


def test_max_tokens_zero_with_echo_scores_only_the_prompt(short_docs, short_server):
    line = _lines_ending_in_eos(short_docs, 1)[0]
    body = {"prompt": line, "max_tokens": 0, "echo": True, "logprobs": 0}
    out = httpx.post(short_server.url + "/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == line and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0 and len(choice["logprobs"]["tokens"]) == len(line)
    one = httpx.post(short_server.url + "/v1/completions", json={**body, "max_tokens": 1}).json()
    assert one["choices"][0]["logprobs"]["token_logprobs"][:-1] == choice["logprobs"]["token_logprobs"]
    chunks = [line for line in httpx.post(short_server.url + "/v1/completions", json={**body, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    assert len(chunks) == 2  # the echo, then the finish
    refused = httpx.post(short_server.url + "/v1/completions", json={"prompt": line, "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_a_prompt_longer_than_the_context_is_refused_when_every_token_is_scored(short_docs, short_server):
    """echo + logprobs scores each prompt token in one window: a longer prompt is a 400 naming max_model_len
    (never a cut prompt whose entries no longer line up with the echoed text)."""
    block = short_docs.model.block_size
    url = short_server.url + "/v1/completions"
    text = "".join(excerpt_lines())[: 3 * block]
    r = httpx.post(url, json={"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "max_model_len" in error["message"] and f"max_length={block + 2}" in error["message"]
    longest = block + 1  # the first token is scored by nothing: the model reads the other block_size
    fits = httpx.post(url, json={"prompt": text[:longest], "max_tokens": 1, "echo": True, "logprobs": 1}).json()
    lp = fits["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == longest + 1 and lp["text_offset"][:longest] == list(range(longest))
    assert lp["token_logprobs"][1:longest] == pytest.approx(
        _model_logprobs(short_docs, short_docs.tokenizer.encode(text[:longest])).tolist(), abs=1e-4)
    over = httpx.post(url, json={"prompt": text[:longest + 1], "max_tokens": 1, "echo": True, "logprobs": 1})
    assert over.status_code == 400
    plain = httpx.post(url, json={"prompt": text, "max_tokens": 2, "echo": True}).json()  # no scores: cut, go on
    assert plain["choices"][0]["text"].startswith(text) and plain["usage"]["prompt_tokens"] == len(text)


def test_chat_stop_strings_apply_to_the_reply_the_user_sees(live):
    """stop ["\\n"] used to match the newline a model writes right after "Assistant:", before the leading
    whitespace was dropped, so the reply was ''. Each reply must be the raw continuation of the chat's prompt
    (the completions endpoint, same seed) with its leading whitespace dropped, then cut at the first stop."""
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0)
    messages = [{"role": "user", "content": "Speak"}]
    kwargs = dict(model="tiny", max_tokens=30, n=4)
    checked = 0
    for seed in range(12):
        raws = [c.text for c in client.completions.create(prompt=render_chat(messages), seed=seed, **kwargs).choices]
        out = client.chat.completions.create(messages=messages, seed=seed, stop=["\n"], logprobs=True, **kwargs)
        streamed = list(client.chat.completions.create(messages=messages, seed=seed, stop=["\n"], logprobs=True,
                                                       stream=True, **kwargs))
        for raw, choice in zip(raws, out.choices, strict=True):
            reply = raw.lstrip()
            cut = find_stop(reply, ["\n", *CHAT_STOPS])
            content = choice.message.content
            assert content == (reply[:cut] if cut >= 0 else reply)
            assert bytes(b for t in choice.logprobs.content for b in t.bytes) == content.encode()  # they line up
            chunks = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == choice.index]
            assert "".join(c.delta.content or "" for c in chunks) == content
            assert [t.token for c in chunks if c.logprobs for t in c.logprobs.content] == \
                [t.token for t in choice.logprobs.content]
            checked += bool(content) and "\n" in raw[: len(raw) - len(reply)]
    assert checked >= 2, f"only {checked} replies started with a newline"


def test_logit_bias_is_honoured(live):
    """logit_bias used to be refused: +100 all but forces a token, -100 bans one (logprobs stay the model's)."""
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0)
    tok = load_run(live.app.state.served.run.run_dir).tokenizer
    z = tok.encode("z")[0]
    forced = client.completions.create(model="tiny", prompt="First", max_tokens=5, temperature=0,
                                       logit_bias={str(z): 100}, logprobs=0)
    assert forced.choices[0].text == "zzzzz"
    assert all(lp < -0.5 for lp in forced.choices[0].logprobs.token_logprobs)  # unlikely under the model itself
    greedy = client.completions.create(model="tiny", prompt="First", max_tokens=1, temperature=0).choices[0].text
    banned = client.completions.create(model="tiny", prompt="First", max_tokens=1, temperature=0,
                                       logit_bias={str(tok.encode(greedy)[0]): -100}).choices[0].text
    assert banned != greedy


def test_tokenizer_info_and_tokenize_as_lm_eval_reads_them(live, vae_run, make_server):
    """lm-evaluation-harness's remote tokenizer: GET /tokenizer_info must hold eos_token (and bos_token, the
    prefix of its rolling windows), POST /tokenize {"prompt", "add_special_tokens": false} gives the ids."""
    import jinja2

    info = httpx.get(live.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<eos>"  # running text: <eos> starts a document
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast" and info["model_max_length"] == 32
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages,
                                                                              add_generation_prompt=True)
    assert rendered == render_chat(messages)
    ids = httpx.post(live.url + "/tokenize", json={"prompt": "First", "add_special_tokens": False}).json()["tokens"]
    assert ids == httpx.post(live.url + "/tokenize", json={"prompt": "First"}).json()["tokens"] and len(ids) == 5
    assert httpx.post(live.url + "/tokenize", json={"prompt": "<eos>", "add_special_tokens": False}).json()[
        "tokens"] == [3]
    sentences = make_server(vae_run)
    assert httpx.get(sentences.url + "/tokenizer_info").json()["bos_token"] == "<bos>"
    word = load_run(vae_run).tokenizer.hf.id_to_token(6)
    both = httpx.post(sentences.url + "/tokenize", json={"prompt": word}).json()["tokens"]
    bare = httpx.post(sentences.url + "/tokenize", json={"prompt": word, "add_special_tokens": False}).json()
    assert both == [2, *bare["tokens"]]  # a sentence-level model reads <bos> first
    r = httpx.post(live.url + "/tokenize", json={"prompt": "a", "padding": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "padding"


def test_token_ids_that_bring_their_start_token_get_no_second_one(vae_run, make_server):
    """lm-eval's local-completions sends a sentence-level model's <bos> itself (/tokenizer_info declares it):
    the server adds none, so the scores equal those of the text prompt (vLLM takes token ids as given)."""
    server = make_server(vae_run)
    tok = load_run(vae_run).tokenizer
    words = " ".join(tok.hf.id_to_token(i) for i in range(5, 12) if tok.hf.id_to_token(i) != "\n")
    url = server.url + "/v1/completions"
    as_text = httpx.post(url, json={"prompt": words, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    as_ids = httpx.post(url, json={"prompt": [2, *tok.encode(words)], "max_tokens": 0, "echo": True,
                                   "logprobs": 0}).json()
    text_lp = as_text["choices"][0]["logprobs"]["token_logprobs"]
    ids_lp = as_ids["choices"][0]["logprobs"]["token_logprobs"]
    assert ids_lp[0] is None and ids_lp[1:] == pytest.approx(text_lp, abs=1e-5)  # <bos> echoed, then the same
    assert as_ids["usage"]["prompt_tokens"] == as_text["usage"]["prompt_tokens"]


def test_echoed_offsets_index_the_prompt_as_sent(vae_run, make_server):
    """A word tokenizer does not keep a prompt's spacing: the echoed offsets still point into the text sent."""
    server = make_server(vae_run)
    tok = load_run(vae_run).tokenizer
    words = [tok.hf.id_to_token(i) for i in (5, 6, 7)]
    prompt = f"{words[0]}   {words[1]}  {words[2]}"
    out = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "echo": True,
                                                           "logprobs": 0}).json()["choices"][0]
    offsets = out["logprobs"]["text_offset"]
    assert [out["text"][o:o + len(w)] for o, w in zip(offsets, words, strict=False)] == words
    assert all(o >= len(prompt) for o in offsets[3:])


def test_a_request_that_cannot_join_the_batch_fails_alone(make_server, monkeypatch):
    """Anything that goes wrong while admitting a request's rows fails that request, not the server."""
    from glmlab.generation import continuous

    server = make_server(engine="thread")
    original = continuous.Row.__init__

    def row(self, prompt_ids, settings, *args, **kwargs):
        if settings.seed == 666:
            raise RuntimeError("no room for this one")
        original(self, prompt_ids, settings, *args, **kwargs)

    monkeypatch.setattr(continuous.Row, "__init__", row)
    url = server.url + "/v1/completions"
    failed = httpx.post(url, json={"prompt": "First", "max_tokens": 3, "seed": 666})
    assert failed.status_code == 503
    after = httpx.post(url, json={"prompt": "First", "max_tokens": 3, "seed": 1})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
