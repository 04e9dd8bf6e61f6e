"""Embeddings from the library and from ``/v1/embeddings`` (through the ``openai`` client): what each family
pools, OpenAI's shape (float and base64, several inputs, usage) and the mistakes a client can make."""

from __future__ import annotations

import base64

import httpx2 as httpx
import numpy as np
import pytest
import torch

from glmlab.embeddings import embed
from glmlab.errors import GlmlabError
from glmlab.generation.latent import encode_sentences
from glmlab.models import build_model
from glmlab.models.lstm import LSTMConfig
from glmlab.runs import load_run

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def lm(trained_run):
    return load_run(trained_run)


def test_a_gpt_embedding_is_the_mean_of_its_texts_final_hidden_states(lm):
    texts = ["First Citizen", "Before we proceed any further", "a"]
    got = lm.embed(texts)
    for text, vector in zip(texts, got, strict=True):
        with torch.no_grad():
            h = lm.model.features(torch.tensor([lm.tokenizer.encode(text)]))[0]
        assert torch.allclose(vector, torch.nn.functional.normalize(h.mean(0), dim=0), atol=1e-5)
        last = torch.nn.functional.normalize(h[-1], dim=0)
        assert torch.allclose(lm.embed([text], pooling="last")[0], last, atol=1e-5)
    assert got.shape == (3, lm.model.traits.feature_width)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)
    raw = lm.embed(texts, normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3), atol=1e-2)
    assert torch.allclose(lm.embed(texts[:1])[0], got[0], atol=1e-6)  # batching does not change a text's vector


def test_every_family_with_features_or_a_latent_space_embeds(lm):
    lstm = build_model(LSTMConfig(family="lstm", vocab_size=lm.tokenizer.vocab_size, block_size=32, n_embd=16,
                                  n_hidden=24, n_layer=1)).eval()
    assert embed(lstm, lm.tokenizer, ["First", "Citizen"]).shape == (2, 24)
    with pytest.raises(GlmlabError, match="embeds at most 32"):
        lm.embed(["a" * 33])
    with pytest.raises(GlmlabError, match="empty"):
        lm.embed([""])
    with pytest.raises(GlmlabError, match="unknown pooling"):
        lm.embed(["a"], pooling="max")


def test_a_vae_embedding_is_its_posterior_mean(vae_run):
    run = load_run(vae_run)
    words = [run.tokenizer.hf.id_to_token(i) for i in range(5, 15) if run.tokenizer.hf.id_to_token(i) != "\n"]
    sentences = [" ".join(words[:5]), " ".join(words[5:])]  # words the 500-word tokenizer knows
    mu, _ = encode_sentences(run.model, run.tokenizer, sentences)
    got = run.embed(sentences, normalize=False)
    assert got.shape == (2, run.model.traits.latent_dim) and torch.allclose(got, mu, atol=1e-5)
    with pytest.raises(GlmlabError, match="posterior mean"):
        run.embed(sentences, pooling="last")


def test_the_embeddings_endpoint_through_the_openai_client(live, lm):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="-", max_retries=0)
    texts = ["First Citizen", "Speak, speak."]
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    expected = lm.embed(texts)
    assert [d.index for d in floats.data] == [0, 1] and floats.object == "list" and floats.model == "tiny"
    for f, b, e in zip(floats.data, packed.data, expected, strict=True):
        assert f.embedding == pytest.approx(e.tolist(), abs=1e-5) and b.embedding == pytest.approx(f.embedding)
    tokens = sum(len(lm.tokenizer.encode(t)) for t in texts)
    assert floats.usage.prompt_tokens == tokens == floats.usage.total_tokens
    by_ids = client.embeddings.create(model="tiny", input=[lm.tokenizer.encode(t) for t in texts],
                                      encoding_format="float")
    assert by_ids.data[1].embedding == pytest.approx(floats.data[1].embedding, abs=1e-6)
    raw = httpx.post(live.url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(floats.data[1].embedding, abs=1e-7)
    last = httpx.post(live.url + "/v1/embeddings", json={"input": "First", "pooling": "last"}).json()
    assert last["data"][0]["embedding"] == pytest.approx(lm.embed(["First"], pooling="last")[0].tolist(), abs=1e-5)


@pytest.mark.parametrize("body, param, words", [
    ({"input": "a" * 40}, "input", "max_model_len"),
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty list"),
    ({"input": "First", "dimensions": 8}, "dimensions", "cannot be shortened"),
    ({"input": "First", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": "First", "pooling": "max"}, "pooling", "unknown pooling"),
    ({"input": "First", "truncate": True}, "truncate", "unknown parameter"),
    ({"input": "Fé"}, "input", "cannot encode"),
])
def test_embedding_mistakes_are_400s_naming_the_field(live, body, param, words):
    r = httpx.post(live.url + "/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_a_vae_run_serves_its_latent_means(make_server, vae_run):
    server = make_server(vae_run)
    word = load_run(vae_run).tokenizer.hf.id_to_token(6)
    ok = httpx.post(server.url + "/v1/embeddings", json={"input": f"{word} {word}"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 4
