"""Drives an ``LLMEngine`` on a background thread for asyncio clients (the server, the bench).

The engine thread owns the engine; other threads talk to it only through a
command queue. Each request gets an asyncio queue of ``RequestOutput``s.
``AsyncEngine`` implements ``arctic_jax.engine.front.EngineFront``.

A failed model step (``StepFailed``) ends only its requests, with a ``RequestFailed`` error
each (the server answers 500); the loop goes on. Any other exception in the loop stops the
engine: every waiting client gets the error and ``alive`` turns false.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry

from arctic_jax.engine.engine import LLMEngine
from arctic_jax.engine.front import EngineLimits, QueueFullError
from arctic_jax.engine.request import RequestOutput
from arctic_jax.engine.step_failure import StepFailed
from arctic_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """One ``LLMEngine`` on its own thread, as an ``EngineFront``; ``max_queue`` bounds the
    requests in flight (more raise ``QueueFullError``)."""

    def __init__(self, engine: LLMEngine, max_queue: int | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self._limits: EngineLimits = engine.limits()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}   # client side: requests in flight (under _lock)
        self._live: dict[str, _Stream] = {}      # engine thread only: requests the engine holds
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arctic-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if self.engine.runner.background is not None:
            self.engine.runner.background.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def failed_replicas(self) -> list[int]:
        """Always empty: one engine runs or fails as a whole (see ``ReplicaRouter``)."""
        return []

    def num_requests(self) -> int:
        with self._lock:
            return len(self._streams)

    def render_metrics(self) -> bytes:
        """The engine's metrics in Prometheus text form."""
        return self.engine.metrics.render()

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The engine's Prometheus registry (collecting it is thread-safe)."""
        return self.engine.metrics.registry

    def limits(self) -> EngineLimits:
        return self._limits

    def validate_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ValueError for a prompt that can never run (reads fixed limits only)."""
        self.engine.validate_prompt(prompt_ids)

    def cached_prefix_tokens(self, prompt_ids: Sequence[int]) -> int:
        """Leading tokens of ``prompt_ids`` whose KV pages the engine holds in its prefix cache.

        A routing hint, safe to ask from any thread without stopping the engine: the lookup
        only hashes the prompt and reads the cache's hash -> page dict one key at a time (each
        read atomic), taking no references. The answer may be stale by the time it is used.
        """
        return self.engine.scheduler.allocator.cached_prefix_tokens(prompt_ids)

    # ------------------------------------------------------------ clients
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; leaving the iterator early aborts it."""
        self.validate_prompt(prompt_ids)
        self.engine.validate_params(params)   # reads fixed limits only
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if not self.alive:  # checked under the lock the failure broadcast takes
                raise RuntimeError("the engine is not running")
            if self.max_queue is not None and len(self._streams) >= self.max_queue:
                raise QueueFullError(f"{len(self._streams)} requests in flight (max {self.max_queue})")
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, list(prompt_ids), params, stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -------------------------------------------------------- engine thread
    def _deliver_all(self, items: Sequence[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs over with one wake-up per client event loop.

        Waking the loop once per step, not once per request, keeps the client
        thread's share of the GIL small at high concurrency.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def _deliver_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        """Outputs go to the stream that submitted the request, looked up on the engine
        thread: a late output of an aborted request never reaches a newer request that
        reuses its id (the abort is applied before that request is added)."""
        items = []
        for out in outputs:
            stream = (self._live.pop(out.request_id, None) if out.finished
                      else self._live.get(out.request_id))
            if stream is not None:
                items.append((stream, out))
        self._deliver_all(items)

    def _on_step_failed(self, failure: StepFailed) -> None:
        """Deliver the other requests' outputs of the failed ``step()`` call, then an error to
        each aborted request's stream (the engine counted the failure in its metrics)."""
        log.error("%s: %s", failure, ", ".join(failure.request_ids), exc_info=failure.cause)
        self._deliver_outputs(failure.outputs)
        streams = (self._live.pop(rid, None) for rid in failure.request_ids)
        items = [(stream, failure.request_error()) for stream in streams if stream is not None]
        self._deliver_all(items)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, stream = cmd
                try:
                    self.engine.add_request(ids, params, request_id=rid)
                except Exception as e:  # one bad request must not stop the loop
                    self._deliver_all([(stream, e if isinstance(e, ValueError)
                                        else RuntimeError(str(e)))])
                else:
                    self._live[rid] = stream
            elif cmd[0] == "abort":
                if self._live.pop(cmd[1], None) is not None:
                    self.engine.abort(cmd[1])

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except StepFailed as failure:
                    self._on_step_failed(failure)
                    continue
                if outputs:
                    self._deliver_outputs(outputs)
        except BaseException as e:  # report to every waiting client
            log.exception("engine loop failed")
            with self._lock:
                self.error = e
                streams = list(self._streams.values())
            self._deliver_all([(st, RuntimeError(f"engine failure: {e}")) for st in streams])
