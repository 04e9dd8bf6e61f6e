"""The model in a process of its own: a scheduler with :class:`~glmlab.serve.scheduler.Scheduler`'s
interface whose model thread runs in a child process (``glmlab serve --engine process``, the default).

Why: in one process the server's event loop (HTTP parsing, one server-sent event per token per client)
and the model thread's Python (sampling, text, bookkeeping) share one interpreter lock, and a thread
that wants it back while the other holds it waits for the whole burst. Measured on a 2-core CPU with a
4 x 128 model, another thread's 400 us of Python per step lengthens a 16-row step from 1.45 to 2.15 ms;
the same work without the lock costs 0.1 ms (benchmarks/README.md, "Serving under load"). Here the child
runs the very same thread :class:`Scheduler` over its own copy of the run, and the server's process only
parses requests and writes responses: the two never wait for each other's lock. (vLLM's V1 engine-core
split does the same.)

The wire is one duplex ``multiprocessing`` pipe (its connections pickle what they carry). Server →
engine: ``("submit", id, rows)``, ``("cancel", id)``, ``("stop",)``. Engine → server: ``("ready",)`` or
``("failed", message)`` once, then per step ``("events", [(id, payload), ...], stats)`` where a payload
is a list of (row, delta, token ids, logprobs, completion) or an error message, and ``stats`` the
engine's queue depth, active rows, step times and cancelled rows since the previous message.
Requests' time to first token, inter-token gaps and token counts are measured here, in the server's
process, when their events arrive.

Work that is not decoding (a prompt's log-probabilities for ``echo``, a VAE's latent tools) runs in the
server's process on its own copy of the model, one call at a time (:meth:`ProcessScheduler.call`).

An engine that dies (killed for memory, a crash) fails the requests it held with a 503 and is started again; one
that dies more than ``max_restarts`` times within :data:`RESTART_WINDOW` seconds is not, and the server is told
(:attr:`ProcessScheduler.on_give_up`: ``glmlab serve`` then exits non-zero, so a supervisor can act).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmlab.generation.continuous import RowEvent
from glmlab.models.gpt_aot import compiled_batch_sizes
from glmlab.serve.metrics import Metrics
from glmlab.serve.scheduler import Job, QueueFull, Scheduler, SchedulerStopped, account

log = logging.getLogger("glmlab.serve")
MAX_RESTARTS = 3  # engine deaths within RESTART_WINDOW that are restarted (glmlab serve --engine-restarts)
RESTART_WINDOW = 60.0  # seconds
STARTUP_TIMEOUT = 600.0  # seconds for the engine to import PyTorch and load the run
COMPILE_ALLOWANCE = 120.0  # more seconds per decoding step it compiles first (--compile-decode; GPT-2 small: ~50)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads: the run and how to run it (``glmlab serve``'s flags)."""

    run_dir: str
    checkpoint: str = "best"
    device: str = "cpu"
    decode_weights: str = "native"
    threads: int = 0  # PyTorch CPU threads; 0 = PyTorch's choice
    compile_decode: bool = False  # steps compiled ahead of time for every batch size of the engine's batch


