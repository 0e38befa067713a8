"""Host-side batching for the embedding engine: which queued sequences form the next device
batch, and the compiled (token bucket, sequence bucket) shape it is padded to.

Sequences are taken first in, first out and never split. A batch holds at most
``max_num_seqs`` sequences and ``max(token_buckets)`` (the token budget) tokens. When the
queue does not fill the budget, the batch is padded to the smallest token bucket that holds
it, unless a smaller bucket filled now (the rest waiting for the next batch) pads less.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# Padding up to this fraction of a bucket is accepted without trying a smaller bucket.
ACCEPTED_PADDING = 0.25


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The next batch: its first ``num_seqs`` queued sequences (``num_tokens`` tokens), padded
    to ``token_bucket`` token slots and ``seq_bucket`` sequence slots."""

    num_seqs: int
    num_tokens: int
    token_bucket: int
    seq_bucket: int


def covering(n: int, buckets: Sequence[int], what: str) -> int:
    """The smallest of the sorted ``buckets`` >= n; ValueError if none is."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]}")


def take(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> tuple[int, int]:
    """How many leading sequences of ``lengths`` fit ``max_tokens`` tokens and ``max_seqs``
    sequences (first in, first out: stops at the first one that does not fit); returns
    (sequences, tokens)."""
    n = tokens = 0
    for length in lengths:
        if n == max_seqs or tokens + length > max_tokens:
            break
        n += 1
        tokens += length
    return n, tokens


def plan_batch(lengths: Sequence[int], token_buckets: Sequence[int], seq_buckets: Sequence[int],
               max_num_seqs: int) -> BatchShape:
    """The shape of the next batch for the queue head ``lengths`` (token counts, FIFO; each
    at most the largest token bucket; the first ``max_num_seqs`` are enough).

    Takes as much of the head as fits the budget. If that pads its bucket by more than
    ``ACCEPTED_PADDING``, a fill of the next smaller bucket is taken instead where the two
    batches (that one and the rest) pad fewer tokens than the one.
    """
    if not lengths:
        raise ValueError("no sequences to batch")
    budget = token_buckets[-1]
    n, tokens = take(lengths, budget, max_num_seqs)
    if n == 0:
        raise ValueError(f"a sequence of {lengths[0]} tokens exceeds the token budget {budget}")
    bucket = covering(tokens, token_buckets, "tokens")
    if bucket - tokens > ACCEPTED_PADDING * bucket:
        smaller = [b for b in token_buckets if b < tokens]
        if smaller:
            m, part = take(lengths[:n], smaller[-1], max_num_seqs)
            if m and (covering(part, token_buckets, "tokens")
                      + covering(tokens - part, token_buckets, "tokens")) < bucket:
                n, tokens, bucket = m, part, covering(part, token_buckets, "tokens")
    return BatchShape(num_seqs=n, num_tokens=tokens, token_bucket=bucket,
                      seq_bucket=covering(n, seq_buckets, "sequences"))


def plan_all(lengths: Sequence[int], token_buckets: Sequence[int], seq_buckets: Sequence[int],
             max_num_seqs: int) -> list[BatchShape]:
    """Every batch of a whole queue ``lengths``, in order (see ``plan_batch``)."""
    plans, start = [], 0
    while start < len(lengths):
        plan = plan_batch(lengths[start:start + max_num_seqs], token_buckets, seq_buckets,
                          max_num_seqs)
        plans.append(plan)
        start += plan.num_seqs
    return plans


def program_shapes(token_buckets: Sequence[int], seq_buckets: Sequence[int],
                   max_num_seqs: int) -> list[tuple[int, int]]:
    """Every (token bucket, sequence bucket) pair a batch may take: a batch of T token slots
    holds at most min(T, max_num_seqs) sequences (each has a token)."""
    shapes = []
    for t in token_buckets:
        top = covering(min(t, max_num_seqs), seq_buckets, "sequences")
        shapes.extend((t, s) for s in seq_buckets if s <= top)
    return shapes
