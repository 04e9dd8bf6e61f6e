"""What every endpoint of the server shares, handed to the routers as a FastAPI dependency (:func:`served`).

A :class:`Served` holds the run, the server's options, the scheduler that owns the model (a thread, or an
engine process) and the metrics, and the request helpers every route needs: reading a body within the size
limit, checking the model name, submitting rows to the scheduler, running other model work on its thread, and
turning the scheduler's refusals into OpenAI-shaped errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from starlette.requests import ClientDisconnect

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.engine import start_id
from glmlab.models.contract import LanguageModel
from glmlab.runs import LoadedRun
from glmlab.serve.card import model_card
from glmlab.serve.engine_process import EngineSpec, ProcessScheduler
from glmlab.serve.fields import APIError, Limits, bad_request, parse_json, too_large
from glmlab.serve.http import ConnectionLimits
from glmlab.serve.metrics import Metrics, server_metrics
from glmlab.serve.scheduler import Job, QueueFull, Scheduler, SchedulerStopped

log = logging.getLogger("glmlab.serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the names a browser uses for this machine
ANY_HOST = "*"

@dataclass(frozen=True)
class ServeOptions:
    """``glmlab serve`` settings (see its --help)."""

    model_name: str = "glmlab"
    api_key: str | None = None
    max_batch: int = 32  # sequences decoded together (cache slots)
    max_queue: int = 256  # requests waiting for a slot before 429
    limits: Limits = Limits()
    checkpoint: str = "best"
    retry_after: int = 1  # seconds, in a 429's Retry-After
    engine: str = "thread"  # "process": the model decodes in a process of its own (glmlab serve's default;
    # a model that does not decode left to right, a bert, has nothing to decode there: its thread runs mask-predict)
    decode_weights: str = "native"  # what the engine process decodes with (glmlab serve --decode-weights)
    compile_decode: bool = False  # decode through steps compiled ahead of time, for every batch size the server's
    # continuous batch steps with, compiled (or loaded) before it takes requests (glmlab serve --compile-decode)
    engine_device: str | None = None  # where the engine process decodes; None: the served model's device
    engine_restarts: int = 3  # deaths of the engine process within a minute that are restarted; then it gives up
    connection: ConnectionLimits = ConnectionLimits()  # a request's head size and read timeouts
    # the Host (and Origin) names requests may carry: a page on another site, or a name rebound to this address,
    # cannot use a server meant for this machine; ("*",) allows any (glmlab serve --allowed-hosts)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS

    def __post_init__(self) -> None:
        if self.api_key is not None:
            object.__setattr__(self, "api_key", checked_api_key(self.api_key))
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower().strip("[]") for h in self.allowed_hosts
                                                        if h.strip()))


def checked_api_key(key: str) -> str:
    """The key as clients can send it: without surrounding whitespace (clients and the guard strip what they
    send), and only printable ASCII, which is what an HTTP header (and the openai client) carries."""
    stripped = key.strip()
    if not stripped:
        raise GlmlabError("the API key is empty", "give a key, or serve without one")
    bad = sorted({c for c in stripped if not (" " <= c <= "~")})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise GlmlabError(f"the API key holds characters an HTTP header cannot carry ({shown}); no client could "
                          "send it", "use printable ASCII characters only")
    return stripped


@dataclass
class Served:
    """The server's shared state and request helpers (see the module docstring)."""

    run: LoadedRun
    options: ServeOptions
    scheduler: Scheduler | ProcessScheduler = field(init=False)
    engine: str = field(init=False)  # what runs the model: "process" or "thread" (see ServeOptions.engine)
    metrics: Metrics = field(init=False)
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once it runs

    def __post_init__(self) -> None:
        run, options = self.run, self.options
        run.model.eval()
        # mask-predict runs as model calls, on the model's thread: an engine process would have nothing to decode
        self.engine = options.engine if run.model.traits.left_to_right else "thread"
        if options.compile_decode:
            self._check_compile_decode()
        if self.engine == "process":
            spec = EngineSpec(str(run.run_dir), options.checkpoint, options.engine_device or str(run.device),
                              options.decode_weights, torch.get_num_threads(), options.compile_decode)
            self.scheduler = ProcessScheduler(spec, options.max_batch, options.max_queue, self.deliver,
                                              max_restarts=options.engine_restarts)
        elif self.engine == "thread":
            self.scheduler = Scheduler(run.model, run.tokenizer, options.max_batch, options.max_queue, self.deliver)
        else:
            raise GlmlabError(f"unknown engine {options.engine!r}", "use 'process' or 'thread'")
        self.metrics = server_metrics(lambda: self.scheduler.queue_depth, lambda: self.scheduler.active,
                                      options.max_batch)
        self.scheduler.metrics = self.metrics
        self.card = model_card(run, options.model_name, options.checkpoint)
        self.start = start_id(run.model, run.tokenizer)  # what every prompt starts with (<bos>, or nothing)

    def _check_compile_decode(self) -> None:
        """Refuse --compile-decode where it cannot run, here rather than in the engine; with the model decoding in
        this process, compile its steps now, before any request waits for one."""
        run, options = self.run, self.options
        device = options.engine_device if self.engine == "process" and options.engine_device else str(run.device)
        if not device.startswith("cpu"):
            raise GlmlabError(f"--compile-decode compiles a CPU step; this server decodes on {device}",
                              "drop --compile-decode, or serve with --device cpu")
        if self.engine == "process" and options.decode_weights != "native":  # (what the engine would decode with)
            raise GlmlabError(f"--compile-decode compiles the native-weight step, not the {options.decode_weights} one",
                              f"choose one of --compile-decode and --decode-weights {options.decode_weights}")
        run.use_compiled_decode()  # (the family's and int8 weights' refusals; the engine process's copy decodes)
        if self.engine == "thread":
            run.model.prepare_compiled_decode(options.max_batch)

    @property
    def model(self) -> LanguageModel:
        return self.run.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.run.tokenizer

    @property
    def limits(self) -> Limits:
        return self.options.limits

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The model's scheduler runs while the app does."""
        self.loop = asyncio.get_running_loop()
        self.scheduler.start()
        try:
            yield
        finally:
            self.scheduler.stop()

    # --- from the model thread ----------------------------------------------------------------------------

    def deliver(self, pairs: list[tuple[Job, Any]]) -> None:
        """One wake-up of the event loop per step, for every request at once (each job's sink is its queue)."""
        if not pairs or self.loop is None:  # a step that only dropped cancelled requests; or no loop yet
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(_put_all, pairs)

    # --- for the endpoints --------------------------------------------------------------------------------

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read within the body-size limit. Only a body sent as JSON is read: a form
        or ``text/plain`` POST is what any web page may send to this machine without asking (a "simple request").
        A client that goes away before its body ends is answered 499 (nobody reads it), one log line."""
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json', not "
                                f"{media_type or 'without a Content-Type'} (curl: -H 'Content-Type: application/json')",
                           code="unsupported_media_type")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.limits.max_body_bytes:
                    raise too_large(self.limits)
                chunks.append(chunk)
        except ClientDisconnect:
            if request.scope.get("glmlab.timed_out"):  # the connection answered 408 already (glmlab.serve.http)
                raise APIError(408, "the request body stopped arriving", code="request_timeout") from None
            log.warning("a client went away before sending its whole body (%s of %s bytes): 499", size,
                     request.headers.get("content-length", "?"))
            raise APIError(499, "the client closed the connection", code="client_closed_request") from None
        return parse_json(b"".join(chunks), self.limits)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.options.model_name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves "
                                  f"{self.options.model_name!r} (GET /v1/models)", param="model",
                             code="model_not_found")

    def model_object(self) -> dict[str, Any]:
        return {"id": self.options.model_name, "object": "model", "created": int(self.run.run_dir.stat().st_mtime),
                "owned_by": "glmlab", "max_model_len": self.model.block_size}

    def submit(self, rows: list[tuple[list[int], Any, int]]) -> tuple[Job, asyncio.Queue]:
        """Queue a request's rows (prompt ids, settings, sample index); its events arrive on the queue."""
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(rows, queue)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise self.busy(f"{self.options.max_queue} requests are waiting already (glmlab serve --max-queue)") \
                from None
        except SchedulerStopped as exc:
            raise self.unavailable(exc) from None
        return job, queue

    async def on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run other model work (echo log-probabilities, a VAE's tools) where the model lives, between steps."""
        try:
            return await asyncio.wrap_future(self.scheduler.call(fn))
        except QueueFull:
            raise self.busy("too much model work is waiting") from None
        except SchedulerStopped as exc:
            raise self.unavailable(exc) from None
        except GlmlabError as exc:
            raise bad_request(exc.problem) from None

    def busy(self, why: str) -> APIError:
        return APIError(429, f"the server is busy: {why}; retry after {self.options.retry_after} s",
                          "rate_limit_error", code="queue_full",
                          headers={"Retry-After": str(self.options.retry_after)})

    def unavailable(self, exc: BaseException, logged: bool = True) -> APIError:
        """A 503 for a request the model could not serve: what went wrong goes to the log, not to the client."""
        if logged:
            log.warning("a request failed: the model is not available: %s", exc)
        return APIError(503, f"the model is not available right now; retry after {self.options.retry_after} s "
                             "(the server's log says why)", "server_error", code="unavailable",
                        headers={"Retry-After": str(self.options.retry_after)})


def _put_all(pairs: list[tuple[Job, Any]]) -> None:
    for job, items in pairs:
        job.sink.put_nowait(items)


async def served(request: Request) -> Served:
    """The FastAPI dependency every router's endpoints take their shared state from (``async``: FastAPI would
    run a plain function in its thread pool, a hop per request)."""
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]
