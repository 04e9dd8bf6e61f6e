"""The HTTP server: an OpenAI-compatible API, tokenizer and VAE endpoints, Prometheus metrics and the web
playground, over one model decoded by the :class:`~glmlab.serve.scheduler.Scheduler` thread (or an engine
process).

``create_app(run, options)`` assembles the FastAPI app from its parts: the shared state every endpoint takes as
a dependency (:mod:`glmlab.serve.context`), one router per concern (:mod:`~glmlab.serve.completions`,
:mod:`~glmlab.serve.embeddings`, :mod:`~glmlab.serve.tokens`, :mod:`~glmlab.serve.latent_routes`,
:mod:`~glmlab.serve.operations`) and the guard every request passes (:mod:`glmlab.serve.guard`); uvicorn runs it
(``glmlab serve``).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from glmlab.runs import LoadedRun
from glmlab.serve import completions, embeddings, latent_routes, operations, tokens
from glmlab.serve.context import Served, ServeOptions
from glmlab.serve.guard import Guard, answer_errors

__all__ = ["ServeOptions", "create_app"]


def create_app(run: LoadedRun, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``run``; the model's scheduler starts and stops with the app's lifespan."""
    served = Served(run, options or ServeOptions())
    app = FastAPI(title="glmlab serve", lifespan=served.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.state.scheduler, app.state.metrics, app.state.options = served.scheduler, served.metrics, served.options
    answer_errors(app)
    for module in (completions, embeddings, tokens, latent_routes, operations):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=str(operations.STATIC)), name="static")
    app.add_middleware(Guard, options=served.options, metrics=served.metrics)
    return app
