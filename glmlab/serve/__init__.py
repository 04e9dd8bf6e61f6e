"""``glmlab serve``: an OpenAI-compatible HTTP server with continuous batching, metrics and a web playground.

Modules: :mod:`~glmlab.serve.app` (the FastAPI app, ``create_app``), :mod:`~glmlab.serve.scheduler` (the
model thread: continuous batching), :mod:`~glmlab.serve.protocol` (request checking, OpenAI-shaped errors,
the chat template), :mod:`~glmlab.serve.responses` (response bodies, streamed chunks),
:mod:`~glmlab.serve.latent_routes` (the vae endpoints), :mod:`~glmlab.serve.metrics` (Prometheus text),
:mod:`~glmlab.serve.card` (the model card), :mod:`~glmlab.serve.cli` (the command), ``static/`` (the playground).
"""
