"""Live servers on 127.0.0.1 (uvicorn in a thread, a free port) over the session's tiny trained run."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx2 as httpx
import pytest
import torch
import uvicorn

from glmlab.config import resolve_config
from glmlab.data.prepare import prepare
from glmlab.runs import load_run
from glmlab.serve.app import ServeOptions, create_app
from glmlab.serve.fields import Limits
from glmlab.serve.http import server_config
from glmlab.training.trainer import train

OPTIONS = ServeOptions(model_name="tiny", max_batch=8, max_queue=64, limits=Limits(max_prompt_tokens=200,
                                                                                 max_tokens=400, max_n=4,
                                                                                 max_body_bytes=64 * 1024))


class LiveServer:
    """A uvicorn server running ``app`` on a thread; ``url`` once started."""

    def __init__(self, app) -> None:
        self.app = app
        self.server = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, log_level="warning",
                                                   timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    @property
    def metrics(self):
        return self.app.state.metrics


def wait_for(condition, seconds: float = 30.0) -> None:
    """Poll ``condition`` (a liveness bound, not a speed requirement)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there"
        time.sleep(0.05)


def metric(server: LiveServer, name: str) -> float:
    """A sample's value in the server's /metrics text (the first series of that name)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def parallel_and_sequential(client, n: int) -> tuple[list[str], list[str]]:
    """``n`` seeded completions (``client``: an openai client) asked at once and one at a time."""

    def ask(seed: int) -> str:
        return client.completions.create(model="tiny", prompt=["First", "Citizen", "O"][seed % 3],
                                          max_tokens=10 + 3 * seed, seed=seed, temperature=0.9).choices[0].text

    sequential = [ask(seed) for seed in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(ask, range(n))), sequential


@pytest.fixture(scope="session")
def serve_threads() -> Iterator[None]:
    """Tiny models: one PyTorch thread is fastest and fair to the rest of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def live(trained_run, serve_threads) -> Iterator[LiveServer]:
    """The shared server: the tiny gpt run, 8 slots, small limits."""
    with LiveServer(create_app(load_run(trained_run), OPTIONS)) as server:
        yield server


@pytest.fixture
def make_server(trained_run, serve_threads):
    """A server of its own with other options (``make_server(max_batch=1, ...)``), stopped after the test."""
    servers = []

    def make(run_dir=None, **changes) -> LiveServer:
        server = LiveServer(create_app(load_run(run_dir or trained_run), replace(OPTIONS, **changes)))
        servers.append(server.__enter__())
        return server

    yield make
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory, shakespeare_excerpt):
    """A tiny vae trained for a few steps on Shakespeare's lines (word tokenizer, sentence mode)."""
    base = tmp_path_factory.mktemp("serve-vae")
    prepare([shakespeare_excerpt], base / "data", tokenizer="word", vocab_size=500, sentences=True)
    config = resolve_config({}, ["model.family=vae", "model.block_size=12", "model.n_embd=16", "model.n_hidden=32",
                                 "model.encoder_hidden=16", "model.latent_dim=4", "model.dropout=0.0",
                                 "train.batch_size=8", "train.max_steps=4", "train.eval_interval=4",
                                 "train.eval_tokens=300", "train.sample_tokens=0", "train.warmup_steps=0"])
    train(config, base / "data", base / "run", show_progress=False)
    return base / "run"


INFILL_RUNS = {  # tiny runs of each kind a fill-in-the-middle request meets, a few steps each (seconds in all)
    "fim": ["train.fim_rate=0.5"],  # a gpt trained to fill in the middle
    "glm": ["model.family=glm"],
    "bert": ["model.family=bert"],
    "lstm": ["model.family=lstm", "model.n_hidden=16"],  # cannot infill
}


@pytest.fixture(scope="session")
def infill_runs(tmp_path_factory, char_data):
    """{name: run directory} of the runs above, trained on the shared character data (context 64)."""
    base = tmp_path_factory.mktemp("infill-runs")
    common = ["model.n_embd=16", "model.block_size=64", "model.dropout=0.0", "train.batch_size=8",
              "train.max_steps=5", "train.eval_interval=5", "train.eval_tokens=256", "train.sample_tokens=0",
              "train.warmup_steps=0"]
    for name, extra in INFILL_RUNS.items():
        shape = [] if name == "lstm" else ["model.n_layer=1", "model.n_head=2"]
        train(resolve_config({}, [*common, *shape, *extra]), char_data, base / name, show_progress=False)
    return {name: base / name for name in INFILL_RUNS}
