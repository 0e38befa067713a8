"""The flat, ragged token batch of one model step, and its host-side builder.

One ``StepBatch`` serves prefill, chunked prefill, decode and mixed steps.
Sizes are padded to buckets so that a run compiles a bounded set of programs:
T tokens, S sequences, R logits rows, MP page-table columns.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import numpy as np

from arctic_jax.pytree import pytree_dataclass


@pytree_dataclass
class StepBatch:
    tokens: jax.Array          # [T] int32 token ids (padding: 0)
    positions: jax.Array       # [T] int32 position of each token in its sequence
    slot_mapping: jax.Array    # [T] int32 page * page_size + offset; -1 for padding
    seq_ids: jax.Array         # [T] int32 index of each token's sequence (padding: 0)
    page_tables: jax.Array     # [S, MP] int32 pages of each sequence (padding: 0)
    query_start: jax.Array     # [S + 1] int32 offsets of each sequence's tokens
    kv_lens: jax.Array         # [S] int32 KV length after this step (padding: 0)
    logits_indices: jax.Array  # [R] int32 token indices whose logits are returned
    # [T] int32 tree attention (None: plain causal). Bit d - 1 says whether token t sees the key
    # d = 1..LOOKBACK slots before its own; keys further back, and itself, are always seen.
    lookback: jax.Array | None = None
    # [S + 1] int32 offsets of each sequence's rows in logits_indices (rows past the last
    # offset are padding). None in batches built by hand; models that run layers on the logits
    # rows alone (SwiftKV) need it.
    logits_start: jax.Array | None = None


LOOKBACK = 32        # slots a tree token's lookback bits cover
ALL_VISIBLE = -1     # lookback of a token that sees every earlier slot (plain causal)


class BatchTooLargeError(ValueError):
    """A step does not fit the largest compiled bucket."""


def _default_buckets(limit: int, start: int) -> tuple[int, ...]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Padded sizes that steps are rounded up to; each is compiled once."""

    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    pages: tuple[int, ...]
    # Most logits rows a step may ask for (speculative verify: S x (1 + k)). A step wanting
    # more than S rows pads them to min(T, max_logits_rows); None: to a token bucket.
    max_logits_rows: int | None = None

    @classmethod
    def for_limits(cls, max_tokens: int, max_seqs: int, max_pages_per_seq: int,
                   min_tokens: int = 16) -> Buckets:
        """Powers of two up to each limit (the limit itself included)."""
        return cls(tokens=_default_buckets(max_tokens, min(min_tokens, max_tokens)),
                   seqs=_default_buckets(max_seqs, 1),
                   pages=_default_buckets(max_pages_per_seq, min(8, max_pages_per_seq)))

    @staticmethod
    def pick(n: int, sizes: Sequence[int], what: str) -> int:
        for s in sizes:
            if s >= n:
                return s
        raise BatchTooLargeError(f"{n} {what} exceed the largest bucket {sizes[-1]}")

    def rows_for(self, num_tokens: int) -> tuple[int, ...]:
        """The logits-row counts R a step of ``num_tokens`` (a token bucket) may have."""
        S = self.seqs[0]
        if self.max_logits_rows is None or self.max_logits_rows <= S or num_tokens <= S:
            return (S,)
        return tuple(sorted({S, min(num_tokens, self.max_logits_rows)}))

    def logits_rows(self, num_logits: int, num_tokens: int, num_seqs: int) -> int:
        """R for a step of T tokens and S sequences wanting ``num_logits`` rows."""
        if num_logits <= num_seqs:
            return num_seqs
        if self.max_logits_rows is None:
            return Buckets.pick(num_logits, self.tokens, "logits rows")
        rows = min(num_tokens, self.max_logits_rows)
        if num_logits > rows:
            raise BatchTooLargeError(f"{num_logits} logits rows exceed the {rows} compiled for "
                                     f"{num_tokens}-token steps")
        return rows

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (T, S, MP) combination a run may use (S <= T)."""
        return [(t, s, p) for t in self.tokens for s in self.seqs if s <= t for p in self.pages]


@dataclasses.dataclass
class SequenceChunk:
    """One sequence's share of a step.

    ``tokens`` are new tokens starting at position ``start``; the KV of the
    ``start`` earlier positions is already in the cache. ``pages`` must cover
    ``start + len(tokens)`` positions. ``logits_at`` lists chunk-relative
    indices whose logits are wanted (the last token by default; empty for a
    prefill chunk that is not the last).

    ``parents`` makes the chunk a token tree (speculative tree verification):
    ``parents[i]`` is the chunk index of token i's parent, or -1 for a token that
    follows the cached context; parents precede their children. Token i still
    takes cache slot ``start + i`` but its position is ``start + depth(i)``, and it
    attends to the cached context plus its ancestors only. None: a plain chain.
    """

    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    logits_at: Sequence[int] | None = None
    parents: Sequence[int] | None = None

    def wanted(self) -> Sequence[int]:
        return (len(self.tokens) - 1,) if self.logits_at is None else self.logits_at


def tree_layout(parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(depth [n], lookback bits [n] int32) of a token tree given by chunk-relative parents.

    Token i sees the key d slots back (d = 1..LOOKBACK) iff that slot precedes the chunk
    or holds one of its ancestors; a tree whose token would have to hide a slot more than
    LOOKBACK back is refused."""
    n = len(parents)
    full = (1 << LOOKBACK) - 1
    depth = np.zeros(n, np.int64)
    bits = np.zeros(n, np.int64)
    anc = [0] * n   # ancestors of each token, as a bit mask over chunk indices
    for i, p in enumerate(parents):
        p = int(p)
        if not -1 <= p < i:
            raise ValueError(f"tree token {i} has parent {p}; parents must precede their children "
                             f"(-1: the cached context)")
        if p < 0:   # sees everything before the chunk: distances d > i
            bits[i] = (full >> i) << i if i < LOOKBACK else 0
        else:       # the parent, then what the parent sees, e = i - p slots further back
            bits[i] = ((1 << (i - p - 1)) | (int(bits[p]) << (i - p))) & full
            depth[i] = depth[p] + 1
            anc[i] = anc[p] | (1 << p)
        far = (1 << max(i - LOOKBACK, 0)) - 1    # slots more than LOOKBACK back: always seen
        hidden = far & ~anc[i]
        if hidden:
            j = (hidden & -hidden).bit_length() - 1
            raise ValueError(f"tree token {i} must not see token {j}, {i - j} slots "
                             f"back; lookback bits cover {LOOKBACK}")
    return depth, bits.astype(np.uint32).view(np.int32)


