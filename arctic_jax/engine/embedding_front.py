"""Drives an ``EmbeddingEngine`` on a background thread for asyncio clients (the server).

Requests (lists of token-id sequences) are validated in the caller, then queued. The worker
thread coalesces the queue into device batches by the token budget: one batch may hold
sequences of several requests, and a large request spreads over several batches. It launches
batch n+1 before reading back batch n, so host packing overlaps the device. Each request gets
its embeddings [N, d] in input order once all its sequences are back; an error in a batch
fails only the requests with sequences in that batch.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from arctic_jax.engine.embedding_config import EmbeddingLimits
from arctic_jax.engine.embedding_engine import EmbeddingEngine
from arctic_jax.engine.embedding_scheduler import BatchShape
from arctic_jax.engine.front import QueueFullError

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Request:
    seqs: list[np.ndarray]
    dimensions: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float
    rows: np.ndarray
    next_seq: int = 0       # the first sequence not yet sent to the device
    remaining: int = 0      # sequences not yet read back
    started: bool = False   # a batch holding one of its sequences was launched
    done: bool = False      # finished, failed or cancelled


def _resolve(future: asyncio.Future, value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


# One launched batch: the (request, first, end) sequence ranges it holds, its shape, its result.
_Part = tuple[_Request, int, int]
_Inflight = tuple[list[_Part], BatchShape, Any]


class AsyncEmbeddingEngine:
    """An ``EmbeddingEngine`` on its own thread for asyncio clients; ``max_queue`` bounds the
    requests in flight (more raise ``QueueFullError``)."""

    def __init__(self, engine: EmbeddingEngine, max_queue: int | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = engine.metrics
        self._cond = threading.Condition()
        self._pending: collections.deque[_Request] = collections.deque()  # under _cond
        self._requests: set[_Request] = set()                              # under _cond
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="arctic-embed", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def limits(self) -> EmbeddingLimits:
        return self.engine.limits

    def num_requests(self) -> int:
        with self._cond:
            return len(self._requests)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    # ------------------------------------------------------------ clients
    def validate(self, token_ids: Sequence[Sequence[int]], dimensions: int | None = None,
                 truncate_prompt_tokens: int | None = None) -> tuple[list[np.ndarray], int | None]:
        """The validated sequences and Matryoshka width of a request; ValueError for a bad
        one (see ``EmbeddingEngine.prepare`` and ``check_dimensions``)."""
        dims = self.engine.check_dimensions(dimensions)
        return self.engine.prepare(token_ids, truncate_prompt_tokens), dims

    async def embed(self, token_ids: Sequence[Sequence[int]], *, dimensions: int | None = None,
                    truncate_prompt_tokens: int | None = None) -> np.ndarray:
        """Embeddings [N, d] float32 of one request's N sequences, in input order.

        Raises ValueError (bad request, before anything is queued), ``QueueFullError`` (too many
        requests in flight) or RuntimeError (the engine failed). Cancelling the awaiting task
        drops the request's sequences not yet launched.
        """
        seqs, dims = self.validate(token_ids, dimensions, truncate_prompt_tokens)
        return await self.submit(seqs, dims)

    async def submit(self, seqs: list[np.ndarray], dimensions: int | None) -> np.ndarray:
        """``embed`` of a request that ``validate`` already returned (a server may validate in
        a worker thread, off its event loop)."""
        if not seqs:
            raise ValueError("no inputs: the list of sequences is empty")
        loop = asyncio.get_running_loop()
        req = _Request(seqs=seqs, dimensions=dimensions, loop=loop, future=loop.create_future(),
                       arrival=time.monotonic(),
                       rows=np.empty((len(seqs), self.engine.hidden_size), np.float32),
                       remaining=len(seqs))
        with self._cond:
            if not self.alive or self._stop:
                raise RuntimeError("the embedding engine is not running")
            if self.max_queue is not None and len(self._requests) >= self.max_queue:
                raise QueueFullError(f"{len(self._requests)} requests in flight "
                                     f"(max {self.max_queue})")
            self._requests.add(req)
            self._pending.append(req)
            self.metrics.waiting.set(len(self._pending))
            self.metrics.running.set(len(self._requests))
            self._cond.notify()
        self.metrics.requests.inc()
        self.metrics.on_sequences(len(seqs), sum(len(s) for s in seqs))
        try:
            return await req.future
        except asyncio.CancelledError:
            self._drop(req)
            raise
        finally:
            with self._cond:
                self._requests.discard(req)
                self.metrics.running.set(len(self._requests))

    # ------------------------------------------------------------ worker
    def _drop(self, req: _Request) -> None:
        """Stop a request (cancelled or failed): its unsent sequences are never launched."""
        with self._cond:
            if req.done:
                return
            req.done = True
            if req.next_seq < len(req.seqs):
                self._pending = collections.deque(r for r in self._pending if r is not req)
                self.metrics.waiting.set(len(self._pending))
        self.metrics.failed.inc()

    def _fail(self, reqs: Sequence[_Request], error: BaseException) -> None:
        for req in dict.fromkeys(reqs):  # unique, in order
            if not req.done:
                self._drop(req)
                req.loop.call_soon_threadsafe(_resolve, req.future, error)

    def _take(self) -> tuple[list[_Part], BatchShape] | None:
        """The next batch from the queue head (called under ``_cond``); None if it is empty."""
        max_seqs = self.engine.limits.max_num_seqs
        head: list[int] = []
        for req in self._pending:
            for seq in req.seqs[req.next_seq:req.next_seq + max_seqs - len(head)]:
                head.append(len(seq))
            if len(head) == max_seqs:
                break
        if not head:
            return None
        shape = self.engine.plan_next(head)
        parts: list[_Part] = []
        need = shape.num_seqs
        now = time.monotonic()
        while need:
            req = self._pending[0]
            n = min(need, len(req.seqs) - req.next_seq)
            parts.append((req, req.next_seq, req.next_seq + n))
            req.next_seq += n
            need -= n
            if not req.started:
                req.started = True
                self.metrics.queue_time.observe(now - req.arrival)
            if req.next_seq == len(req.seqs):
                self._pending.popleft()
        self.metrics.waiting.set(len(self._pending))
        return parts, shape

    def _launch(self, parts: list[_Part], shape: BatchShape) -> _Inflight | None:
        seqs = [s for req, lo, hi in parts for s in req.seqs[lo:hi]]
        try:
            return parts, shape, self.engine.dispatch(seqs, shape)
        except Exception as e:  # fails this batch's requests only
            log.exception("embedding batch launch failed")
            self._fail([p[0] for p in parts], RuntimeError(f"embedding batch failed: {e}"))
            return None

    def _complete(self, inflight: _Inflight) -> None:
        parts, shape, out = inflight
        try:
            rows = self.engine.collect(out, shape.num_seqs)
        except Exception as e:
            log.exception("embedding batch failed")
            self._fail([p[0] for p in parts], RuntimeError(f"embedding batch failed: {e}"))
            return
        offset = 0
        for req, lo, hi in parts:
            n = hi - lo
            if not req.done:
                req.rows[lo:hi] = rows[offset:offset + n]
                req.remaining -= n
                if req.remaining == 0:
                    self._finish(req)
            offset += n

    def _finish(self, req: _Request) -> None:
        with self._cond:
            req.done = True
        try:
            result: Any = self.engine.finish(req.rows, req.dimensions)
        except Exception as e:  # a bug, reported to this request only
            self.metrics.failed.inc()
            result = RuntimeError(f"embedding failed: {e}")
        else:
            self.metrics.e2e.observe(time.monotonic() - req.arrival)
        req.loop.call_soon_threadsafe(_resolve, req.future, result)

    def _run(self) -> None:
        inflight: collections.deque[_Inflight] = collections.deque()
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._pending and not inflight:
                        self._cond.wait()
                    if self._stop:
                        break
                    work = self._take()
                launched = self._launch(*work) if work is not None else None
                if launched is not None:
                    inflight.append(launched)
                # Read back the oldest batch once the next one is launched (or nothing is left
                # to launch), so at most two are in flight.
                if inflight and (launched is None or len(inflight) > 1):
                    self._complete(inflight.popleft())
        except BaseException as e:  # a bug: report to every waiting client
            log.exception("embedding engine loop failed")
            self.error = e
        finally:
            with self._cond:
                waiting = list(self._requests)
                self._pending.clear()
            reason = (RuntimeError(f"embedding engine failure: {self.error}") if self.error
                      else RuntimeError("the embedding engine shut down"))
            self._fail(waiting, reason)
