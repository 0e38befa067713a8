"""The ``arctic-jax serve`` subcommand, and ``ServerProcess`` to run it as a child process.

Start-up order: the HTTP port opens at once (``/health`` answers 503), then the
model loads, every step bucket is compiled ahead of time (progress bar on
stderr), the engine thread starts, and ``/health`` turns 200 ("ready" on stderr).
A text-generation model serves /v1/completions and /v1/chat/completions; an
embedding model (``ModelSpec.task == "embed"``, e.g. all-MiniLM-L6-v2) serves
/v1/embeddings on an ``AsyncEmbeddingEngine``.
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

from arctic_jax.cli_args import (
    DEFAULT_MAX_EMBEDDING_INPUTS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    EMBEDDING_ENGINE_FLAGS,
    EMBEDDING_ONLY_FLAGS,
    add_embedding_only_args,
    add_model_args,
    embedding_engine_kwargs,
    engine_kwargs,
    llm_only_flags_given,
    parse_dtype,
)
from arctic_jax.serving.server_replicas import REPLICA_ENV, reuse_port_socket, run_replicas

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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def register(sub: Any) -> None:
    """Add ``serve`` to the subparsers ``sub``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions and chat, or "
                                     "embeddings for an embedding model)")
    add_model_args(p, embeddings=True)
    add_embedding_only_args(p)
    p.add_argument("--max-embedding-inputs", type=_positive, default=None, metavar="N",
                   help="embedding models: most inputs in one /v1/embeddings request (default "
                        f"{DEFAULT_MAX_EMBEDDING_INPUTS})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue", type=_positive, default=None,
                   help="most requests in flight; more get 429 (default: unlimited)")
    p.add_argument("--max-request-bytes", type=_positive, default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="N", help="larger request bodies get 413 before they are parsed "
                                     f"(default {DEFAULT_MAX_REQUEST_BYTES}, 8 MiB)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   metavar="S", help="on SIGTERM or SIGINT: /health and new requests get 503, "
                                     "requests in flight get up to S seconds to finish, then "
                                     "end with an error, and the server exits 0 (default "
                                     f"{DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) clients send in 'model' and /v1/models lists; "
                        "responses carry the first (default: the checkpoint's name, e.g. "
                        "SmolLM2-135M-Instruct.Q4_1). 'default' is accepted too when the "
                        "embedded default model is served")
    p.add_argument("--background-compile", choices=("auto", "on", "off"), default="auto",
                   help="text-generation models: report ready once the programs of steps up to "
                        f"{FIRST_STEP_TOKENS} tokens are compiled and compile the larger steps' "
                        "in the background; until they are ready, steps hold at most the "
                        "compiled sizes (long prompts are prefilled in smaller chunks; no step "
                        "ever waits on a compile). auto (default): on for a CPU; off on a GPU, "
                        "where every program is compiled and run once before ready")
    p.add_argument("--data-parallel-size", "-dp", type=_positive, default=1, metavar="N",
                   help="N one-device engine replicas (devices 0..N-1) behind a router that "
                        "balances requests in flight and keeps shared prefixes together "
                        "(text-generation models)")
    p.add_argument("--replicas-per-gpu", type=_positive, default=1, metavar="N",
                   help="run N whole servers (each its own model copy and engine, 1/N of the "
                        "device memory) on one port with SO_REUSEPORT: the kernel spreads "
                        "connections over them, so one replica's host work (HTTP, JSON, "
                        "tokenization) overlaps another's device work. Responses carry "
                        "X-Arctic-Replica; /health and /metrics describe the replica that "
                        "answers (default 1)")
    p.set_defaults(func=cmd_serve)


# Steps of up to this many tokens are compiled before a CPU server reports ready.
FIRST_STEP_TOKENS = 16


def _load_llm(args: argparse.Namespace, state: Any) -> float:
    from arctic_jax.engine.replicas import build_engines, serving_front
    from arctic_jax.llm import LLM

    for flag in (*EMBEDDING_ONLY_FLAGS, "max_embedding_inputs"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to embedding models only; "
                             f"{args.model} is a text-generation model")

    built: list = []

    def build(kwargs: dict) -> tuple:
        llm = LLM(args.model, dtype=parse_dtype(args.dtype),
                  compilation_cache_dir=args.compilation_cache_dir, **kwargs)
        built.append(llm)
        return llm.engine, llm

    engines, llm = build_engines(build, engine_kwargs(args), args.data_parallel_size)
    print(f"arctic-jax serve: {engines[0].kv_cache_summary()}"
          + (f" (each of {len(engines)} replicas)" if len(engines) > 1 else ""),
          file=sys.stderr, flush=True)
    first = _first_steps(args, engines[0].runner)
    warm = sum(e.runner.warmup(progress=True, upto_tokens=first) for e in engines)
    if first is None:
        for each in built:
            each.compilation_cache.stop()
    state.compilation_cache = built[0].compilation_cache  # counted from the first load on
    engine = serving_front(engines, max_queue=args.max_queue)
    engine.start()
    state.set_ready(engine, llm.tokenizer, llm.model_name,
                    aliases=default_model_aliases(args.model))
    if first is not None:
        _compile_rest_in_background([e.runner for e in engines], first, built)
    return warm


def _first_steps(args: argparse.Namespace, runner: Any) -> int | None:
    """The largest token bucket compiled before ready (None: all of them)."""
    import jax

    on = args.background_compile == "on" or (args.background_compile == "auto"
                                              and jax.default_backend() == "cpu")
    tokens = runner.buckets.tokens
    first = max((t for t in tokens if t <= FIRST_STEP_TOKENS), default=tokens[0])
    return first if on and first < tokens[-1] else None


