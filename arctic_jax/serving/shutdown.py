"""Graceful shutdown: ``ShutdownGate`` (the drain's state, shared by the app and the server) and
``DrainMiddleware`` (counts requests in flight; answers 503 to new ones while draining).

On SIGTERM or SIGINT (``graceful_server.GracefulServer``): ``begin`` turns /health to 503 and
new requests to 503 with ``Retry-After``; requests in flight run on until none is left or
``timeout`` seconds have passed; then ``abort_all`` ends the rest with an error (an SSE error
event for a stream, a 503 body otherwise) and the server exits.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from arctic_jax.serving.errors import RETRY_AFTER_S, APIError

# Paths that keep answering while draining (/health answers 503 itself).
UNGATED_PATHS = ("/health", "/metrics")
ABORT_GRACE_S = 5.0   # after aborting, how long the aborted responses get to finish


class Abortable(Protocol):
    def fail(self, error: APIError) -> None:
        """End this work with ``error`` (must not block)."""


class ShutdownGate:
    """The drain's state. ``begin`` may be called from a signal handler (it only sets fields);
    the rest runs on the event loop."""

    def __init__(self) -> None:
        self.draining = False
        self.aborted = False
        self.active = 0               # HTTP requests in flight on gated paths
        self.deadline = 0.0
        self._work: set[Abortable] = set()

    def begin(self, timeout: float) -> None:
        """Start draining; requests in flight get ``timeout`` seconds. A second call aborts
        them now."""
        now = time.monotonic()
        self.deadline = now + timeout if not self.draining else min(self.deadline, now)
        self.draining = True

    def track(self, work: Abortable) -> None:
        self._work.add(work)

    def untrack(self, work: Abortable) -> None:
        self._work.discard(work)

    def refusal(self) -> APIError:
        """The 503 a new request gets while draining."""
        return APIError(503, "the server is shutting down; retry on another server or once it "
                             "has restarted", type="server_error", code="shutting_down",
                        headers={"Retry-After": str(RETRY_AFTER_S)})

    def abort_error(self) -> APIError:
        """The error that ends a request still running when the drain times out."""
        return APIError(503, "the server shut down before this request finished "
                             "(--shutdown-timeout elapsed)", type="server_error",
                        code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})

    def abort_all(self) -> None:
        self.aborted = True
        for work in list(self._work):
            work.fail(self.abort_error())

    def may_exit(self) -> bool:
        """Called on the event loop while draining: aborts what is left at the deadline; True
        once nothing runs (or the aborted requests had ``ABORT_GRACE_S`` to finish)."""
        now = time.monotonic()
        if self.active == 0:
            return True
        if now >= self.deadline and not self.aborted:
            self.abort_all()
        return self.aborted and now >= self.deadline + ABORT_GRACE_S


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


class DrainMiddleware:
    """ASGI middleware: counts HTTP requests in flight (``gate.active``) on every path but
    ``UNGATED_PATHS``; while the gate drains, such requests get ``gate.refusal()``."""

    def __init__(self, app: ASGIApp, gate: ShutdownGate):
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.gate.draining:
            await self.gate.refusal().response()(scope, receive, send)
            return
        self.gate.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.active -= 1
