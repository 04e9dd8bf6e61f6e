"""Reading a JSON request body for every route: its size and shape, typed fields whose every mistake is an
OpenAI-shaped error naming the field (:class:`APIError`: ``{"error": {"message", "type", "param", "code"}}``), the
limits a request may ask for, and the refusal of fields a route does not know."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any


class APIError(Exception):
    """An error answered in OpenAI's shape, with its HTTP status (and headers, e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``glmlab serve`` flags)."""

    max_prompt_tokens: int = 8192
    max_tokens: int = 2048
    max_n: int = 16
    max_rows: int = 64  # prompts x n in one request
    max_body_bytes: int = 1 << 20
    max_stop: int = 16


MAX_DEPTH = 64  # nesting of JSON arrays and objects: messages need 5, a JSON schema for response_format more


def parse_json(raw: bytes, limits: Limits) -> dict[str, Any]:
    """The request body as a JSON object; 413 when too large, 400 when not JSON, not an object, nested deeper
    than :data:`MAX_DEPTH`, holding a number Python will not read (over 4,300 digits) or a string that is not
    Unicode text (a lone surrogate such as ``"\\ud800"``, which no tokenizer can read)."""
    if len(raw) > limits.max_body_bytes:
        raise too_large(limits)
    try:
        body = json.loads(raw)
    except RecursionError:
        body = None  # deeper than the parser goes: refused below with the shallower ones
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise bad_request(f"the request body is not valid JSON ({str(exc)[:200]})", code="invalid_json") from None
    if body is None or _depth(body) > MAX_DEPTH:
        raise bad_request(f"the request body nests arrays and objects more than {MAX_DEPTH} deep", code="invalid_json")
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if b"\\u" in raw or b"\\U" in raw:  # only an escape can spell a lone surrogate in valid UTF-8
        where = _surrogate(body, "")
        if where is not None:
            raise bad_request(f"{where or 'a key'} holds a lone UTF-16 surrogate (an escape such as \"\\ud800\" "
                              "with no pair), which is not text", where or None, "invalid_text")
    return body


def _depth(value: Any) -> int:
    """How deep ``value``'s arrays and objects nest (walked without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _surrogate(value: Any, where: str) -> str | None:
    """The field path of the first string (or key) in ``value`` holding a lone surrogate; None if there is none."""
    if isinstance(value, str):
        return where if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
        if isinstance(key, str) and _SURROGATE.search(key):
            return where or "a key"
        found = _surrogate(item, path)
        if found is not None:
            return found
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def too_large(limits: Limits) -> APIError:
    return APIError(413, f"the request body is larger than {limits.max_body_bytes} bytes, this server's limit "
                         "(glmlab serve --max-body-bytes)", code="request_too_large")


class Fields:
    """Typed access to a JSON object's fields, each mistake a 400 naming the field and what it must be."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def number(self, name: str, default: float, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"{name} must be a number, got {json.dumps(value)[:80]}", name, "invalid_type")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            raise bad_request(f"{name} must be a finite number, got {json.dumps(value)[:80]}", name, "invalid_type")
        value = number
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
            raise bad_request(f"{name}={value} is out of range: it must be {_range(lo, hi, lo_open)}", name,
                              "invalid_value")
        return float(value)

    def integer(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None,
                hint: str = "") -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"{name} must be an integer, got {json.dumps(value)}", name, "invalid_type")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise bad_request(f"{name}={value} is out of range: it must be {_range(lo, hi)}{hint}", name,
                              "invalid_value")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"{name} must be true or false, got {json.dumps(value)}", name, "invalid_type")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad_request(f"{name} must be a string, got {json.dumps(value)[:80]}", name, "invalid_type")
        return value

    def stop(self, limits: Limits) -> list[str]:
        value = self.body.get("stop")
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad_request("stop must be a string or a list of strings", "stop", "invalid_type")
        if len(stops) > limits.max_stop:
            raise bad_request(f"stop has {len(stops)} strings; at most {limits.max_stop} are allowed", "stop",
                              "invalid_value")
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", "stop", "invalid_value")
        return stops


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{'>' if lo_open else '>='} {lo} and <= {hi}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"<= {hi}"


def refuse_unknown(body: dict[str, Any], known: set[str], endpoint: str) -> None:
    """A 400 naming the first field of ``body`` outside ``known`` (null counts as absent)."""
    for name, value in body.items():
        if value is not None and name not in known:
            raise unknown_parameter(name, endpoint)


def unknown_parameter(name: str, endpoint: str) -> APIError:
    return bad_request(f"unknown parameter {name!r} for {endpoint}: this server does not know it, so it refuses it "
                       "rather than ignore it", name, "unknown_parameter")
