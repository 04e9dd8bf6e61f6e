"""The ``/v1/vae/*`` endpoints: a sentence VAE's latent tools (sample, reconstruct, interpolate) over HTTP,
decoded on the model thread; 404 for runs of other families."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from glmlab.runs import LoadedRun
from glmlab.serve import protocol as P


def add_vae_endpoints(app: FastAPI, run: LoadedRun, is_vae: bool, body_of: Callable, check_model: Callable,
                       on_model_thread: Callable, limits: P.Limits) -> None:
    """``/v1/vae/sample``, ``/v1/vae/reconstruct``, ``/v1/vae/interpolate`` (404 for other families);
    ``body_of``, ``check_model`` and ``on_model_thread`` are the app's request helpers."""
    from glmlab.generation import latent
    from glmlab.generation.settings import GenerationSettings

    model, tokenizer = run.model, run.tokenizer

    async def noted(fn: Callable[[], list[str]]) -> tuple[list[str], list[str]]:
        """Run ``fn`` on the model thread; its result and its warnings (e.g. words read as <unk>) as notes."""
        def run_noting() -> tuple[list[str], list[str]]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn()
            return result, [str(w.message) for w in caught]

        return await on_model_thread(run_noting)

    async def parse(request: Request) -> tuple[P.Fields, GenerationSettings]:
        if not is_vae:
            raise P.APIError(404, f"the vae endpoints need a vae run; this run's family is "
                                  f"{run.config.model.family}", code="not_a_vae")
        body = await body_of(request)
        f = P.Fields(body)
        check_model(f.string("model"))
        settings = GenerationSettings(
            max_new_tokens=f.integer("max_tokens", max(1, model.block_size - 1), 1, max(1, model.block_size - 1)),
            temperature=f.number("temperature", 0.0, 0.0), top_k=max(0, f.integer("top_k", 0, -1, 2**31 - 1)),
            top_p=f.number("top_p", 1.0, 0.0, 1.0, lo_open=True), seed=f.integer("seed", 0, 0, 2**63 - 1))
        return f, settings

    def sentence(f: P.Fields, name: str) -> str:
        value = f.string(name)
        if value is None or not value.strip():
            raise P.bad_request(f"{name} must be a non-empty sentence", name, "missing_field")
        return value

    @app.post("/v1/vae/sample")
    async def vae_sample(request: Request) -> JSONResponse:
        f, settings = await parse(request)
        n = f.integer("n", 1, 1, limits.max_rows)
        if not f.present("temperature"):
            settings.temperature = 1.0
        texts, notes = await noted(lambda: latent.sample_prior(model, tokenizer, n, seed=settings.seed,
                                                               settings=settings))
        return JSONResponse({"object": "vae.samples", "samples": texts, "notes": notes})

    @app.post("/v1/vae/reconstruct")
    async def vae_reconstruct(request: Request) -> JSONResponse:
        f, settings = await parse(request)
        value = f.body.get("sentences", f.body.get("text"))
        sentences = [value] if isinstance(value, str) else value
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip()
                                                                       for s in sentences):
            raise P.bad_request("sentences must be a non-empty sentence or list of them", "sentences",
                                "invalid_type")
        if len(sentences) > limits.max_rows:
            raise P.bad_request(f"{len(sentences)} sentences; at most {limits.max_rows} per request", "sentences")
        sample = f.boolean("sample", False)
        texts, notes = await noted(lambda: latent.reconstruct(model, tokenizer, sentences, sample=sample,
                                                              seed=settings.seed, settings=settings))
        return JSONResponse({"object": "vae.reconstructions", "notes": notes,
                             "reconstructions": [{"input": s, "output": t} for s, t in zip(sentences, texts,
                                                                                          strict=True)]})

    @app.post("/v1/vae/interpolate")
    async def vae_interpolate(request: Request) -> JSONResponse:
        f, settings = await parse(request)
        start, end = sentence(f, "start"), sentence(f, "end")
        steps = f.integer("steps", 5, 2, limits.max_rows)
        texts, notes = await noted(lambda: latent.interpolate(model, tokenizer, start, end, steps=steps,
                                                              settings=settings))
        return JSONResponse({"object": "vae.interpolation", "start": start, "end": end, "sentences": texts,
                             "notes": notes})
