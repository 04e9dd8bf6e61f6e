"""The server against hostile clients and faults (issue 22, items 1-7): request heads too large or too slow, a
long prompt's encoding off the event loop, malformed JSON, clients that leave mid-body, no internal text in
answers, cross-site requests and a dead engine process. Socket-level faults go through real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from glmlab.serve.cli import allowed_hosts
from glmlab.serve.http import ConnectionLimits
from tests.serve.conftest import metric, wait_for

FAST = ConnectionLimits(max_header_bytes=4096, read_timeout=0.5)


def exchange(url: str, *parts: bytes, pause: float = 0.0, wait: float = 20.0) -> tuple[bytes, float]:
    """Send ``parts`` on a raw connection (``pause`` seconds apart) and read until the server closes it; the
    answer and the seconds from the last part to the close."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed while we were still sending
                break
            time.sleep(pause)
        sent, answer = time.monotonic(), b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - sent


def leave_mid_body(url: str) -> None:
    """Send a request's head and the start of its body, then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.05)


def error_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_request_heads_are_bounded_in_size_and_time(make_server):
    """Item 1: an oversized request line or header is 431 (streamed or in one piece), a head or body that stops
    arriving is 408 after --read-timeout, an idle connection is closed; each an OpenAI-shaped error."""
    server = make_server(connection=FAST)
    big_header = [b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "] + [b"a" * 1024] * 64 + [b"\r\n\r\n"]
    status, error = error_of(exchange(server.url, *big_header)[0])
    assert status == 431 and error["code"] == "request_header_fields_too_large" and "--max-header-bytes" in \
        error["message"]
    status, _ = error_of(exchange(server.url, b"GET /health?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")[0])
    assert status == 431  # the request line, in one piece
    status, error = error_of(exchange(server.url, b"GET /health HTTP/1.1\r\nHost: 127")[0])
    assert status == 408 and "--read-timeout" in error["message"]
    assert exchange(server.url, b"")[0] == b""  # nothing sent: closed without an answer
    short_body = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"ab\"")
    status, error = error_of(exchange(server.url, short_body)[0])
    assert status == 408 and error["code"] == "request_timeout"
    # a body that arrives slowly but never pauses for the timeout is read
    body = json.dumps({"prompt": "First", "max_tokens": 2}).encode()
    slow = [b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)] + [body[i:i + 8] for i in range(0, 32, 8)]
    answer, _ = exchange(server.url, *slow, body[32:], pause=0.2)
    assert answer.startswith(b"HTTP/1.1 200")
    wait_for(lambda: metric(server, 'glmlab_requests_total{endpoint="other",status="431"}') == 2)
    assert metric(server, 'glmlab_requests_total{endpoint="/v1/completions",status="408"}') == 1
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_long_prompt_is_bounded_before_encoding_and_encoded_off_the_event_loop(make_server, monkeypatch):
    """Item 2: a prompt too long by its characters alone is refused without encoding it; any other is encoded on
    a worker thread (the event loop serves the other streams meanwhile) by an encoder that releases the GIL."""
    server = make_server()
    tokenizer = server.app.state.served.tokenizer
    threads, real = [], tokenizer.encode_checked

    def spy(text, what="prompt"):
        threads.append(threading.current_thread())
        return real(text, what)

    monkeypatch.setattr(tokenizer, "encode_checked", spy)
    most = tokenizer.max_token_chars
    assert most is not None and all(len(p) <= most for p in tokenizer.hf.get_vocab(with_added_tokens=True))
    too_long = "a" * (200 * most + 1)  # the shared options allow 200 prompt tokens
    for path, body in (("/v1/completions", {"prompt": too_long}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]})):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert threads == []  # refused before any encoding
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 2}).status_code == 200
    assert httpx.post(server.url + "/tokenize", json={"prompt": "First"}).json()["count"] == 5
    assert len(threads) == 2 and server.thread not in threads and threading.main_thread() not in threads

    ticks, stop = [0], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    text = "First Citizen: " * 40_000
    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        counts = []
        for encode in (lambda: tokenizer.hf.encode(text), lambda: real(text)):
            before = ticks[0]
            encode()
            counts.append(ticks[0] - before)
    finally:
        stop.set()
        ticker.join()
    held, released = counts
    assert released > 3 * max(held, 1)  # the other thread ran while encode_checked worked


SURROGATE = '"ab\\ud800cd"'
MALFORMED = [  # (path, raw body, the words the 400 must have)
    ("/v1/completions", b'{"prompt": ' + SURROGATE.encode() + b', "max_tokens": 2}', "surrogate"),
    ("/tokenize", b'{"prompt": ' + SURROGATE.encode() + b"}", "surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + SURROGATE.encode() + b"}]}",
     "messages[0].content holds a lone"),
    ("/v1/completions", b'{"prompt": "ab", ' + SURROGATE.encode() + b": 1}", "surrogate"),  # in a key
    ("/v1/chat/completions", json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}).encode(), "role"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": {"a": 1}, "content": "hi"}]}).encode(), "role"),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000, "nests"),  # beyond Python's recursion limit
    ("/v1/completions", b'{"prompt": "ab", "stop": ' + b"[" * 70 + b"]" * 70 + b"}", "nests"),
    ("/v1/completions", b'{"prompt": "ab", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("/v1/completions", b'{"prompt": "ab", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    ("/v1/completions", b'{"prompt": "ab", "logit_bias": {"' + b"9" * 5000 + b'": 1}}', "logit_bias"),
]


@pytest.mark.parametrize("path, body, words", MALFORMED)
def test_malformed_bodies_are_400s_not_500s(live, path, body, words):
    """Item 3: lone surrogates, a role that is not a string, deep nesting, numbers of thousands of digits."""
    r = httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert len(r.text) < 1000  # the offending value is not echoed whole


def test_a_content_length_of_forty_digits_is_a_4xx(live):
    answer, _ = exchange(live.url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + b"9" * 40 + b"\r\nConnection: close\r\n\r\n")
    assert error_of(answer)[0] == 400


def test_a_client_that_leaves_mid_body_is_a_499_in_one_log_line(make_server, capsys):
    """Item 4: counted as 499, not 500, and logged in one line, not a traceback."""
    server = make_server()
    for _ in range(3):
        leave_mid_body(server.url)
    wait_for(lambda: 'status="499"' in httpx.get(server.url + "/metrics").text)
    wait_for(lambda: metric(server, 'glmlab_requests_total{endpoint="/v1/completions",status="499"}') == 3)
    text = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in text
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("went away before sending its whole body" in line for line in lines), lines


def test_answers_carry_no_internal_text_or_local_paths(make_server, trained_run, monkeypatch, capsys):
    """Item 5: a 500 says that the server failed, not how (the log says how); the model card names files, never
    where they are."""
    server = make_server()
    card = httpx.get(server.url + "/v1/models/tiny").json()["card"]
    assert card["run_dir"] == trained_run.name and str(trained_run.parent) not in json.dumps(card)
    assert card["training_data"]["dir"] == "char" and "/" not in json.dumps(card["training_data"])

    def broken(*args, **kwargs):
        raise RuntimeError("File /home/someone/glmlab/secret.py, line 3")

    monkeypatch.setattr("glmlab.serve.protocol.completion_request", broken)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "First"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "secret" not in r.text and "/home" not in r.text and "RuntimeError" not in r.text
    log = []  # the log has it (written as the request ends, after the answer left)
    wait_for(lambda: log.append(capsys.readouterr().err) or "secret.py" in "".join(log))


def test_cross_site_requests_are_refused(make_server):
    """Item 6: a body not sent as JSON (a web page's "simple request") is 415; a foreign Host (DNS rebinding) or
    Origin (another site's page) is 403, unless allowed."""
    server = make_server()
    body = json.dumps({"prompt": "First", "max_tokens": 2})
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"], headers
    json_headers = {"Content-Type": "application/json"}
    for foreign in ({"Host": "attacker.example:8000"}, {"Origin": "http://attacker.example"}, {"Origin": "null"}):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={**json_headers, **foreign})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", foreign
    port = server.url.rsplit(":", 1)[1]
    for same in ({"Origin": server.url}, {"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}"}):
        assert httpx.post(server.url + "/v1/completions", content=body, headers={**json_headers, **same}
                          ).status_code == 200, same
    assert httpx.post(server.url + "/v1/completions", content=body,
                      headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    anyone = make_server(allowed_hosts=("*",))
    assert httpx.post(anyone.url + "/v1/completions", content=body,
                      headers={**json_headers, "Host": "attacker.example"}).status_code == 200
    named = make_server(allowed_hosts=("models.lab.example",))
    assert httpx.post(named.url + "/v1/completions", content=body,
                      headers={**json_headers, "Host": "Models.Lab.Example:80"}).status_code == 200


def test_serve_allows_this_machines_names_on_loopback_and_any_name_elsewhere():
    assert allowed_hosts(None, "127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts(None, "0.0.0.0") == ("*",)
    assert allowed_hosts("a.example, b.example", "0.0.0.0") == ("a.example", "b.example")


def test_a_dead_engine_fails_its_requests_cleanly_and_is_started_again(make_server, capsys):
    """Item 7: the requests the engine held fail (a 503, an error event in a stream), the dead process is reaped,
    and a new engine serves the next requests."""
    server = make_server(engine="process")
    scheduler = server.scheduler
    old = scheduler.pid
    long = {"prompt": "First", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(old, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert '"generation_failed"' in rest[-2] and rest[-1] == "data: [DONE]" and "code -9" not in "".join(rest)
    wait_for(lambda: scheduler.alive and scheduler.pid != old, seconds=120)
    assert scheduler.restarts == 1 and not os.path.exists(f"/proc/{old}")  # reaped, not a zombie
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "First", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and httpx.get(server.url + "/health").status_code == 200
    assert "starting a new one" in capsys.readouterr().err


@pytest.mark.slow
def test_an_engine_that_keeps_dying_stops_the_server_with_an_error(trained_run):
    """Item 7: with its restarts spent (--engine-restarts 0: none), glmlab serve exits non-zero, saying why."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "glmlab", "serve", str(trained_run), "--port", "0", "--threads",
                             "1", "--engine-restarts", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert " on http://" in line, line
        url = line.split(" on ", 1)[1].split()[0].rstrip("/")
        assert httpx.get(url + "/health").status_code == 200
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        engine = next(int(pid) for pid in children
                      if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"))
        os.kill(engine, signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = proc.stderr.read()
    assert code == 1 and "the server stopped: the engine process died 1 time within" in rest and "Traceback" not in rest


def test_echoed_special_tokens_are_in_the_text_their_offsets_index(live):
    """Issue 22, item 15: a prompt of token ids with special tokens was echoed without them, so their
    text_offsets pointed at other text."""
    ids = httpx.post(live.url + "/tokenize", json={"prompt": "First"}).json()["tokens"]
    prompt = [ids[0], 0, 1, 2, 3, *ids[1:]]  # <pad> <unk> <bos> <eos> inside the prompt
    choice = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1,
                                                           "max_tokens": 2, "seed": 1}).json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    echoed = len(prompt)
    assert text.startswith("F<pad><unk><bos><eos>irst")
    assert all(text[offset:].startswith(token) for offset, token in
               zip(lp["text_offset"][:echoed], lp["tokens"][:echoed], strict=True))
