"""The HTTP server: an OpenAI-compatible API, tokenizer and VAE endpoints, Prometheus metrics and the web
playground, over one model decoded by the :class:`~glmlab.serve.scheduler.Scheduler` thread.

``create_app(run, options)`` builds the FastAPI app; uvicorn runs it (``glmlab serve``). Every error is
answered in OpenAI's shape with a 4xx status (5xx only for the server's own faults), and the server
keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmlab.errors import GlmlabError
from glmlab.generation.engine import TokenLogprob, start_id
from glmlab.runs import LoadedRun
from glmlab.serve import protocol as P
from glmlab.serve import responses as R
from glmlab.serve.card import model_card
from glmlab.serve.engine_process import EngineSpec, ProcessScheduler
from glmlab.serve.latent_routes import add_vae_endpoints
from glmlab.serve.metrics import server_metrics
from glmlab.serve.scheduler import Job, QueueFull, Scheduler, SchedulerStopped

OPEN_PATHS = ("/health",)  # answered without an API key
STATIC_PREFIXES = ("/static/",)  # the playground's files: no data in them; its API calls carry the key


@dataclass(frozen=True)
class ServeOptions:
    """``glmlab serve`` settings (see its --help)."""

    model_name: str = "glmlab"
    api_key: str | None = None
    max_batch: int = 32  # sequences decoded together (cache slots)
    max_queue: int = 256  # requests waiting for a slot before 429
    limits: P.Limits = P.Limits()
    checkpoint: str = "best"
    retry_after: int = 1  # seconds, in a 429's Retry-After
    engine: str = "thread"  # "process": the model decodes in a process of its own (glmlab serve's default)
    decode_weights: str = "native"  # what the engine process decodes with (glmlab serve --decode-weights)
    engine_device: str | None = None  # where the engine process decodes; None: the served model's device


class _Guard:
    """ASGI middleware: API-key check, body-size check and per-request metrics, without touching
    streaming (a plain ASGI wrapper, not BaseHTTPMiddleware)."""

    def __init__(self, app: Any, options: ServeOptions, metrics: Any) -> None:
        self.app, self.options, self.metrics = app, options, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started = scope["path"], time.perf_counter()
        status = {"code": 500}
        endpoint = path if path in _ENDPOINTS else "other"

        async def send_and_measure(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        error = self._refusal(scope)
        try:
            if error is not None:
                await _error_response(error)(scope, receive, send_and_measure)
            else:
                await self.app(scope, receive, send_and_measure)
        finally:
            self.metrics.inc("requests_total", endpoint=endpoint, status=str(status["code"]))
            self.metrics.observe("request_duration_seconds", time.perf_counter() - started, endpoint=endpoint)

    def _refusal(self, scope: dict) -> P.APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.options.limits.max_body_bytes:
            return P.too_large(self.options.limits)
        key, path = self.options.api_key, scope["path"]
        if key is None or path in OPEN_PATHS or path == "/" or path.startswith(STATIC_PREFIXES):
            return None
        given = headers.get("authorization", "")
        if not given.startswith("Bearer "):
            return P.APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                              "invalid_request_error", code="missing_api_key")
        if not secrets.compare_digest(given[len("Bearer "):].strip().encode(), key.encode()):
            return P.APIError(401, "the API key is wrong: send the key given to glmlab serve --api-key",
                              "invalid_request_error", code="invalid_api_key")
        return None


_ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
              "/detokenize", "/v1/vae/sample", "/v1/vae/reconstruct", "/v1/vae/interpolate"}


def _error_response(error: P.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` runs however the response ends (done, or the client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:  # the client went away while we were writing
            pass
        finally:
            self.on_close()


def create_app(run: LoadedRun, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``run``; the model thread starts and stops with the app's lifespan."""
    options = options or ServeOptions()
    model, tokenizer, limits = run.model, run.tokenizer, options.limits
    model.eval()
    loops: list[asyncio.AbstractEventLoop] = []  # the server's event loop, once it runs

    def put_all(pairs: list[tuple[Job, Any]]) -> None:
        for job, items in pairs:
            job.sink.put_nowait(items)

    def deliver(pairs: list[tuple[Job, Any]]) -> None:
        """From the model thread: one wake-up of the event loop per step, for every request at once."""
        if not pairs:  # a step that only dropped cancelled requests: nothing to hand over
            return
        with contextlib.suppress(RuntimeError, IndexError):  # no loop (any more): nobody is listening
            loops[0].call_soon_threadsafe(put_all, pairs)

    scheduler: Scheduler | ProcessScheduler
    if options.engine == "process":
        spec = EngineSpec(str(run.run_dir), options.checkpoint,
                          options.engine_device or str(next(model.parameters()).device), options.decode_weights,
                          torch.get_num_threads())
        scheduler = ProcessScheduler(spec, options.max_batch, options.max_queue, deliver)
    elif options.engine == "thread":
        scheduler = Scheduler(model, tokenizer, options.max_batch, options.max_queue, deliver)
    else:
        raise GlmlabError(f"unknown engine {options.engine!r}", "use 'process' or 'thread'")
    metrics = server_metrics(lambda: scheduler.queue_depth, lambda: scheduler.active, options.max_batch)
    scheduler.metrics = metrics
    card = model_card(run, options.model_name, options.checkpoint)
    start = start_id(model, tokenizer)
    vocab = model.config.vocab_size
    is_vae = model.traits.latent_dim > 0

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loops[:] = [asyncio.get_running_loop()]
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="glmlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.options = scheduler, metrics, options

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, exc: P.APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no endpoint {request.url.path}; see GET /v1/models, POST /v1/completions, "
                        "POST /v1/chat/completions", 405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(P.APIError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(P.APIError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error",
                                          code="internal_error"))

    async def body_of(request: Request) -> dict[str, Any]:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise P.too_large(limits)
            chunks.append(chunk)
        return P.parse_json(b"".join(chunks), limits)

    def check_model(name: str | None) -> None:
        if name is not None and name != options.model_name:
            raise P.APIError(404, f"the model {name!r} does not exist here; this server serves "
                                  f"{options.model_name!r} (GET /v1/models)", param="model", code="model_not_found")

    def model_object() -> dict[str, Any]:
        return {"id": options.model_name, "object": "model", "created": int(run.run_dir.stat().st_mtime),
                "owned_by": "glmlab", "max_model_len": model.block_size}

    def submit(rows: list[tuple[list[int], Any, int]]) -> tuple[Job, asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(rows, queue)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise P.APIError(429, f"the server is busy: {options.max_queue} requests are waiting already "
                                  f"(glmlab serve --max-queue); retry after {options.retry_after} s",
                             "rate_limit_error", code="queue_full",
                             headers={"Retry-After": str(options.retry_after)}) from None
        except SchedulerStopped as exc:
            raise unavailable(exc) from None
        return job, queue

    def unavailable(exc: BaseException) -> P.APIError:
        return P.APIError(503, f"the model is not available: {exc}", "server_error", code="unavailable",
                          headers={"Retry-After": str(options.retry_after)})

    async def on_model_thread(fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(scheduler.call(fn))
        except QueueFull:
            raise P.APIError(429, "the server is busy; retry later", "rate_limit_error", code="queue_full",
                             headers={"Retry-After": str(options.retry_after)}) from None
        except SchedulerStopped as exc:
            raise unavailable(exc) from None
        except GlmlabError as exc:
            raise P.bad_request(exc.problem) from None

    def rows_of(req: P.GenerationRequest) -> list[tuple[list[int], Any, int]]:
        return [(p.ids, req.settings, j) for p in req.prompts for j in range(req.n)]

    async def echo_logprobs(req: P.GenerationRequest) -> list[list[TokenLogprob]]:
        if not (req.echo and req.logprobs is not None):
            return [[] for _ in req.prompts]
        return await on_model_thread(lambda: [_prompt_logprobs(model, tokenizer, p.ids, req.logprobs, start)
                                              for p in req.prompts])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not scheduler.alive:
            raise unavailable(RuntimeError(scheduler.failure or "the model thread is not running"))
        return JSONResponse({"status": "ok", "model": options.model_name})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_object()]})

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> JSONResponse:
        check_model(name)
        return JSONResponse({**model_object(), "card": card})

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await body_of(request)
        check_model(P.Fields(body).string("model"))
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise P.bad_request("prompt must be a string", "prompt", "invalid_type")
        try:
            ids = tokenizer.encode_checked(text)
        except GlmlabError as exc:
            raise P.bad_request(exc.problem, "prompt", "unencodable_prompt") from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": model.block_size,
                             "token_strs": [tokenizer.decode([i], skip_special_tokens=False) for i in ids]})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await body_of(request)
        check_model(P.Fields(body).string("model"))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise P.bad_request("tokens must be a list of token ids", "tokens", "invalid_type")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise P.bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens",
                                "invalid_value")
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        check_model(P.Fields(body).string("model"))
        req = P.completion_request(body, tokenizer, model.block_size, vocab, start, limits)
        return await generate(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await body_of(request)
        check_model(P.Fields(body).string("model"))
        req = P.chat_request(body, tokenizer, model.block_size, vocab, start, limits)
        return await generate(request, req)

    async def generate(request: Request, req: P.GenerationRequest) -> Response:
        prompt_lp = await echo_logprobs(req)
        metrics.inc("prompt_tokens_total", sum(p.tokens for p in req.prompts))
        job, queue = submit(rows_of(req))
        if req.stream:
            events = R.event_stream(req, queue, prompt_lp, options.model_name)
            return _EventStream(events, lambda: scheduler.cancel(job))
        try:
            results = await _collect(request, queue, len(job.rows))
        except _ClientGone:
            scheduler.cancel(job)
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 — the batch failed: answer, keep serving
            raise unavailable(exc) from None
        finally:
            scheduler.cancel(job)  # a no-op once every row finished
        return JSONResponse(R.completion_body(req, results, prompt_lp, options.model_name))

    static = resources.files("glmlab.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(str(static / "index.html"), headers={"Cache-Control": "no-cache"})

    add_vae_endpoints(app, run, is_vae, body_of, check_model, on_model_thread, limits)
    app.add_middleware(_Guard, options=options, metrics=metrics)
    return app


class _ClientGone(Exception):
    pass


async def _collect(request: Request, queue: asyncio.Queue, rows: int) -> dict[int, Any]:
    """Every row's completion, watching for the client going away (then :class:`_ClientGone`)."""
    done: dict[int, Any] = {}
    while len(done) < rows:
        try:
            items = await asyncio.wait_for(queue.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                raise _ClientGone from None
            continue
        if isinstance(items, BaseException):
            raise items
        for row, event in items:
            if event.completion is not None:
                done[row] = event.completion
    return done


@torch.inference_mode()
def _prompt_logprobs(model: Any, tokenizer: Any, ids: list[int], k: int, start: int | None,
                     ) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (the first has none), for echo."""
    device = next(model.parameters()).device
    logp = model(torch.tensor([ids], device=device)).float().log_softmax(-1)[0]
    out: list[TokenLogprob] = []
    for i, token in enumerate(ids):
        if start is not None and i == 0:
            continue  # the start token is not part of the prompt's text
        text = tokenizer.decode([token], skip_special_tokens=False)
        if i == 0:  # nothing before it: no log-probability (OpenAI's null)
            out.append(TokenLogprob(token, text, None, []))  # type: ignore[arg-type]
            continue
        top = []
        if k:
            values, top_ids = logp[i - 1].topk(k)
            top = [(int(t), tokenizer.decode([int(t)], skip_special_tokens=False), float(v))
                   for v, t in zip(values, top_ids, strict=True)]
        out.append(TokenLogprob(token, text, float(logp[i - 1, token]), top))
    return out
