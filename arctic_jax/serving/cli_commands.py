"""The ``arctic-jax serve`` subcommand, and ``ServerProcess`` to run it as a child process.

Start-up order: the HTTP port opens at once (``/health`` answers 503), then the
model loads, every step bucket is compiled ahead of time (progress bar on
stderr), the engine thread starts, and ``/health`` turns 200 ("ready" on stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from arctic_jax.cli_args import add_model_args, engine_kwargs, parse_dtype

log = logging.getLogger(__name__)

API_KEY_ENV = "ARCTIC_JAX_API_KEY"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub: Any) -> None:
    """Add ``serve`` to the subparsers ``sub``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue", type=_positive, default=None,
                   help="most requests in flight; more get 429 (default: unlimited)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the checkpoint's name)")
    p.add_argument("--data-parallel-size", "-dp", type=_positive, default=1, metavar="N",
                   help="N one-device engine replicas (devices 0..N-1) behind a router that "
                        "balances requests in flight and keeps shared prefixes together")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from arctic_jax.serving.app import ServerState, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    state = ServerState(served_model_name=args.served_model_name, api_key=args.api_key or None)
    level = args.log_level.lower()
    server = uvicorn.Server(uvicorn.Config(
        create_app(state), host=args.host, port=args.port,
        log_level=level if level in ("critical", "error", "warning", "info", "debug", "trace")
        else "warning", timeout_graceful_shutdown=5))

    def load() -> None:
        from arctic_jax.engine.replicas import build_engines, serving_front
        from arctic_jax.llm import LLM

        try:
            start = time.perf_counter()

            def build(kwargs: dict) -> tuple:
                llm = LLM(args.model, dtype=parse_dtype(args.dtype), **kwargs)
                return llm.engine, llm

            dp = args.data_parallel_size
            engines, llm = build_engines(build, engine_kwargs(args), dp)
            warm = sum(e.runner.warmup(progress=True) for e in engines)
            engine = serving_front(engines, max_queue=args.max_queue)
            engine.start()
            state.set_ready(engine, llm.tokenizer, llm.model_name)
            where = "" if dp == 1 else f", {dp} data-parallel replicas"
            print(f"arctic-jax serve: ready: model '{state.served_model_name}' on "
                  f"http://{args.host}:{args.port}{where} (start-up "
                  f"{time.perf_counter() - start:.1f} s, of which compiling {warm:.1f} s)",
                  file=sys.stderr, flush=True)
        except BaseException as e:  # reported, then the server stops
            state.startup_error = f"{type(e).__name__}: {e}"
            log.debug("start-up failed", exc_info=True)
            print(f"arctic-jax serve: error: start-up failed: {state.startup_error}",
                  file=sys.stderr, flush=True)
            server.should_exit = True

    loader = threading.Thread(target=load, name="arctic-load", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.shutdown()
    return 1 if state.startup_error else 0


# ------------------------------------------------------------- child process
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m arctic_jax.cli serve ARGS`` in a child process; output goes to a log file.

    ``wait_ready`` polls ``/health`` until 200; ``stop`` terminates it. Usable as a
    context manager.
    """

    def __init__(self, args: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="arctic-serve-", suffix=".log",
                                                delete=False)
        self.log_path = self._log.name
        cmd = [sys.executable, "-m", "arctic_jax.cli", "serve", "--host", host,
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-chars:]

    def health(self) -> tuple[int, dict]:
        """(status, body) of GET /health; (0, {}) when the port does not answer."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, {}

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            if self.health()[0] == 200:
                return
            time.sleep(0.25)
        raise TimeoutError(f"the server was not ready after {timeout} s:\n" + self.log_tail())

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
