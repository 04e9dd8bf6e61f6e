"""A vae run's latent tools over HTTP (/v1/vae/sample, /reconstruct, /interpolate), and its playground view."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from glmlab.runs import load_run
from glmlab.serve.app import create_app
from tests.serve.conftest import OPTIONS, LiveServer


@pytest.fixture(scope="module")
def server(vae_run, serve_threads):
    with LiveServer(create_app(load_run(vae_run), OPTIONS)) as live:
        yield live


def test_latent_endpoints_match_the_library(server, vae_run):
    lm = load_run(vae_run)
    url = server.url + "/v1/vae"
    sampled = httpx.post(url + "/sample", json={"n": 3, "seed": 4}).json()["samples"]
    assert sampled == lm.sample_prior(3, seed=4)
    with pytest.warns(UserWarning, match="<unk>"):
        expected = lm.reconstruct(["the king is dead", "i love you"])
        path_expected = lm.interpolate("the king is dead", "i love you", steps=4)
    rec = httpx.post(url + "/reconstruct", json={"sentences": ["the king is dead", "i love you"]}).json()
    assert [r["output"] for r in rec["reconstructions"]] == expected
    assert "read as <unk>" in rec["notes"][0]  # a note for the client, not a warning in the server's log
    path = httpx.post(url + "/interpolate", json={"start": "the king is dead", "end": "i love you", "steps": 4})
    assert path.json()["sentences"] == path_expected
    card = httpx.get(server.url + "/v1/models/" + server.app.state.options.model_name).json()["card"]
    assert card["family"] == "vae" and card["latent"]


@pytest.mark.parametrize("path, body, words", [
    ("/interpolate", {"start": "the king", "steps": 3}, "end must be a non-empty sentence"),
    ("/interpolate", {"start": "the king", "end": "a", "steps": 1}, "steps=1"),
    ("/reconstruct", {"sentences": []}, "sentences must be"),
    ("/sample", {"n": 0}, "n=0"),
    ("/sample", {"temperature": -1}, "temperature"),
])
def test_latent_mistakes_are_400(server, path, body, words):
    r = httpx.post(server.url + "/v1/vae" + path, json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/vae/sample", json={"n": 1}).status_code == 200


def test_echoed_prompt_logprobs_of_a_vae_are_given_the_prior_centre_its_completions_start_from(server, vae_run):
    """The echo path scores the prompt with the model itself; a vae without a z used to answer 500 here."""
    import torch

    lm = load_run(vae_run)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "I am", "max_tokens": 1, "echo": True,
                                                         "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode("I am")]
    with torch.no_grad():  # the decoder from the prior's centre, as the server's completions are decoded
        logp = lm.model(torch.tensor([ids]), lm.model.new_cache(1, torch.device("cpu"))).log_softmax(-1)[0]
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert choice["logprobs"]["token_logprobs"][:len(expected)] == pytest.approx(expected, abs=1e-5)
    assert choice["text"].startswith("I am")
