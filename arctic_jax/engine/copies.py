"""A request's ``n`` copies (``SamplingParams.n``) on an ``EngineFront``, sharing the prompt's KV.

The engine runs one sequence per request, so n choices are n requests (``params.copies()``:
copy i seeded seed + i). Copy 0 starts at once; the others start after copy 0's first output:
by then the prompt's full KV pages are registered in the prefix cache, so each other copy
computes only the prompt's last partial page (``RequestOutput.num_cached_tokens`` shows the
hit). Started together, every copy would compute the whole prompt.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from arctic_jax.engine.front import EngineFront
from arctic_jax.engine.request import RequestOutput
from arctic_jax.sampling import SamplingParams


def copy_request_ids(request_id: str, n: int) -> list[str]:
    """The engine request ids of a request's n copies: itself when n == 1, else ``id-i``."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


async def generate_copies(front: EngineFront, prompt_ids: Sequence[int], params: SamplingParams,
                          request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Stream the ``params.n`` copies of one request as (copy index, output), in arrival order,
    until every copy finished.

    A copy's error (ValueError, ``QueueFullError``, RuntimeError) is raised here and the other
    copies are aborted; leaving early aborts every copy in flight. Usage: the prompt is one
    copy's ``num_prompt_tokens``, the completion the sum of the copies' ``num_output_tokens``.
    """
    copies = params.copies()
    ids = copy_request_ids(request_id, len(copies))
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async with contextlib.aclosing(front.generate(prompt_ids, copies[i], ids[i])) as stream:
                async for out in stream:
                    queue.put_nowait((i, out))
        except Exception as e:   # handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(0))]
    unfinished = len(copies)
    try:
        while unfinished:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if i == 0 and len(tasks) == 1:   # copy 0's prompt pages are in the prefix cache now
                tasks += [asyncio.create_task(pump(j)) for j in range(1, len(copies))]
            unfinished -= item.finished
            yield i, item
    finally:
        for task in tasks:   # a cancelled pump closes its stream, which aborts its request
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
