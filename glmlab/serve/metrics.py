"""The server's figures in Prometheus' text format (``GET /metrics``): counters, gauges read at scrape
time, and latency histograms. Hand-written (a few dozen lines) rather than a dependency; safe to update
from the model thread and the event loop at once."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Counters and histograms by name and labels, plus gauges computed when scraped."""

    def __init__(self, prefix: str = "glmlab") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, dict[tuple, list]] = {}  # labels -> [bucket counts, sum, count]
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)
        self._counters[name] = {}

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._help[name] = ("histogram", help)
        self._histograms[name] = {}
        self._buckets[name] = buckets

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observe_many(name, [value], **labels)

    def observe_many(self, name: str, values: list[float], **labels: str) -> None:
        """Count each of ``values`` in the histogram, under one lock (a server step's inter-token gaps)."""
        if not values:
            return
        key = tuple(sorted(labels.items()))
        buckets = self._buckets[name]
        with self._lock:
            series = self._histograms[name].get(key)
            if series is None:
                series = self._histograms[name][key] = [[0] * len(buckets), 0.0, 0]
            counts = series[0]
            for value in values:
                i = bisect.bisect_left(buckets, value)
                if i < len(buckets):
                    counts[i] += 1
            series[1] += sum(values)
            series[2] += len(values)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (tests and the benchmark read it)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        lines = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                full = f"{self.prefix}_{name}"
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for key, value in self._counters[name].items():
                        lines.append(f"{full}{_labels(dict(key))} {_number(value)}")
                elif kind == "gauge":
                    lines.append(f"{full} {_number(self._gauges[name]())}")
                else:
                    for key, (counts, total, count) in self._histograms[name].items():
                        labels, running = dict(key), 0
                        for bound, c in zip(self._buckets[name], counts, strict=True):
                            running += c
                            lines.append(f"{full}_bucket{_labels({**labels, 'le': _number(bound)})} {running}")
                        lines.append(f"{full}_bucket{_labels({**labels, 'le': '+Inf'})} {count}")
                        lines.append(f"{full}_sum{_labels(labels)} {_number(total)}")
                        lines.append(f"{full}_count{_labels(labels)} {count}")
        return "\n".join(lines) + "\n"


def server_metrics(queue_depth: Callable[[], float], active: Callable[[], float], slots: int) -> Metrics:
    """The metrics ``glmlab serve`` reports."""
    m = Metrics()
    m.counter("requests_total", "HTTP requests answered, by endpoint and status code")
    m.counter("prompt_tokens_total", "prompt tokens read")
    m.counter("generated_tokens_total", "tokens generated")
    m.counter("cancelled_sequences_total", "sequences cancelled before they finished (client gone)")
    m.gauge("queue_depth", "requests waiting for a batch slot", queue_depth)
    m.gauge("active_sequences", "sequences in the running batch", active)
    m.gauge("batch_slots", "slots of the running batch (glmlab serve --max-batch)", lambda: slots)
    m.histogram("request_duration_seconds", "time from a request's arrival to its last byte, by endpoint")
    m.histogram("time_to_first_token_seconds", "time from a generation request's arrival to its first token")
    m.histogram("inter_token_latency_seconds", "time between consecutive tokens of one sequence")
    m.histogram("decode_step_seconds", "time of one step of the running batch (every sequence gets a token)")
    return m
