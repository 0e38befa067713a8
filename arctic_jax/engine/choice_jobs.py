"""The ``n`` choices of a prompt as engine jobs, and when each job starts.

The engine runs one sequence per request, so a prompt with ``SamplingParams.n`` = n becomes n
jobs (``SamplingParams.copies``: copy i seeded seed + i). Copy 0 starts at once; the others once
copy 0 gave its first output: by then the prompt's full KV pages are in the prefix cache, so
each other copy computes only the prompt's last partial page (started together, every copy
would compute the whole prompt). ``LLM.generate`` and the server's ``Generations`` both follow
``start_order``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from arctic_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Job:
    """One engine request of a response: choice ``index`` (copy ``copy`` of its prompt), started
    at once (``after`` None) or once the job of index ``after`` gave its first output."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    after: int | None = None
    copy: int = 0


def copy_jobs(first_index: int, request_id: str, prompt_ids: list[int],
              params: SamplingParams) -> list[Job]:
    """The ``params.n`` choices of one prompt as jobs, indices ``first_index`` + i, request ids
    ``request_id``-i (``request_id`` itself when n = 1); copies 1.. wait for copy 0."""
    copies = params.copies()
    if len(copies) == 1:
        return [Job(first_index, request_id, prompt_ids, copies[0])]
    return [Job(first_index + i, f"{request_id}-{i}", prompt_ids, p,
                after=None if i == 0 else first_index, copy=i) for i, p in enumerate(copies)]


def start_order(jobs: Sequence[Job]) -> tuple[list[Job], dict[int, list[Job]]]:
    """(the jobs to start at once, job index -> the jobs to start at that job's first output)."""
    now: list[Job] = []
    waiting: dict[int, list[Job]] = {}
    for job in jobs:
        if job.after is None:
            now.append(job)
        else:
            waiting.setdefault(job.after, []).append(job)
    return now, waiting
