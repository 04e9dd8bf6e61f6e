"""``glmlab serve``'s flags and errors, and the command itself in a process of its own."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest

from glmlab.errors import GlmlabError
from glmlab.serve.cli import add_parser

# What `glmlab serve` runs, until glmlab/cli.py wires it in: this module's parser and handler.
MAIN = ("import sys; from argparse import ArgumentParser; from glmlab.serve.cli import add_parser; "
        "p = ArgumentParser(prog='glmlab'); add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); "
        "sys.exit(a.handler(a))")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glmlab")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_bind_to_loopback():
    args = parse("runs/x")
    assert (args.host, args.port, args.api_key, args.max_batch) == ("127.0.0.1", 8000, None, 32)


@pytest.mark.parametrize("argv, words", [
    (["--max-batch", "0"], "--max-batch 0 must be at least 1"),
    (["--port", "70000"], "not a TCP port"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_bad_flags_are_clear_errors(argv, words):
    args = parse("runs/x", *argv)
    with pytest.raises(GlmlabError, match=words):
        args.handler(args)


def test_a_taken_port_is_a_clear_error(trained_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = parse(str(trained_run), "--port", str(taken.getsockname()[1]))
        with pytest.raises(GlmlabError, match="cannot listen on 127.0.0.1"):
            args.handler(args)


def test_a_missing_run_is_a_clear_error(tmp_path):
    args = parse(str(tmp_path / "nothing"), "--port", "0")
    with pytest.raises(GlmlabError, match="does not exist"):
        args.handler(args)


@pytest.mark.parametrize("reason, fix", [
    ("could not load the run: ConfigError: int8 decode weights run on a CPU\n  fix: use native", "use native"),
    ("the engine process exited (code -9) while loading runs/x", "--engine thread"),
])
def test_an_engine_that_cannot_start_is_a_clear_error_before_serving(trained_run, monkeypatch, capsys, reason, fix):
    from glmlab.serve.engine_process import ProcessScheduler
    from glmlab.serve.scheduler import SchedulerStopped

    def fail(self):
        raise SchedulerStopped(reason)

    monkeypatch.setattr(ProcessScheduler, "start", fail)
    args = parse(str(trained_run), "--port", "0")
    with pytest.raises(GlmlabError) as error:
        args.handler(args)
    assert str(error.value).startswith(reason.split("\n")[0]) and str(error.value).count("fix:") == 1
    assert fix in error.value.fix if error.value.fix else fix in str(error.value)
    assert "on http://" not in capsys.readouterr().err  # refused before the server announced itself


@pytest.mark.slow
def test_the_command_serves_until_interrupted(trained_run):
    env = {**os.environ, "GLMLAB_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", MAIN, "serve", str(trained_run), "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "glmlab serve: " in line, line
        url = line.split(" on ", 1)[1].split()[0].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from $GLMLAB_API_KEY
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"prompt": "First", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        rest = proc.stderr.read()
    assert code == 0 and "Traceback" not in rest
