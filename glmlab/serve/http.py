"""The HTTP connection, before any request reaches the app: how large a request's line and headers may be
(431) and how long a client may take to send them and its body (408), on uvicorn's httptools protocol.

uvicorn's httptools parser accepts a header of any size and waits for ever for a head or body that never
comes: a 100 MB header was read and answered, and a ``Content-Length`` larger than what was sent held the
connection open until the client gave up. :class:`LimitedHttpProtocol` counts the bytes of a request's head as
they arrive and times the head and the pauses in its body; the refusals are JSON in OpenAI's error shape, and
counted in the server's metrics. :func:`server_config` is the uvicorn configuration ``glmlab serve`` (and the
tests' live servers) run with.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("glmlab.serve")


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may take: ``glmlab serve --max-header-bytes`` and ``--read-timeout``."""

    max_header_bytes: int = 32 * 1024  # the request line and headers together
    read_timeout: float = 10.0  # seconds for a request's head (from the connection's start or the last answer),
    # and the longest pause inside its body


def refusal(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response (closing the connection) with an OpenAI-shaped error body."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body])


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head and timeouts for reading it and its body
    (see the module docstring). :func:`limited_protocol` makes the class for given limits."""

    limits = ConnectionLimits()
    counted: Callable[[int], None] | None = None  # told the status of every refusal (the server's metrics)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes received since the current request's head began
        self._awaiting_head = True
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # this server has no WebSocket endpoints
        except httptools.HttpParserError as exc:
            if not self.transport.is_closing():  # not already refused by a callback below
                self._refuse(400, f"the request is not valid HTTP/1.1 ({exc})", "invalid_http")
            return
        if self._awaiting_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_large_head()

    # --- parser callbacks -------------------------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:  # a head that arrived in one read
            self._refuse_large_head()
            raise httptools.HttpParserError("refused")  # stop parsing; data_received sees the refusal sent
        self._awaiting_head, self._head_bytes = False, 0
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body:
            self._arm(self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._timer is not None:
            self._arm(self._body_timed_out)  # a pause is timed from the last bytes received

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._awaiting_head, self._head_bytes = True, 0  # what comes next is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm(self._head_timed_out)  # the next request's head (uvicorn closes an idle connection sooner)

    # --- timers and refusals ----------------------------------------------------------------------------------

    def _arm(self, handler: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.limits.read_timeout, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self._head_bytes:
            self._refuse(408, f"the request's line and headers did not arrive within {self.limits.read_timeout:g} s "
                              "(glmlab serve --read-timeout)", "request_timeout")
        else:  # an idle connection: nothing to answer
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if not cycle.response_started:
            self.scope["glmlab.timed_out"] = True  # the app's body read ends in a 408 (its metrics count it)
            self._refuse(408, f"the request body stopped arriving for {self.limits.read_timeout:g} s before its "
                              "end (a Content-Length larger than the body sent?); send the whole body",
                         "request_timeout")
        cycle.disconnected = True  # the app's read of the body ends; what it sends now goes nowhere
        cycle.message_event.set()

    def _refuse_large_head(self) -> None:
        self._refuse(431, f"the request line and headers are larger than {self.limits.max_header_bytes} bytes, this "
                          "server's limit (glmlab serve --max-header-bytes)", "request_header_fields_too_large")

    def _refuse(self, status: int, message: str, code: str) -> None:
        if self.transport.is_closing():
            return
        log.warning("refused a request from %s: %s %s", self.client[0] if self.client else "?", status, code)
        self.transport.write(refusal(status, message, code))
        self.transport.close()
        self._disarm()
        if self.counted is not None and self._awaiting_head:  # a body's timeout is counted by the app (its 408)
            self.counted(status)


def limited_protocol(limits: ConnectionLimits, counted: Callable[[int], None] | None = None) -> type:
    """A :class:`LimitedHttpProtocol` class for ``limits`` (uvicorn makes one protocol object per connection)."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits, "counted": staticmethod(counted)
                                                                 if counted is not None else None})


def server_config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` (:func:`glmlab.serve.app.create_app`'s) with its connection limits
    (``ServeOptions.connection``) and refusals counted in its metrics; ``options``: uvicorn's own."""
    served = app.state.served

    def counted(status: int) -> None:
        served.metrics.inc("requests_total", endpoint="other", status=str(status))

    options.setdefault("access_log", False)
    logging_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # the server's own lines look like uvicorn's
    logging_config["loggers"][log.name] = {"handlers": ["default"], "propagate": False,
                                           "level": str(options.get("log_level") or "info").upper()}
    return uvicorn.Config(app, http=limited_protocol(served.options.connection, counted), ws="none",
                          timeout_keep_alive=5, log_config=logging_config, **options)