def _compile_rest_in_background(runners: list, first: int, built: list) -> None:
    """Start each replica's background compilation; one line on stderr when all are done."""
    left = [len(runners)]
    lock = threading.Lock()

    def done(seconds: float, error: BaseException | None) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        for each in built:
            each.compilation_cache.stop()
        n = sum(r.background.total for r in runners)
        status = "" if error is None else f" (failed: {error!r}; steps stay at {first} tokens)"
        print(f"arctic-jax serve: compiled the larger steps' {n} programs in the background in "
              f"{seconds:.1f} s{status}; {built[0].compilation_cache.summary()}",
              file=sys.stderr, flush=True)

    print(f"arctic-jax serve: compiling the programs of steps above {first} tokens in the "
          f"background; until then steps hold at most {first} tokens", file=sys.stderr,
          flush=True)
    for runner in runners:
        runner.compile_in_background(first, on_done=done)


def _load_embedding(args: argparse.Namespace, state: Any) -> float:
    from arctic_jax.embedder import Embedder
    from arctic_jax.engine.embedding_front import AsyncEmbeddingEngine

    unused = llm_only_flags_given(args)
    if args.data_parallel_size != 1:
        unused.append("--data-parallel-size")
    if unused:
        takes = ", ".join("--" + f.replace("_", "-") for f in EMBEDDING_ENGINE_FLAGS)
        raise ValueError(f"{', '.join(unused)}: not for an embedding model ({args.model}); its "
                         f"engine takes --dtype, {takes}")
    embedder = Embedder(args.model, dtype=parse_dtype(args.dtype),
                        compilation_cache_dir=args.compilation_cache_dir,
                        **embedding_engine_kwargs(args))
    warm = embedder.engine.warmup(progress=True)
    embedder.compilation_cache.stop()
    state.compilation_cache = embedder.compilation_cache
    front = AsyncEmbeddingEngine(embedder.engine, max_queue=args.max_queue)
    front.start()
    state.max_embedding_inputs = args.max_embedding_inputs or DEFAULT_MAX_EMBEDDING_INPUTS
    state.set_embedding_ready(front, embedder.tokenizer, embedder.model_name)
    return warm


def default_model_aliases(model: str | None) -> tuple[str, ...]:
    """``("default",)`` when ``model`` is the embedded default model (named ``default``, or
    the path of its GGUF file), else ``()``: requests may name it ``default`` as well."""
    from checkpoints.errors import CheckpointError
    from checkpoints.loader import default_model_path

    if model in (None, "default"):
        return ("default",)
    try:
        embedded = default_model_path()
    except CheckpointError:
        return ()
    same = os.path.exists(model) and os.path.samefile(model, embedded)
    return ("default",) if same else ()


def load_engine(args: argparse.Namespace, state: Any) -> float:
    """Load ``args.model``, compile every program ahead of time, start its engine and make
    ``state`` (a ``ServerState``) ready; returns the seconds spent compiling. An embedding
    model (``ModelSpec.task == "embed"``) gets an ``AsyncEmbeddingEngine``, any other model
    an ``EngineFront`` (``--data-parallel-size`` replicas)."""
    from checkpoints.loader import model_task

    if model_task(args.model) == "embed":
        return _load_embedding(args, state)
    return _load_llm(args, state)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from arctic_jax.serving.app import ServerState, create_app
    from arctic_jax.serving.graceful_server import GracefulServer

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.replicas_per_gpu > 1:
        return _serve_replicas(args)
    state = ServerState(served_model_name=args.served_model_name or None,
                        api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                        shutdown_timeout=args.shutdown_timeout,
                        replica=os.environ.get(REPLICA_ENV))
    level = args.log_level.lower()
    server = GracefulServer(uvicorn.Config(
        create_app(state), host=args.host, port=args.port,
        log_level=level if level in ("critical", "error", "warning", "info", "debug", "trace")
        else "warning", timeout_graceful_shutdown=5), state.shutdown_gate, state.shutdown_timeout)

    def load() -> None:
        try:
            start = time.perf_counter()
            warm = load_engine(args, state)
            dp = args.data_parallel_size
            where = "" if dp == 1 else f", {dp} data-parallel replicas"
            if state.task == "embed":
                where = ", embeddings"
            print(f"arctic-jax serve: ready: model '{state.served_model_name}' on "
                  f"http://{args.host}:{args.port}{where} (start-up "
                  f"{time.perf_counter() - start:.1f} s, of which compiling {warm:.1f} s; "
                  f"{state.compilation_cache.summary()})", file=sys.stderr, flush=True)
        except BaseException as e:  # reported, then the server stops
            state.startup_error = f"{type(e).__name__}: {e}"
            log.debug("start-up failed", exc_info=True)
            print(f"arctic-jax serve: error: start-up failed: {state.startup_error}",
                  file=sys.stderr, flush=True)
            server.should_exit = True

    loader = threading.Thread(target=load, name="arctic-load", daemon=True)
    loader.start()
    try:
        # a replica of --replicas-per-gpu shares the port with its siblings
        server.run(sockets=None if state.replica is None
                   else [reuse_port_socket(args.host, args.port)])
    finally:
        state.shutdown()
    return 1 if state.startup_error else 0


def _serve_replicas(args: argparse.Namespace) -> int:
    if args.port == 0:
        raise ValueError("--replicas-per-gpu needs a fixed --port (the replicas share it)")
    if args.data_parallel_size != 1:
        raise ValueError("--replicas-per-gpu and --data-parallel-size cannot be combined: "
                         "replicas share one device, data-parallel engines take one each")
    argv = list(args.argv)
    return run_replicas(argv[argv.index("serve") + 1:], args.replicas_per_gpu)


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