def build_step_batch(chunks: Sequence[SequenceChunk], page_size: int,
                     buckets: Buckets, tree: bool = False) -> tuple[StepBatch, int]:
    """Pack chunks into a padded numpy StepBatch; returns it and the real logits rows.

    ``tree``: the batch carries lookback bits (``ALL_VISIBLE`` for plain chunks), as a
    program compiled for tree verification expects; chunks with ``parents`` need it."""
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    # Vectorised over chunks (the host builds one of these per engine step).
    lens = np.fromiter((len(c.tokens) for c in chunks), np.int64, len(chunks))
    starts = np.fromiter((c.start for c in chunks), np.int64, len(chunks))
    if (lens == 0).any():
        raise ValueError(f"sequence {int(np.argmax(lens == 0))} has no tokens in this step")
    if (starts < 0).any():
        s = int(np.argmax(starts < 0))
        raise ValueError(f"sequence {s} starts at negative position {int(starts[s])}")
    ends = starts + lens
    need = -(-ends // page_size)
    n = int(lens.sum())                                              # real tokens
    wanted = [c.wanted() for c in chunks]
    num_logits = sum(len(w) for w in wanted)
    T = Buckets.pick(n, buckets.tokens, "tokens")
    S = Buckets.pick(len(chunks), buckets.seqs, "sequences")
    # One logits row per sequence unless a sequence wants several (speculative verify).
    R = buckets.logits_rows(num_logits, T, S)
    MP = Buckets.pick(int(need.max()), buckets.pages, "pages per sequence")

    page_tables = np.zeros((S, MP), np.int32)
    have = np.fromiter((len(c.pages) for c in chunks), np.int64, len(chunks))
    if (have < need).any():
        s = int(np.argmax(have < need))
        raise ValueError(f"sequence {s} needs {need[s]} pages for {ends[s]} positions, "
                         f"has {have[s]}")
    # one scatter of every sequence's first need[s] pages (row s, columns 0..need[s]-1)
    page_rows = np.repeat(np.arange(len(chunks)), need)
    page_cols = np.arange(int(need.sum())) - np.repeat(np.cumsum(need) - need, need)
    page_tables[page_rows, page_cols] = np.fromiter(
        itertools.chain.from_iterable(c.pages[:k] for c, k in zip(chunks, need.tolist(), strict=True)),
        np.int32, len(page_rows))
    if (page_tables < 0).any():
        s = int(np.argmax((page_tables < 0).any(axis=1)))
        bad = page_tables[s][page_tables[s] < 0]
        raise ValueError(f"sequence {s} has negative page ids {bad.tolist()}")

    seq_of_token = np.repeat(np.arange(len(chunks), dtype=np.int32), lens)
    first = np.cumsum(lens) - lens                                   # flat start of each chunk
    pos = (np.arange(n) - np.repeat(first, lens) + np.repeat(starts, lens)).astype(np.int32)
    tokens = np.zeros(T, np.int32)
    tokens[:n] = np.fromiter((tok for c in chunks for tok in c.tokens), np.int32, n)
    positions = np.zeros(T, np.int32)
    positions[:n] = pos
    slots = np.full(T, -1, np.int32)
    slots[:n] = page_tables[seq_of_token, pos // page_size] * page_size + pos % page_size
    seq_ids = np.zeros(T, np.int32)
    seq_ids[:n] = seq_of_token
    query_start = np.full(S + 1, n, np.int32)
    query_start[:len(chunks)] = first
    kv_lens = np.zeros(S, np.int32)
    kv_lens[:len(chunks)] = ends
    per_seq = np.fromiter((len(w) for w in wanted), np.int64, len(chunks))
    at = np.fromiter(itertools.chain.from_iterable(wanted), np.int64, num_logits)
    seq_of_row = np.repeat(np.arange(len(chunks)), per_seq)
    bad = (at < 0) | (at >= lens[seq_of_row])
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"logits index {at[r]} outside the chunk of {lens[seq_of_row[r]]} tokens")
    logits_indices = np.zeros(R, np.int32)
    logits_indices[:num_logits] = first[seq_of_row] + at
    logits_start = np.full(S + 1, num_logits, np.int32)
    logits_start[:len(chunks)] = np.cumsum(per_seq) - per_seq
    lookback = None
    if tree:
        lookback = np.full(T, ALL_VISIBLE, np.int32)
        for s, c in enumerate(chunks):
            if c.parents is not None:
                if len(c.parents) != lens[s]:
                    raise ValueError(f"sequence {s}: {len(c.parents)} parents for {lens[s]} tokens")
                depth, bits = tree_layout(c.parents)
                positions[first[s]:first[s] + lens[s]] = starts[s] + depth
                lookback[first[s]:first[s] + lens[s]] = bits
    elif any(c.parents is not None for c in chunks):
        raise ValueError("a token-tree chunk needs build_step_batch(..., tree=True)")
    batch = StepBatch(tokens=tokens, positions=positions, slot_mapping=slots, seq_ids=seq_ids,
                      page_tables=page_tables, query_start=query_start, kv_lens=kv_lens,
                      logits_indices=logits_indices, lookback=lookback,
                      logits_start=logits_start)
    return batch, num_logits
