"""The base model's final-normed hidden states at every position of whole sequences.

Sequences run as prefill steps of the model's own ``step`` function (its ``ModelSpec``) over a
fresh paged KV cache, asking for the hidden row of every position they need. Consecutive
sequences are packed into steps of one padded size (``STEP_TOKENS``, or the total of all of
them when smaller, or the longest when larger), so a run compiles one program.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.attention.dispatch import default_attention_impl
from arctic_jax.attention.strategy import PagedAttention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ModelConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.step_options import StepOptions

PAGE_SIZE = 16
STEP_TOKENS = 2048      # tokens per packed step (at least the longest sequence)
MAX_SEQS = 32           # sequences per packed step


def step_size(lengths: Sequence[int], step_tokens: int = STEP_TOKENS) -> int:
    """Padded tokens per step: a multiple of 64 that holds the longest sequence, and
    ``step_tokens`` unless all sequences together need fewer."""
    longest, total = max(lengths), sum(lengths)
    if longest < 1:
        raise ValueError(f"sequences must hold at least one token, the longest has {longest}")
    want = max(longest, min(total, step_tokens))
    return -(-want // 64) * 64


def packs(lengths: Sequence[int], step: int, max_seqs: int = MAX_SEQS) -> list[list[int]]:
    """Consecutive sequence indices grouped so that each group's tokens fit one step of
    ``step`` tokens and at most ``max_seqs`` sequences."""
    out: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not out or used + n > step or len(out[-1]) == max_seqs:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """A loaded base model on one device: its ``ModelSpec``, config, weights and the HF
    architectures a draft model trained for it records."""

    spec: Any
    cfg: ModelConfig
    weights: Any
    architectures: tuple[str, ...]

    @classmethod
    def of_llm(cls, llm: Any) -> BaseModel:
        """The model of an ``arctic_jax.llm.LLM`` (one device, no tensor/sequence parallelism)."""
        runner = llm.engine.runner
        if len(runner.variants) != 1 or runner.parallel is not None:
            raise ValueError("hidden-state extraction runs the base model on one device; "
                             "load it without tensor/sequence parallelism")
        return cls(spec=llm.engine.spec, cfg=runner.cfg, weights=runner.weights[runner.variants[0]],
                   architectures=tuple(llm.engine.spec.architectures))


@functools.cache
def _program(step: Callable, head: Callable, cfg: ModelConfig, opts: StepOptions, num_pages: int,
             cache_dtype: Any) -> Callable:
    """(weights, batch) -> (hidden rows [R, H] float32, argmax of the head [R] int32), over a
    fresh zero cache; jit compiles one program per batch shape."""

    def run(weights: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
        cache = KVCache.allocate(cfg, num_pages, PAGE_SIZE, cache_dtype)
        hidden, _ = step(weights, cache, batch, cfg=cfg, opts=opts)
        logits = head(weights, hidden, cfg=cfg)
        return hidden.astype(jnp.float32), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.jit(run)


def hidden_states(model: BaseModel, sequences: Sequence[Sequence[int]], first: Sequence[int], *,
                  attention_impl: str | None = None, step_tokens: int = STEP_TOKENS
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each sequence x (token ids) and its ``first`` row f: (hidden [len(x) - 1 - f, H]
    float32, argmax [len(x) - 1 - f] int32), the base model's final-normed hidden state at
    positions f .. len(x) - 2 (the states that predicted tokens f + 1 .. len(x) - 1) and its
    head's greedy choice there."""
    if len(sequences) != len(first):
        raise ValueError(f"{len(sequences)} sequences but {len(first)} first rows")
    for s, (seq, f) in enumerate(zip(sequences, first, strict=True)):
        if not 0 <= f <= len(seq) - 2:
            raise ValueError(f"sequence {s} of {len(seq)} tokens has no state to take from "
                             f"position {f} (need 0 <= first <= len - 2)")
        if len(seq) > model.cfg.max_position_embeddings:
            raise ValueError(f"sequence {s} has {len(seq)} tokens, more than the model's "
                             f"{model.cfg.max_position_embeddings} positions")
    if not sequences:
        return []
    lengths = [len(s) for s in sequences]
    step = step_size(lengths, step_tokens)
    groups = packs(lengths, step)
    seqs = max(len(g) for g in groups)
    max_pages = -(-max(lengths) // PAGE_SIZE)
    buckets = Buckets(tokens=(step,), seqs=(seqs,), pages=(max_pages,))
    dtype = jax.tree_util.tree_leaves(model.weights)[0].dtype
    opts = StepOptions(attention=PagedAttention(attention_impl or default_attention_impl()))
    program = _program(model.spec.step, model.spec.head, model.cfg, opts,
                       step // PAGE_SIZE + seqs, dtype)
    out = []
    for group in groups:
        chunks, next_page = [], 0
        for s in group:
            pages = -(-lengths[s] // PAGE_SIZE)
            chunks.append(SequenceChunk(tokens=[int(t) for t in sequences[s]], start=0,
                                        pages=list(range(next_page, next_page + pages)),
                                        logits_at=list(range(first[s], lengths[s] - 1))))
            next_page += pages
        batch, rows = build_step_batch(chunks, PAGE_SIZE, buckets)
        hidden, argmax = program(model.weights, batch)
        hidden, argmax = np.asarray(hidden[:rows]), np.asarray(argmax[:rows])
        ends = np.cumsum([lengths[s] - 1 - first[s] for s in group])
        out += [(h, a) for h, a in zip(np.split(hidden, ends[:-1]), np.split(argmax, ends[:-1]),
                                        strict=True)]
    return out
