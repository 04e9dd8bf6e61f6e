"""The model's one thread: continuous batching of every request's sequences over one model instance.

Requests wait in a bounded queue (full: :class:`QueueFull`, which the server answers with 429). Between
decode steps the thread admits waiting sequences into free slots of a
:class:`~glmlab.generation.continuous.ContinuousBatch`, drops cancelled ones, runs one step, and hands
the step's events to ``deliver`` in one call (the server's ``deliver`` wakes its event loop once per
step and puts each request's events on that request's queue, its ``sink``). Other model work (a VAE's
latent tools, prompt log-probabilities, a masked LM's mask-predict) runs on the same thread between steps
through :meth:`Scheduler.call`, so nothing else touches the model. A model that does not decode left to right
(bert) has no batch: it only runs such calls, and a request submitted for decoding is refused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from glmlab.data.tokenizer import Tokenizer
from glmlab.errors import GlmlabError
from glmlab.generation.continuous import ContinuousBatch, RowEvent
from glmlab.generation.settings import GenerationSettings
from glmlab.serve.metrics import Metrics


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already."""


class SchedulerStopped(Exception):
    """The model thread is not running (shutting down, or it failed)."""


@dataclass(eq=False)
class Job:
    """One request's sequences: (prompt ids, settings, sample index) per row. Its ``sink`` (whatever the
    scheduler's ``deliver`` wants, e.g. an asyncio queue) gets, per step, a list of (row number,
    :class:`RowEvent`), or an exception when the batch failed."""

    rows: list[tuple[list[int], GenerationSettings, int]]
    sink: Any
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    admitted: int = 0  # rows given a slot so far
    finished: int = 0
    first_token: float | None = None
    last_token: dict[int, float] = field(default_factory=dict)


def account(events: Iterable[RowEvent], metrics: Metrics | None = None) -> dict[Job, list[tuple[int, RowEvent]]]:
    """Group a step's events (keyed (job, row)) by job, in order, and do the bookkeeping every
    scheduler does when they reach their requests: rows finished, each request's time to first token,
    the rows' inter-token gaps and the generated-token count (into ``metrics`` when given)."""
    now = time.perf_counter()
    per_job: dict[Job, list[tuple[int, RowEvent]]] = {}
    tokens, gaps = 0, []
    for event in events:
        job, row = event.key
        per_job.setdefault(job, []).append((row, event))
        if event.token_ids:
            tokens += len(event.token_ids)
            if job.first_token is None:
                job.first_token = now
                if metrics is not None:
                    metrics.observe("time_to_first_token_seconds", now - job.submitted)
            previous = job.last_token.get(row)
            if previous is not None:
                gaps.append(now - previous)
            job.last_token[row] = now
        if event.completion is not None:
            job.finished += 1
    if metrics is not None:
        metrics.observe_many("inter_token_latency_seconds", gaps)
        metrics.inc("generated_tokens_total", tokens)
    return per_job


