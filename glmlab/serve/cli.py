"""``glmlab serve RUN_DIR``: the command's flags and what it runs (wired into :mod:`glmlab.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys

from glmlab.errors import GlmlabError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a run over HTTP: OpenAI-compatible API, metrics and a web playground",
        description="Serve a trained run: POST /v1/completions and /v1/chat/completions (OpenAI's shapes, "
                    "streaming), /tokenize, /detokenize, the /v1/vae/* latent tools for vae runs, GET /metrics "
                    "(Prometheus) and a web playground at /. Concurrent requests are decoded together "
                    "(continuous batching). Binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; "
                   "0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on every "
                   "endpoint but /health (default: $GLMLAB_API_KEY, else none). A key on the command line shows in "
                   "the process list: prefer the GLMLAB_API_KEY environment variable. Printable ASCII; surrounding "
                   "spaces are dropped")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run "
                   "directory's name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot; more are "
                   "answered 429 with Retry-After (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt accepted, in tokens "
                   "(default 8192; prompts longer than the context keep their last tokens)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for "
                   "(default 2048)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (completions per prompt) (default 16)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-header-bytes", type=int, default=32 * 1024, help="largest request line and headers, "
                   "together; more is answered 431 (default 32 KiB)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds a client may take to send a request's "
                   "line and headers, and may pause inside its body; then 408 (default 10)")
    p.add_argument("--allowed-hosts", default=None, metavar="NAME[,NAME...]",
                   help="host names requests may carry in Host and Origin ('*': any). Default: on a loopback "
                        "--host, localhost, 127.0.0.1 and ::1 only, so no web page, and no name pointed at this "
                        "machine by another site (DNS rebinding), can use the server; on any other --host, any")
    p.add_argument("--checkpoint", default="best", metavar="best|last|step-N",
                   help="which weights to serve: best, last or a checkpoint's name (step-N), checked against its "
                        "checksum first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--decode-weights", default="native", choices=("native", "int8"),
                   help="int8: int8 matrices for decoding on a CPU (gpt runs)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode through steps compiled ahead of time (gpt on a CPU; a C++ compiler): one per batch "
                        "size the continuous batch steps with (1, 2, 4, ... up to --max-batch), compiled at startup "
                        "before the server takes requests (~15-30 s each for a small model, once: later starts load "
                        "them from $GLMLAB_CACHE_DIR, default ~/.cache/glmlab)")
    p.add_argument("--engine", default="process", choices=("process", "thread"),
                   help="process (default): the model decodes in a process of its own, so its Python and the "
                        "HTTP server's never wait for each other's interpreter lock (the server keeps a second "
                        "copy of the model, on the CPU, for echo log-probabilities and the vae tools); thread: "
                        "one process (a bert run, which writes by mask-predict, is always served in one process)")
    p.add_argument("--engine-restarts", type=int, default=3, metavar="N",
                   help="an engine process that dies (e.g. killed for memory) fails the requests it held (503) and "
                        "is started again, up to N times within a minute; one more and glmlab serve exits with an "
                        "error, for a supervisor to act on (default 3; 0: exit at the first)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (default 0: PyTorch's choice)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")
    p.set_defaults(handler=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    positive = {"--port": args.port, "--max-batch": args.max_batch, "--max-queue": args.max_queue,
                "--max-prompt-tokens": args.max_prompt_tokens, "--max-tokens": args.max_tokens,
                "--max-n": args.max_n, "--max-body-bytes": args.max_body_bytes,
                "--max-header-bytes": args.max_header_bytes}
    for flag, value in positive.items():
        if value < 1 and not (flag == "--port" and value == 0):
            raise GlmlabError(f"{flag} {value} must be at least 1", f"give {flag} a positive number")
    if not 0 <= args.port <= 65535:
        raise GlmlabError(f"--port {args.port} is not a TCP port", "use a port between 1 and 65535")
    if not args.read_timeout > 0 or args.read_timeout == float("inf"):
        raise GlmlabError(f"--read-timeout {args.read_timeout} must be a positive number of seconds", "e.g. 10")
    if args.engine_restarts < 0:
        raise GlmlabError(f"--engine-restarts {args.engine_restarts} must be >= 0", "use 0 to exit at the first death")
    if args.threads < 0:
        raise GlmlabError(f"--threads {args.threads} must be >= 0", "use 0 for PyTorch's default")
    if args.api_key is not None and not args.api_key.strip():
        raise GlmlabError("--api-key is empty", "give a key, or drop --api-key to serve without one")
    key = args.api_key if args.api_key is not None else os.environ.get("GLMLAB_API_KEY")
    if key:
        from glmlab.serve.context import checked_api_key

        checked_api_key(key)  # before the model loads


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(flag: str | None, host: str) -> tuple[str, ...]:
    """The Host/Origin names to accept: ``--allowed-hosts``, else this machine's names on a loopback --host (with
    --host itself), else any."""
    from glmlab.serve.context import ANY_HOST, LOOPBACK_HOSTS

    if flag is not None:
        names = tuple(name.strip() for name in flag.split(",") if name.strip())
        if not names:
            raise GlmlabError("--allowed-hosts is empty", "give host names separated by commas, or '*' for any")
        return names
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, host))) if _loopback(host) else (ANY_HOST,)


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    if not _loopback(host) and api_key is None:
        print(f"glmlab serve: note: listening on {host} without --api-key: anyone who can reach this address "
              "can use the model", file=sys.stderr)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails fast and clearly."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise GlmlabError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          "choose another --port (or stop the program using it), or check --host") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    _check(args)
    sock = _bind(args.host, args.port)
    try:
        return _run(args, sock)
    finally:
        sock.close()


def _run(args: argparse.Namespace, sock: socket.socket) -> int:
    import torch
    import uvicorn

    from glmlab.runs import load_run
    from glmlab.runtime import select_device
    from glmlab.serve.app import ServeOptions, create_app
    from glmlab.serve.fields import Limits
    from glmlab.serve.http import ConnectionLimits, server_config
    from glmlab.serve.scheduler import SchedulerStopped

    api_key = args.api_key if args.api_key is not None else (os.environ.get("GLMLAB_API_KEY") or None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    # with an engine process the model decodes there; this process's copy (echo log-probabilities, the vae
    # tools) stays on the CPU, so an accelerator holds one copy, not two
    run = load_run(args.run_dir, checkpoint=args.checkpoint,
                   device="cpu" if args.engine == "process" else device)
    if not run.model.traits.left_to_right:  # a bert writes by mask-predict here, in this process (no engine)
        run.model.to(device)
    run.use_decode_weights(args.decode_weights)
    name = args.model_name or run.run_dir.resolve().name
    options = ServeOptions(model_name=name, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                           limits=Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                                         max_n=args.max_n, max_body_bytes=args.max_body_bytes),
                           checkpoint=args.checkpoint, engine=args.engine, decode_weights=args.decode_weights,
                           compile_decode=args.compile_decode,
                           engine_device=str(device), engine_restarts=args.engine_restarts,
                           allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
                           connection=ConnectionLimits(args.max_header_bytes, args.read_timeout))
    app = create_app(run, options)
    if app.state.served.engine == "process":  # load the engine's copy now: an error here, not in uvicorn's startup
        try:
            app.state.scheduler.start()
        except SchedulerStopped as exc:  # the engine's own error may carry its fix already
            raise GlmlabError(str(exc), None if "\n  fix:" in str(exc) else
                              "check --device and --decode-weights (int8 runs on a CPU), or serve in one "
                              "process with --engine thread") from None
    _warn_if_exposed(args.host, api_key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"glmlab serve: {name} ({run.config.model.family}) on http://{shown}:{port}/  "
          f"(playground at /, API at /v1, metrics at /metrics; Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(server_config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    scheduler = app.state.scheduler
    if app.state.served.engine == "process":  # an engine that keeps dying stops the server (a supervisor restarts it)
        scheduler.on_give_up = lambda: setattr(server, "should_exit", True)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it stopped on: the normal end
        server.run(sockets=[sock])
    if scheduler.gave_up:
        raise GlmlabError(f"the server stopped: {scheduler.failure}", "the log above says why the engine died "
                          "(often memory: a smaller --max-batch, or --decode-weights int8 on a CPU)")
    print("glmlab serve: stopped", file=sys.stderr)
    return 0
