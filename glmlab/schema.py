"""Config sections as dataclasses whose fields carry their own help text and checks.

A section's field says what it means (``help``) and what it accepts (``min``, ``max``, ``choices``, a
``parse`` function), so one function builds and validates any section from a mapping of strings or YAML
values, with an error that names the key and the fix, and ``--list-keys`` needs no extra tables. The run
config (:mod:`glmlab.config`) and every model family's config (:mod:`glmlab.models`) are built this way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any

from glmlab.errors import ConfigError


class Section(typing.Protocol):
    """A config section: a dataclass of :func:`field` s with a ``validate`` for checks across fields."""

    def validate(self) -> None: ...


def field(default: Any, help: str, **checks: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text and optional ``min``, ``max``, ``choices`` checks."""
    return dataclasses.field(default=default, metadata={"help": help, **checks})


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"3m"`` or ``"1.5h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (use seconds, or e.g. 90s, 3m, 1.5h)")
    scale = {"s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` to the field's declared type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _coerce(value, inner[0], key)
    wanted = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                return int(value.replace("_", ""))
            if isinstance(value, (int, float)):
                return int(value)
            raise ValueError
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan slips past every range check (nan < min is False)
                raise ConfigError(f"{key}={value!r} is not a finite number", f"give {key} a finite value")
            return number
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}={value!r} is not a valid {wanted}",
                          f"give {key} a {wanted} value") from None
    return value


def suggest(name: str, known: typing.Iterable[str]) -> str:
    """'did you mean ...' text for an unknown name, or a list of the valid ones."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(known)


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` with type coercion and range checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'",
                              suggest(f"{section}.{name}", (f"{section}.{f}" for f in fields)))
        meta = fields[name].metadata
        if "parse" in meta and value is not None and str(value).lower() not in ("none", "null"):
            try:
                value = meta["parse"](value)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}", f"write e.g. {key}=180") from None
        value = _coerce(value, hints[name], key)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f"{key}={value} is out of range", f"use a value >= {meta['min']}")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(f"{key}={value} is out of range", f"use a value <= {meta['max']}")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, meta['choices']))}",
                              f"set {key} to one of: {', '.join(map(str, meta['choices']))}")
        kwargs[name] = value
    obj = cls(**kwargs)
    obj.validate()
    return obj