class Scheduler:
    """Owns the model on one background thread; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, slots: int, max_queue: int,
                 deliver: Callable[[list[tuple[Job, Any]]], None], metrics: Metrics | None = None) -> None:
        self.model, self.tokenizer, self.deliver = model, tokenizer, deliver
        self.slots, self.max_queue = slots, max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._cancel_pending = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        self.gave_up = False  # stopped for good after its engine kept dying (only an engine process does)
        self.batch: ContinuousBatch | None = None

    # --- the event loop's side -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        batch = self.batch
        return batch.active if batch is not None else 0

    def start(self) -> None:
        """Start the model thread (a second call does nothing: ``glmlab serve`` may start it before the app's
        lifespan does)."""
        if self._thread is not None:
            return
        if self.model.traits.left_to_right:
            self.batch = ContinuousBatch(self.model, self.tokenizer, self.slots)
        self._thread = threading.Thread(target=self._loop, name="glmlab-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a request's rows; :class:`QueueFull` when ``max_queue`` requests wait already."""
        with self._cond:
            if not self.alive:
                raise SchedulerStopped(self.failure or "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a request's rows (a client that went away); its slots are freed before the next step."""
        if job.cancelled or job.finished == len(job.rows):
            return
        with self._cond:
            job.cancelled = True
            self._cancel_pending = True
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the model thread between two steps; its result (or exception) in a future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self.alive:
                raise SchedulerStopped(self.failure or "the server is shutting down")
            if len(self._calls) >= self.max_queue:
                raise QueueFull
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    # --- the model thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._calls or self._running
                               or self._cancel_pending):
                        self._cond.wait()
                    if self._stopping:
                        break
                    calls, self._calls = list(self._calls), collections.deque()
                    cancels, self._cancel_pending = self._cancel_pending, False
                for fn, future in calls:
                    self._run_call(fn, future)
                if cancels:
                    self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
        except BaseException:  # noqa: BLE001 — report it to every waiting request, then stop
            self.failure = "the model thread failed: " + traceback.format_exc(limit=3).splitlines()[-1]
            self._fail_all(RuntimeError(self.failure))
        finally:
            with self._cond:
                self._stopping = True
                waiting = list(self._waiting) + self._running
                self._waiting.clear()
                self._running = []
                for _, future in self._calls:
                    future.set_exception(SchedulerStopped("the server is shutting down"))
                self._calls.clear()
            stopped = SchedulerStopped(self.failure or "the server is shutting down")
            self.deliver([(job, stopped) for job in waiting])

    @staticmethod
    def _run_call(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 — the caller gets it
            future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        batch = self.batch
        with self._cond:
            gone = [job for job in self._waiting if job.cancelled]
            for job in gone:
                self._waiting.remove(job)
        for job in [j for j in self._running if j.cancelled]:
            for row in range(job.admitted):
                if batch.cancel((job, row)) and self.metrics is not None:
                    self.metrics.inc("cancelled_sequences_total")
            self._running.remove(job)
            gone.append(job)
        for job in gone:
            job.finished = len(job.rows)
        if gone:  # an empty delivery: a server in another process learns the new queue and batch sizes
            self.deliver([])

    def _admit(self) -> None:
        """Give waiting rows free slots, oldest request first (a request may be admitted in parts)."""
        batch = self.batch
        with self._cond:
            while self._waiting and batch is None:  # nothing decodes here (a masked LM): say so to each request
                self._refuse(self._waiting[0], GlmlabError(
                    f"a {self.model.traits.family} model does not decode left to right",
                    "write with mask-predict (Scheduler.call)"))
            while self._waiting and batch.free_slots:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    continue
                if job.admitted == 0:
                    self._running.append(job)
                try:
                    while job.admitted < len(job.rows) and batch.free_slots:
                        ids, settings, index = job.rows[job.admitted]
                        batch.add((job, job.admitted), ids, settings, index)
                        job.admitted += 1
                except Exception as exc:  # noqa: BLE001 — this request cannot decode: fail it, not the server
                    self._refuse(job, exc)
                    continue
                if job.admitted == len(job.rows):
                    self._waiting.popleft()

    def _refuse(self, job: Job, exc: BaseException) -> None:
        """Drop a request whose rows could not join the batch (called holding the lock) and tell it why."""
        for row in range(job.admitted):
            self.batch.cancel((job, row))
        self._waiting.popleft()
        if job in self._running:
            self._running.remove(job)
        job.finished = len(job.rows)
        self.deliver([(job, exc)])

    def _step(self) -> None:
        started = time.perf_counter()
        try:  # the events go out before the next step's model computation (in one process the event loop's
            # writing of them hardly overlaps it: the two threads' Python serialises on the GIL; measured)
            self.batch.step(publish=self._publish)
        except Exception as exc:  # noqa: BLE001 — fail the batch's requests, keep serving the next ones
            self.batch = ContinuousBatch(self.model, self.tokenizer, self.slots)  # before anyone hears of the failure
            self._fail_all(exc)
            return
        if self.metrics is not None:
            self.metrics.observe("decode_step_seconds", time.perf_counter() - started)

    def _publish(self, events: list[RowEvent]) -> None:
        """Hand a step's events to their requests (one delivery for all) and update the metrics."""
        per_job = account(events, self.metrics)
        for job in per_job:
            if job.finished == len(job.rows):
                self._running.remove(job)
        self.deliver(list(per_job.items()))

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            jobs = self._running + [j for j in self._waiting if j.admitted]
            self._running = []
            for job in jobs:
                if job in self._waiting:
                    self._waiting.remove(job)
        for job in jobs:
            job.finished = len(job.rows)
        self.deliver([(job, exc) for job in jobs])
