"""``serve --replicas-per-gpu N``: N whole servers on one device, behind one port.

One server process does its HTTP, JSON, tokenization and response encoding on one Python
thread; for an embedding model on a GPU that host work, not the device, bounds the throughput.
Arctic Inference's answer is several replicas per GPU, and so is this: the parent process
starts N child ``serve`` processes with the same flags, each binding the same host and port with
``SO_REUSEPORT``, so the kernel spreads incoming connections over them; one replica's host work
overlaps another's device work. Each child is a complete server (its own model copy, engine,
``/health`` and ``/metrics``, which therefore describe the replica that answered) and sends the
header ``X-Arctic-Replica: i``. On a GPU each child takes ``1/N`` of the memory the first would
(``XLA_PYTHON_CLIENT_MEM_FRACTION``).

The parent forwards SIGTERM and SIGINT to the children (each drains as one server does) and
exits with the first non-zero exit status among them, 0 if none; if one child dies, the others
are stopped too.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

REPLICA_HEADER = "X-Arctic-Replica"
REPLICA_ENV = "ARCTIC_JAX_REPLICA"          # set in each child: its index
DEFAULT_MEM_FRACTION = 0.75                 # XLA's default share of GPU memory for one process
POLL_S = 0.2


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) that other processes may bind too
    (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def child_argv(argv: Sequence[str]) -> list[str]:
    """The ``serve`` arguments of one replica: the parent's, without ``--replicas-per-gpu``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--replicas-per-gpu":
            skip = True
        elif not arg.startswith("--replicas-per-gpu="):
            out.append(arg)
    return out


def child_env(index: int, replicas: int) -> dict[str, str]:
    env = dict(os.environ)
    env[REPLICA_ENV] = str(index)
    share = float(env.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION)) / replicas
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{share:.4f}"
    return env


def _end_with_parent() -> None:
    """In a child before exec: on Linux, get SIGTERM when the parent dies (even by SIGKILL), so
    no replica outlives it; elsewhere nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_replicas(serve_argv: Sequence[str], replicas: int) -> int:
    """Run ``replicas`` child servers with ``serve_argv`` (the parent's ``serve`` arguments) and
    wait for them; returns the exit status (see the module docstring)."""
    argv = [sys.executable, "-m", "arctic_jax.cli", "serve", *child_argv(serve_argv)]
    children = [subprocess.Popen(argv, env=child_env(i, replicas), preexec_fn=_end_with_parent)
                for i in range(replicas)]
    print(f"arctic-jax serve: {replicas} replicas (pids {', '.join(str(c.pid) for c in children)})"
          " share the port; each reports ready on its own", file=sys.stderr, flush=True)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while all(c.poll() is None for c in children):
            time.sleep(POLL_S)
        if any(c.returncode not in (None, 0) for c in children):   # one failed: stop the rest
            forward(signal.SIGTERM, None)
        codes = [c.wait() for c in children]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return next((c for c in codes if c != 0), 0)


class ReplicaHeader:
    """ASGI middleware: every HTTP response carries ``X-Arctic-Replica: replica``."""

    def __init__(self, app: Any, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
