"""Running one HTTP request's generations on the engine, with usage and disconnect handling,
and Server-Sent Events framing for streamed responses."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from arctic_jax.engine.choice_jobs import Job, start_order
from arctic_jax.engine.front import EngineFront
from arctic_jax.engine.request import RequestOutput
from arctic_jax.serving.errors import APIError, ClientDisconnected, engine_error
from arctic_jax.serving.protocol import PromptTokensDetails, Usage
from arctic_jax.serving.shutdown import ShutdownGate

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2              # how often a non-streaming request checks its client


class Generations:
    """Several engine requests run concurrently; their outputs merged in arrival order.

    ``start`` submits every request and waits for each one's first output, so
    that a rejected request (queue full, invalid) becomes an HTTP error before
    any response is sent; a job with ``after`` set is submitted when that job's first output
    arrives. ``close`` aborts whatever has not finished. ``fail`` ends the
    outputs with an error (the ``gate`` calls it when a graceful shutdown times out).
    """

    def __init__(self, engine: EngineFront, jobs: Sequence[Job], gate: ShutdownGate | None = None):
        self._engine = engine
        self._jobs = list(jobs)
        self._gate = gate
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffered: list[tuple[int, RequestOutput]] = []
        self._unfinished = {job.index for job in jobs}

    async def _pump(self, job: Job) -> None:
        stream = self._engine.generate(job.prompt_ids, job.params, job.request_id)
        try:
            async for out in stream:
                self._queue.put_nowait((job.index, out))
        except Exception as e:  # handed to the consumer
            self._queue.put_nowait((job.index, e))
        finally:
            await stream.aclose()  # aborts the request if it has not finished

    async def start(self) -> None:
        if self._gate is not None:
            self._gate.track(self)
        now, waiting = start_order(self._jobs)
        self._tasks += [asyncio.create_task(self._pump(job)) for job in now]
        started: set[int] = set()
        try:
            while len(started) < len(self._jobs):
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise _api_error(item)
                self._buffered.append((index, item))
                if index not in started:
                    started.add(index)
                    self._tasks += [asyncio.create_task(self._pump(job))
                                    for job in waiting.pop(index, [])]
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) pairs until every request has finished."""
        while self._unfinished:
            if self._buffered:
                index, item = self._buffered.pop(0)
            else:
                index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise _api_error(item)
            if item.finished:
                self._unfinished.discard(index)
            yield index, item

    def fail(self, error: APIError) -> None:
        """Make ``start`` or ``outputs`` raise ``error`` next (never blocks)."""
        self._buffered.clear()
        self._queue.put_nowait((-1, error))

    def close(self) -> None:
        """Abort unfinished requests (idempotent, never blocks)."""
        if self._gate is not None:
            self._gate.untrack(self)
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for job in self._jobs:
            if job.index in self._unfinished:
                self._engine.abort(job.request_id)
        self._unfinished.clear()


def _api_error(exc: BaseException) -> APIError:
    return exc if isinstance(exc, APIError) else engine_error(exc)


T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T],
                             gate: ShutdownGate | None = None) -> T:
    """Await ``work`` but give up (cancelling it) if the client disconnects meanwhile, or with
    the gate's error if a graceful shutdown aborts what is left."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
            if gate is not None and gate.aborted:
                raise gate.abort_error()
    finally:
        if not task.done():
            task.cancel()


def usage_of(lasts: Sequence[RequestOutput], n: int = 1) -> Usage:
    """Usage of the final outputs ``lasts`` (by choice index; ``n`` choices per prompt): each
    prompt counted once (its first choice's), the completion tokens of every choice."""
    prompt = sum(o.num_prompt_tokens for o in lasts[::n])
    completion = sum(o.num_output_tokens for o in lasts)
    cached = sum(o.num_cached_tokens for o in lasts[::n])
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def finish_reason_of(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finished and out.finish_reason else None


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"


def sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def sse_with_errors(gens: Generations, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Forward ``events`` then ``[DONE]``; an error after the headers went out becomes an SSE
    error event. Leaving early (client gone) aborts the requests."""
    try:
        async for event in events:
            yield event
        yield SSE_DONE
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
    except Exception as e:  # the status line is already sent
        log.exception("streaming response failed")
        yield sse(APIError(500, f"internal error: {e}", type="server_error").body())
        yield SSE_DONE
    finally:
        gens.close()
