"""The OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``/v1/chat/completions``,
streamed as server-sent events or answered whole, decoded by the scheduler's continuous batch (a prompt with a
``suffix`` too: its row starts from the fill-in-the-middle layout). A masked LM (bert) writes its completions by
mask-predict, as a model call on the scheduler's thread, and streams each one whole."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from glmlab.data.tokenizer import Tokenizer
from glmlab.generation.continuous import RowEvent
from glmlab.generation.engine import Completion, TokenLogprob
from glmlab.generation.generate import generate_batch
from glmlab.models.contract import LanguageModel
from glmlab.serve import protocol as P
from glmlab.serve import responses as R
from glmlab.serve.context import Served, ServedDep
from glmlab.serve.fields import Fields, bad_request

router = APIRouter()


@router.get("/v1/models")
async def models(served: ServedDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [served.model_object()]})


@router.get("/v1/models/{name:path}")
async def model_info(name: str, served: ServedDep) -> JSONResponse:
    served.check_model(name)
    return JSONResponse({**served.model_object(), "card": served.card})


@router.post("/v1/completions")
async def completions(request: Request, served: ServedDep) -> Response:
    return await _answer(request, await _checked(request, served, P.completion_request), served)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, served: ServedDep) -> Response:
    return await _answer(request, await _checked(request, served, functools.partial(
        P.chat_request, template=served.run.chat_template)), served)


async def _checked(request: Request, served: Served, parse: Callable[..., P.GenerationRequest],
                   ) -> P.GenerationRequest:
    """The request's body read, its model name checked, and parsed by ``parse`` (completions' or chat's) on a
    worker thread: encoding a long prompt takes a while, and the event loop serves every other stream meanwhile."""
    body = await served.body(request)
    served.check_model(Fields(body).string("model"))
    model = served.model
    return await asyncio.to_thread(parse, body, served.tokenizer, model.block_size, model.vocab_size, served.start,
                                   served.limits, model)


async def _answer(request: Request, req: P.GenerationRequest, served: Served) -> Response:
    """Decode a checked request: a stream of chunks, or the whole answer once every row is done."""
    prompt_lp = await _echo_logprobs(req, served)
    served.metrics.inc("prompt_tokens_total", sum(p.tokens for p in req.prompts))
    if not req.generate:  # max_tokens=0 with echo: the prompts' log-probabilities, nothing generated
        return _echo_only(req, prompt_lp, served)
    if req.mask_predict:
        return await _mask_predict(req, served)
    job, queue = served.submit([(p.ids, req.settings, j) for p in req.prompts for j in range(req.n)])
    if req.stream:
        events = R.event_stream(req, queue, prompt_lp, served.options.model_name, served.tokenizer)
        return _EventStream(events, lambda: served.scheduler.cancel(job))
    try:
        results = await _collect(request, queue, len(job.rows))
    except _ClientGone:
        served.scheduler.cancel(job)
        return Response(status_code=499)
    except Exception as exc:  # noqa: BLE001 — the batch failed: answer, keep serving
        raise served.unavailable(exc) from None
    finally:
        served.scheduler.cancel(job)  # a no-op once every row finished
    failed = next((c for c in results.values() if c.error), None)
    if failed is not None:  # the grammar led where this tokenizer cannot follow: the text would not parse
        raise bad_request(f"the output could not follow the requested format: {failed.error}", req.format_param,
                            "grammar_failed")
    return JSONResponse(R.completion_body(req, results, prompt_lp, served.options.model_name, served.tokenizer))


def _echo_only(req: P.GenerationRequest, prompt_lp: list[list[TokenLogprob]], served: Served) -> Response:
    """The answer to ``max_tokens: 0`` with ``echo``: each prompt, no completion (finish reason "length")."""
    rows = len(req.prompts) * req.n
    results = {r: Completion("", [], "length", len(req.prompts[r // req.n].ids), []) for r in range(rows)}
    name = served.options.model_name
    if not req.stream:
        return JSONResponse(R.completion_body(req, results, prompt_lp, name, served.tokenizer))
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait([(r, RowEvent(r, completion=c)) for r, c in results.items()])
    return _EventStream(R.event_stream(req, queue, prompt_lp, name, served.tokenizer), lambda: None)


async def _mask_predict(req: P.GenerationRequest, served: Served) -> Response:
    """A masked LM's completions, written by mask-predict (``generate_batch``, which routes a bert there) on the
    model's thread between decoding steps, so the event loop never waits for it; a stream gets each text whole."""
    model, tokenizer = served.model, served.tokenizer
    settings = dataclasses.replace(req.settings, num_return_sequences=req.n)
    written = await served.on_model_thread(lambda: generate_batch(
        model, tokenizer, [p.source for p in req.prompts], settings, [p.suffix for p in req.prompts]))
    results = {i * req.n + j: c for i, row in enumerate(written) for j, c in enumerate(row)}
    served.metrics.inc("generated_tokens_total", sum(c.generated_tokens for c in results.values()))
    name = served.options.model_name
    if not req.stream:
        return JSONResponse(R.completion_body(req, results, [], name, tokenizer))
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait([(r, RowEvent(r, c.text, list(c.token_ids), completion=c)) for r, c in results.items()])
    return _EventStream(R.event_stream(req, queue, [], name, tokenizer), lambda: None)


async def _echo_logprobs(req: P.GenerationRequest, served: Served) -> list[list[TokenLogprob]]:
    if not (req.echo and req.logprobs is not None):
        return [[] for _ in req.prompts]
    model, tokenizer, start = served.model, served.tokenizer, served.start
    return await served.on_model_thread(lambda: [
        prompt_logprobs(model, tokenizer, p.whole, req.logprobs, start if p.added_start else None)
        for p in req.prompts])


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
def prompt_logprobs(model: LanguageModel, tokenizer: Tokenizer, ids: list[int], k: int, start: int | None,
                    ) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (the first has none), for echo; the
    model reads every token but the last, so ``block_size + 1`` tokens fit. A latent model scores the prompt
    given the centre of its prior, where its completions start too."""
    device = next(model.parameters()).device
    logp = model(torch.tensor([ids[:-1] or ids], device=device)).float().log_softmax(-1)[0] if len(ids) > 1 else None
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
