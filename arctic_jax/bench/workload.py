"""Benchmark workloads: which requests to send, and when.

A workload is a list of ``BenchRequest`` (a prompt and a token budget) plus an
arrival schedule: either closed-loop (a fixed number of clients) or Poisson
arrivals at a given mean rate (``poisson_arrival_offsets``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request to send.

    ``prompt`` is a list of token ids, or a string (dataset prompts; the driver
    tokenizes it, or sends it as text over HTTP). ``max_tokens`` is the output
    budget; with ``ignore_eos`` the output has exactly that many tokens.
    """

    index: int
    prompt: tuple[int, ...] | str
    max_tokens: int
    ignore_eos: bool

    @property
    def prompt_len(self) -> int | None:
        """Prompt length in tokens, or None for a text prompt not yet tokenized."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


@dataclasses.dataclass(frozen=True)
class LengthRange:
    """Inclusive integer range [lo, hi]; lo == hi is a fixed length."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not (isinstance(self.lo, int) and isinstance(self.hi, int)) or self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"length range must satisfy 1 <= lo <= hi, got {self.lo}:{self.hi}")

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n] int64 lengths, uniform over the range."""
        return rng.integers(self.lo, self.hi + 1, size=n)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


def parse_range(text: str, what: str) -> LengthRange:
    """Parse ``"lo:hi"`` (inclusive) or a single integer."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} must be 'lo:hi' or an integer, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f"{what} must be 'lo:hi' or an integer, got {text!r}")
    try:
        return LengthRange(*values)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def synthetic_requests(num_requests: int, input_len: LengthRange, output_len: LengthRange,
                       vocab_size: int, seed: int) -> list[BenchRequest]:
    """Prompts of uniform random token ids in [0, vocab_size), with ignore_eos set.

    Random prompts share no prefix beyond chance, so the prefix cache stays cold.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens = input_len.draw(rng, num_requests)
    out_lens = output_len.draw(rng, num_requests)
    return [BenchRequest(index=i,
                         prompt=tuple(int(t) for t in rng.integers(0, vocab_size, size=int(n_in))),
                         max_tokens=int(n_out), ignore_eos=True)
            for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True))]


def load_dataset(path: str | os.PathLike, num_requests: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL file, one object a line.

    Each line: ``{"prompt": str or [token ids], "max_tokens": int >= 1}`` and an
    optional ``"ignore_eos": bool`` (default false). Blank lines are skipped.
    ``num_requests`` takes the first N lines; asking for more than the file has
    is an error.
    """
    requests: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from None
            requests.append(_dataset_request(obj, len(requests), where))
    if not requests:
        raise ValueError(f"{path}: the dataset has no requests")
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        if num_requests > len(requests):
            raise ValueError(f"{path} has {len(requests)} requests, fewer than the "
                             f"{num_requests} asked for")
        requests = requests[:num_requests]
    return requests


def _dataset_request(obj: object, index: int, where: str) -> BenchRequest:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    unknown = set(obj) - {"prompt", "max_tokens", "ignore_eos"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}: 'prompt' is empty")
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                 for t in prompt):
            raise ValueError(f"{where}: 'prompt' must be a non-empty list of token ids >= 0")
        prompt = tuple(prompt)
    else:
        raise ValueError(f"{where}: 'prompt' must be a string or a list of token ids")
    max_tokens = obj.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"{where}: 'max_tokens' must be an integer >= 1, got {max_tokens!r}")
    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"{where}: 'ignore_eos' must be a boolean")
    return BenchRequest(index=index, prompt=prompt, max_tokens=max_tokens, ignore_eos=ignore_eos)


def poisson_arrival_offsets(num_requests: int, rate: float, seed: int) -> np.ndarray:
    """[num_requests] float64 arrival times (s, from the start) of a Poisson process.

    Inter-arrival gaps are exponential with mean ``1 / rate``; the first request
    arrives at 0. ``rate`` ``inf`` sends everything at once.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not rate > 0:  # also rejects nan
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def describe(requests: Sequence[BenchRequest]) -> dict:
    """Summary of a request list for reports: counts and length ranges."""
    in_lens = [r.prompt_len for r in requests if r.prompt_len is not None]
    out_lens = [r.max_tokens for r in requests]
    return {
        "num_requests": len(requests),
        "input_len_min": min(in_lens) if in_lens else None,
        "input_len_max": max(in_lens) if in_lens else None,
        "input_len_mean": float(np.mean(in_lens)) if in_lens else None,
        "num_text_prompts": sum(r.prompt_len is None for r in requests),
        "output_len_min": min(out_lens),
        "output_len_max": max(out_lens),
        "output_len_mean": float(np.mean(out_lens)),
        "ignore_eos": all(r.ignore_eos for r in requests),
    }
