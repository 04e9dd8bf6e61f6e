"""The ``/v1/vae/*`` endpoints: a sentence VAE's latent tools (sample, reconstruct, interpolate) over HTTP,
decoded on the model thread; 404 for runs without a latent variable."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glmlab.generation import latent
from glmlab.generation.settings import GenerationSettings
from glmlab.serve.context import Served, ServedDep
from glmlab.serve.fields import APIError, Fields, bad_request

router = APIRouter()


async def _noted(served: Served, fn: Callable[[], list[str]]) -> tuple[list[str], list[str]]:
    """Run ``fn`` on the model thread; its result and its warnings (e.g. words read as <unk>) as notes."""
    def run_noting() -> tuple[list[str], list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
        return result, [str(w.message) for w in caught]

    return await served.on_model_thread(run_noting)


async def _parse(request: Request, served: Served) -> tuple[Fields, GenerationSettings]:
    model = served.model
    if not model.traits.latent_dim:
        raise APIError(404, f"the vae endpoints need a vae run; this run's family is {model.traits.family}",
                         code="not_a_vae")
    f = Fields(await served.body(request))
    served.check_model(f.string("model"))
    longest = max(1, model.block_size - 1)
    settings = GenerationSettings(
        max_new_tokens=f.integer("max_tokens", longest, 1, longest), temperature=f.number("temperature", 0.0, 0.0),
        top_k=max(0, f.integer("top_k", 0, -1, 2**31 - 1)), top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=f.integer("seed", 0, 0, 2**63 - 1))
    return f, settings


def _sentence(f: Fields, name: str) -> str:
    value = f.string(name)
    if value is None or not value.strip():
        raise bad_request(f"{name} must be a non-empty sentence", name, "missing_field")
    return value


@router.post("/v1/vae/sample")
async def vae_sample(request: Request, served: ServedDep) -> JSONResponse:
    f, settings = await _parse(request, served)
    n = f.integer("n", 1, 1, served.limits.max_rows)
    if not f.present("temperature"):
        settings.temperature = 1.0
    model, tokenizer = served.model, served.tokenizer
    texts, notes = await _noted(served, lambda: latent.sample_prior(model, tokenizer, n, seed=settings.seed,
                                                                    settings=settings))
    return JSONResponse({"object": "vae.samples", "samples": texts, "notes": notes})


@router.post("/v1/vae/reconstruct")
async def vae_reconstruct(request: Request, served: ServedDep) -> JSONResponse:
    f, settings = await _parse(request, served)
    value = f.body.get("sentences", f.body.get("text"))
    sentences = [value] if isinstance(value, str) else value
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip()
                                                                   for s in sentences):
        raise bad_request("sentences must be a non-empty sentence or list of them", "sentences", "invalid_type")
    if len(sentences) > served.limits.max_rows:
        raise bad_request(f"{len(sentences)} sentences; at most {served.limits.max_rows} per request", "sentences")
    sample = f.boolean("sample", False)
    model, tokenizer = served.model, served.tokenizer
    texts, notes = await _noted(served, lambda: latent.reconstruct(model, tokenizer, sentences, sample=sample,
                                                                   seed=settings.seed, settings=settings))
    return JSONResponse({"object": "vae.reconstructions", "notes": notes,
                         "reconstructions": [{"input": s, "output": t} for s, t in zip(sentences, texts, strict=True)]})


@router.post("/v1/vae/interpolate")
async def vae_interpolate(request: Request, served: ServedDep) -> JSONResponse:
    f, settings = await _parse(request, served)
    start, end = _sentence(f, "start"), _sentence(f, "end")
    steps = f.integer("steps", 5, 2, served.limits.max_rows)
    model, tokenizer = served.model, served.tokenizer
    texts, notes = await _noted(served, lambda: latent.interpolate(model, tokenizer, start, end, steps=steps,
                                                                   settings=settings))
    return JSONResponse({"object": "vae.interpolation", "start": start, "end": end, "sentences": texts,
                         "notes": notes})