class _StepStats:
    """Stands in for the engine's metrics: keeps what only the engine can measure (step times, rows
    cancelled) until the next message carries it to the server; the rest is measured there."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.cancelled = 0

    def observe(self, name: str, value: float, **labels: str) -> None:
        if name == "decode_step_seconds":
            self.steps.append(value)

    def observe_many(self, name: str, values: list[float]) -> None:
        pass

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if name == "cancelled_sequences_total":
            self.cancelled += int(amount)

    def drain(self) -> tuple[list[float], int]:
        steps, cancelled = self.steps, self.cancelled
        self.steps, self.cancelled = [], 0
        return steps, cancelled


def _engine_main(conn: Any, spec: EngineSpec, slots: int) -> None:
    """The engine process: load the run, start a thread :class:`Scheduler` over it, forward requests to
    it and its events back, until told to stop or the server's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    # a server leaving while we start (Ctrl-C during --compile-decode's compilations) terminates us: exit as Python
    # does, so that what the compilation registered with multiprocessing's resource tracker is released, not
    # reported at the server's exit as leaked
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import torch

    from glmlab.runs import UncheckedWeights, load_run

    if spec.threads:
        torch.set_num_threads(spec.threads)
    warnings.simplefilter("ignore", UncheckedWeights)  # the server, which loaded the run first, said so
    try:
        run = load_run(spec.run_dir, checkpoint=spec.checkpoint, device=spec.device)
        run.use_decode_weights(spec.decode_weights)
        if spec.compile_decode:  # compiled (or loaded) before the server says it is ready
            run.use_compiled_decode()
            run.model.prepare_compiled_decode(slots)
    except Exception as exc:  # noqa: BLE001 — reported to the server, which says it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send_lock = threading.Lock()  # the model thread sends events, this one a refused submission's
    stats = _StepStats()
    jobs: dict[int, Job] = {}

    def deliver(pairs: list[tuple[Job, Any]]) -> None:
        out = []
        for job, items in pairs:
            if isinstance(items, BaseException):
                out.append((job.sink, str(items) or type(items).__name__))
                jobs.pop(job.sink, None)
                continue
            out.append((job.sink, [(row, e.delta, e.token_ids, e.logprobs, e.completion) for row, e in items]))
            if job.finished == len(job.rows):
                jobs.pop(job.sink, None)
        message = ("events", out, (scheduler.queue_depth, scheduler.active, *stats.drain()))
        with send_lock:
            conn.send(message)

    scheduler = Scheduler(run.model, run.tokenizer, slots, 1 << 30, deliver, metrics=stats)  # type: ignore[arg-type]
    scheduler.start()
    conn.send(("ready",))
    try:
        while True:
            message = conn.recv()
            if message[0] == "submit":
                _, key, rows = message
                job = Job(rows, key)
                jobs[key] = job
                try:
                    scheduler.submit(job)
                except (QueueFull, SchedulerStopped) as exc:  # its model thread died: say so to the request
                    deliver([(job, exc)])
            elif message[0] == "cancel":  # the scheduler's cancellation delivers nothing for the job: forget it here
                job = jobs.pop(message[1], None)
                if job is not None:
                    scheduler.cancel(job)
            else:  # "stop"
                break
    except (EOFError, OSError, KeyboardInterrupt):  # the server went away
        pass
    finally:
        scheduler.stop()


