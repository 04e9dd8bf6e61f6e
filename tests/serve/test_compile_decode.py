"""``glmlab serve --compile-decode``: every batch size the continuous batch steps with is compiled before the server
takes requests, the answers are the scripted steps', and where it cannot run it is refused at startup. The in-process
tests use the stand-in library of tests/conftest.py (no compiler); one slow test compiles for real in an engine
process."""

from __future__ import annotations

import concurrent.futures
import contextlib

import httpx2 as httpx
import pytest

from glmlab.errors import GlmlabError
from glmlab.serve.cli import add_parser

REQUESTS = [{"prompt": p, "max_tokens": 6 + 3 * i, "seed": i, "temperature": 0.9}
            for i, p in enumerate(["First", "Citizen", "O", "ROMEO:", "What", "MENENIUS:"])]


def answers(server, parallel: bool) -> list[str]:
    def ask(body: dict) -> str:
        reply = httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["text"]

    if not parallel:
        return [ask(body) for body in REQUESTS]
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        return list(pool.map(ask, REQUESTS))


def test_every_batch_size_is_ready_before_requests_and_answers_are_the_scripted_ones(make_server, live, stand_in):
    server = make_server(compile_decode=True, max_batch=8)
    assert stand_in.builds == [1, 2, 4, 8]  # at startup, none at a request
    expected = answers(live, parallel=False)
    assert answers(server, parallel=False) == expected
    assert answers(server, parallel=True) == expected
    assert stand_in.builds == [1, 2, 4, 8]
    sizes = {batch for batch, _ in stand_in.calls}
    assert 1 in sizes and sizes <= {1, 2, 4, 8}  # one request alone ran batch 1's step, not the 8 slots'


def test_where_it_cannot_run_it_is_refused_at_startup(make_server, infill_runs, stand_in):
    with pytest.raises(GlmlabError, match="not available for this run's family, lstm"):
        make_server(infill_runs["lstm"], compile_decode=True)
    with pytest.raises(GlmlabError, match="compiles a CPU step; this server decodes on cuda"):
        make_server(compile_decode=True, engine="process", engine_device="cuda")
    with pytest.raises(GlmlabError, match="native-weight step, not the int8 one"):
        make_server(compile_decode=True, engine="process", decode_weights="int8")
    assert stand_in.builds == []


@pytest.mark.parametrize("flag", [True, False])
def test_the_flag_reaches_the_server(trained_run, monkeypatch, flag):
    import argparse

    from glmlab.serve import app

    seen = []

    def create_app(run, options):
        seen.append(options)
        raise KeyboardInterrupt  # (stop before the server starts)

    monkeypatch.setattr(app, "create_app", create_app)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(trained_run), "--port", "0"] + (["--compile-decode"] if flag else []))
    with pytest.raises(KeyboardInterrupt):
        args.handler(args)
    assert [options.compile_decode for options in seen] == [flag]


@pytest.mark.slow
def test_an_engine_process_compiles_its_steps_and_answers_as_the_one_process_server(make_server, live, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("GLMLAB_CACHE_DIR", str(tmp_path))  # (the engine process inherits it)
    server = make_server(compile_decode=True, engine="process", max_batch=2)
    assert len(list((tmp_path / "decode-steps").glob("gpt-*.pt2"))) == 2  # batches 1 and 2, before any request
    assert answers(server, parallel=False) == answers(live, parallel=False)
    assert answers(server, parallel=True) == answers(live, parallel=False)


@pytest.mark.slow
def test_ctrl_c_during_the_startup_compilations_stops_cleanly(trained_run, tmp_path):
    """Ctrl-C (SIGINT to the terminal's whole process group) while the engine compiles: the server says it was
    interrupted, nothing is reported leaked at its exit, and no engine or compiler is left running."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "GLMLAB_CACHE_DIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "glmlab", "serve", str(trained_run), "--port", "0",
                               "--compile-decode", "--max-batch", "2", "--threads", "1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen, deadline = [], time.monotonic() + 120
        while not any(line.startswith("compiling the decoding step") for line in seen):
            assert time.monotonic() < deadline and select.select([server.stdout], [], [], 5)[0], seen
            seen.append(server.stdout.readline())  # (the engine says so as its first compilation starts)
            assert seen[-1], seen  # (the server ended before compiling)
        time.sleep(1.0)
        os.killpg(server.pid, signal.SIGINT)
        rest = server.communicate(timeout=60)[0]
        assert server.returncode == 130 and "glmlab serve: interrupted" in rest
        assert "leaked" not in rest and "Traceback" not in rest, rest
        deadline = time.monotonic() + 20  # (the engine and multiprocessing's resource tracker exit just after it)
        while (left := living(server.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], left
        assert not list((tmp_path / "decode-steps").glob("*.pt2"))  # nothing half-written is kept
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


def living(session: int) -> list[str]:
    """The processes of a session that have not exited (zombies, which only await their parent, left out)."""
    import subprocess

    lines = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(session)], capture_output=True,
                           text=True).stdout.splitlines()
    return [line for line in lines if not line.split()[1].startswith("Z")]
