"""What every request passes through before an endpoint: the Host and Origin, API key and body-size checks,
per-request metrics (:class:`Guard`, a plain ASGI middleware that leaves streaming alone), and how errors are
answered: OpenAI's shape, a 4xx status for the client's mistakes and 5xx only for the server's own faults, whose
details go to the log, never to the client."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmlab.serve.context import ANY_HOST, ServeOptions
from glmlab.serve.fields import APIError, too_large
from glmlab.serve.metrics import Metrics

log = logging.getLogger("glmlab.serve")
OPEN_PATHS = ("/health",)  # answered without an API key
STATIC_PREFIXES = ("/static/",)  # the playground's files: no data in them; its API calls carry the key
ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings",
             "/tokenize", "/detokenize", "/tokenizer_info", "/v1/vae/sample", "/v1/vae/reconstruct",
             "/v1/vae/interpolate"}  # metric labels


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Guard:
    """ASGI middleware: API-key check, body-size check and per-request metrics, without touching
    streaming (a plain ASGI wrapper, not BaseHTTPMiddleware)."""

    def __init__(self, app: Any, options: ServeOptions, metrics: Metrics) -> None:
        self.app, self.options, self.metrics = app, options, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started = scope["path"], time.perf_counter()
        status = {"code": 500}
        endpoint = path if path in ENDPOINTS else "other"

        async def send_and_measure(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        error = self._refusal(scope)
        try:
            if error is not None:
                await error_response(error)(scope, receive, send_and_measure)
            else:
                await self.app(scope, receive, send_and_measure)
        finally:
            self.metrics.inc("requests_total", endpoint=endpoint, status=str(status["code"]))
            self.metrics.observe("request_duration_seconds", time.perf_counter() - started, endpoint=endpoint)

    def _refusal(self, scope: dict) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        foreign = self._foreign(headers)
        if foreign is not None:
            return foreign
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.options.limits.max_body_bytes:
            return too_large(self.options.limits)
        key, path = self.options.api_key, scope["path"]
        if key is None or path in OPEN_PATHS or path == "/" or path.startswith(STATIC_PREFIXES):
            return None
        scheme, _, presented = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():  # the scheme is case-insensitive (RFC 7235)
            return APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                              "invalid_request_error", code="missing_api_key")
        if not secrets.compare_digest(presented.strip().encode("latin-1"), key.encode()):
            return APIError(401, "the API key is wrong: send the key given to glmlab serve --api-key",
                              "invalid_request_error", code="invalid_api_key")
        return None

    def _foreign(self, headers: dict[str, str]) -> APIError | None:
        """A 403 for a request naming a host this server is not (DNS rebinding: a site's name pointed at this
        machine), or sent by a page of another site (its ``Origin``): without a key, such a page could use a model
        served on ``localhost``."""
        allowed = self.options.allowed_hosts
        if ANY_HOST in allowed:
            return None
        for header in ("host", "origin"):
            value = headers.get(header)
            if value is None:
                continue
            name = host_name(value, header == "origin")
            if name not in allowed:
                return APIError(403, f"this server answers requests for {', '.join(allowed)}, not the {header} "
                                     f"{value[:100]!r} (glmlab serve --allowed-hosts NAME adds a name)",
                                code="host_not_allowed")
        return None


def host_name(value: str, origin: bool) -> str:
    """The lower-cased host name of a ``Host`` header (``name[:port]``, ``[v6][:port]``) or an ``Origin``
    (``scheme://host[:port]``; ``null`` for pages with no origin)."""
    value = value.strip().lower()
    if origin:
        scheme, sep, value = value.partition("://")
        if not sep:
            return value  # "null"
        value = value.split("/", 1)[0]
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def answer_errors(app: FastAPI) -> None:
    """Every error the app raises, answered in OpenAI's shape: APIError as it says, routing errors (404, 405)
    naming the path, anything else a 500."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no endpoint {request.url.path}; see GET /v1/models, POST /v1/completions, "
                        "POST /v1/chat/completions", 405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the client learns that it failed, not how: the traceback goes to the log (uvicorn writes it)
        return error_response(APIError(500, "internal server error: the request failed in the server (its log says "
                                            "why)", "server_error", code="internal_error"))