class ProcessScheduler:
    """:class:`~glmlab.serve.scheduler.Scheduler`'s interface over an engine process (see the module
    docstring). ``deliver`` and ``metrics`` mean what they mean there; :meth:`call`'s functions run here,
    on whatever they close over (the server's own copy of the model)."""

    def __init__(self, spec: EngineSpec, slots: int, max_queue: int,
                 deliver: Callable[[list[tuple[Job, Any]]], None], metrics: Metrics | None = None,
                 max_restarts: int = MAX_RESTARTS) -> None:
        self.spec, self.slots, self.max_queue, self.deliver = spec, slots, max_queue, deliver
        self.max_restarts = max_restarts
        self.metrics = metrics
        self.failure: str | None = None
        self._jobs: dict[int, Job] = {}  # requests in the engine, by the key they travel under
        self._keys: dict[Job, int] = {}
        self._unstarted: set[int] = set()  # keys of requests whose first event has not arrived
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards the tables above and the pipe's sending end
        self._depth = 0
        self._active = 0
        self._conn: Any = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glmlab-calls")
        self._pending_calls = 0
        self._deaths: list[float] = []  # when the engine died, within the last RESTART_WINDOW seconds
        self.restarts = 0
        self.gave_up = False  # the engine died too often: no more restarts
        self.on_give_up: Callable[[], None] | None = None  # called (from the reader thread) when it gives up

    # --- Scheduler's interface ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return (self._process is not None and self._process.is_alive() and not self._stopping
                and self.failure is None)

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def pid(self) -> int | None:
        """The engine process's id (None before it starts)."""
        return self._process.pid if self._process is not None else None

    @property
    def unstarted(self) -> int:
        """Requests sent to the engine whose first event has not arrived (what the 429 bound counts)."""
        return len(self._unstarted)

    @property
    def active(self) -> int:
        return self._active

    def start(self) -> None:
        """Start the engine and wait until it has loaded the run (a failure raises
        :class:`SchedulerStopped` with the engine's message). Once started, a second call does nothing:
        ``glmlab serve`` starts it before the server, the app's lifespan again."""
        if self._process is not None:
            return
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        ours, theirs = context.Pipe(duplex=True)
        self._process = context.Process(target=_engine_main, args=(theirs, self.spec, self.slots),
                                        name="glmlab-engine", daemon=True)
        self._process.start()
        theirs.close()
        self._conn = ours
        steps = len(compiled_batch_sizes(self.slots)) if self.spec.compile_decode else 0
        timeout = STARTUP_TIMEOUT + COMPILE_ALLOWANCE * steps
        try:
            self._wait_until_loaded(ours, timeout, steps)
        except BaseException:  # Ctrl-C while it loads or compiles: end it here, in bounded time
            self._process.terminate()  # (it exits as Python does: what it registered is released)
            self._process.join(timeout=15)
            if self._process.is_alive():
                self._process.kill()
            raise
        first = ours.recv()
        if first[0] != "ready":
            self._process.join(timeout=10)
            raise SchedulerStopped(f"the engine process could not load the run: {first[1]}")
        self._reader = threading.Thread(target=self._read, name="glmlab-engine-reader", daemon=True)
        self._reader.start()

    def _wait_until_loaded(self, ours: Any, timeout: float, steps: int) -> None:
        """Wait for the engine's first message; an engine that exits, or takes more than ``timeout`` seconds, is a
        :class:`SchedulerStopped` (``steps``: the decoding steps it compiles first, named in the message)."""
        started = time.monotonic()
        while not ours.poll(0.1):
            if not self._process.is_alive():
                raise SchedulerStopped(f"the engine process exited (code {self._process.exitcode}) while loading "
                                       f"{self.spec.run_dir}")
            if time.monotonic() - started > timeout:
                self._process.kill()
                doing = f"load {self.spec.run_dir} and compile its {steps} decoding steps" if steps else \
                    f"load {self.spec.run_dir}"
                raise SchedulerStopped(f"the engine process did not {doing} in {timeout:.0f} s")

    def stop(self) -> None:
        self._stopping = True
        if self._conn is not None:
            with self._lock, contextlib.suppress(SchedulerStopped):  # an engine that is gone is stopped
                self._send(("stop",))
        if self._process is not None:
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._calls.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> None:
        """Send a request's rows to the engine; :class:`QueueFull` when about ``max_queue`` requests wait
        for a slot already (counted here, within one step, as requests without a first event beyond the
        engine's free slots)."""
        if not self.alive:
            raise SchedulerStopped(self.failure or "the server is shutting down")
        with self._lock:
            free = max(0, self.slots - self._active)
            if len(self._unstarted) - free >= self.max_queue:
                raise QueueFull
            key = next(self._ids)
            self._send(("submit", key, job.rows))
            self._jobs[key], self._keys[job] = job, key
            self._unstarted.add(key)

    def cancel(self, job: Job) -> None:
        """Drop a request's rows (a client that went away)."""
        if job.cancelled or job.finished == len(job.rows):
            return
        job.cancelled = True
        with self._lock:
            key = self._forget(job)
            if key is not None:
                with contextlib.suppress(SchedulerStopped):  # an engine that is gone has nothing to cancel
                    self._send(("cancel", key))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` (work on the server's copy of the model) on this process's worker thread, one call
        at a time; its result (or exception) in a future."""
        if not self.alive:
            raise SchedulerStopped(self.failure or "the server is shutting down")
        with self._lock:
            if self._pending_calls >= self.max_queue:
                raise QueueFull
            self._pending_calls += 1

        def run() -> Any:
            try:
                return fn()
            finally:
                with self._lock:
                    self._pending_calls -= 1

        return self._calls.submit(run)

    # --- the server's side of the pipe -------------------------------------------------------------------

    def _forget(self, job: Job) -> int | None:
        """Drop a request from the tables (under the lock); its key, or None if it was not there."""
        key = self._keys.pop(job, None)
        if key is not None:
            self._jobs.pop(key, None)
            self._unstarted.discard(key)
        return key

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)  # pickled by the connection
        except OSError as exc:  # the engine is gone; the reader reports it to every request
            raise SchedulerStopped(self.failure or f"the engine process is gone: {exc}") from None

    def _read(self) -> None:
        """Turn the engine's messages into deliveries, until it stops."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "events":
                    self._arrived(message[1], message[2])
        except (EOFError, OSError):
            pass
        except BaseException as exc:  # noqa: BLE001 — a broken message: stop serving, say why
            self.failure = f"the engine's messages could not be read: {type(exc).__name__}: {exc}"
        code = self._process.exitcode if self._process is not None else None
        if not self._stopping and self.failure is None:
            self.failure = f"the engine process exited (code {code})"
        with self._lock:
            left = list(self._jobs.values())
            self._jobs, self._keys, self._unstarted = {}, {}, set()
        stopped = SchedulerStopped(self.failure or "the server is shutting down")
        if left:
            self.deliver([(job, stopped) for job in left])
        if not self._stopping:
            self._restart()

    def _restart(self) -> None:
        """Start a new engine after the old one died (its zombie reaped), unless it died too often."""
        if self._process is not None:
            self._process.join(timeout=5)
        code = self._process.exitcode if self._process is not None else None
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
        if len(self._deaths) > self.max_restarts:
            deaths = len(self._deaths)
            self._give_up(f"the engine process died {deaths} time{'s' if deaths > 1 else ''} within "
                          f"{RESTART_WINDOW:.0f} s, more than the {self.max_restarts} restarts allowed (glmlab serve "
                          f"--engine-restarts); last exit code {code}")
            return
        log.warning("the engine process exited (code %s); starting a new one", code)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._process = self._reader = None
        self._depth = self._active = 0
        try:
            self.start()
        except SchedulerStopped as exc:
            self._give_up(f"the engine process died and could not be started again: {exc}")
            return
        if self._stopping:  # the server stopped while the new engine loaded
            self.stop()
            return
        self.restarts += 1
        self.failure = None
        log.warning("the engine process is running again (restart %d)", self.restarts)

    def _give_up(self, why: str) -> None:
        self.failure, self.gave_up = why, True
        log.error("glmlab serve: %s", why)
        if self.on_give_up is not None:
            self.on_give_up()

    def _arrived(self, items: list[tuple[int, Any]], stats: tuple) -> None:
        depth, active, steps, cancelled = stats
        self._depth, self._active = depth, active
        m = self.metrics
        if m is not None:
            m.observe_many("decode_step_seconds", steps)
            if cancelled:
                m.inc("cancelled_sequences_total", cancelled)
        events, failed = [], []
        with self._lock:
            for key, payload in items:
                job = self._jobs.get(key)
                if job is None:
                    continue
                self._unstarted.discard(key)
                if isinstance(payload, str):
                    failed.append((job, RuntimeError(payload)))
                    job.finished = len(job.rows)
                    self._forget(job)
                    continue
                for row, delta, token_ids, logprobs, completion in payload:
                    events.append(RowEvent((job, row), delta, token_ids, logprobs, completion))
        per_job = account(events, m)
        with self._lock:
            for job in per_job:
                if job.finished == len(job.rows):
                    self._forget(job)
        self.deliver(list(per_job.items()) + failed)
