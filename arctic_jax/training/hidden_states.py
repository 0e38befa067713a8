"""The base model's final-normed hidden states at every position of whole sequences.

Each sequence runs as one prefill step of the model's own ``step`` function (its ``ModelSpec``),
over a fresh paged KV cache, asking for the hidden row of every position it needs. Sequence
lengths are padded to a few token buckets, so a run compiles one program per bucket used.
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


def token_buckets(longest: int, smallest: int = 64) -> tuple[int, ...]:
    """Padded step lengths: 64, 96, 128, 192, 256, ... (steps of x1.5 / x1.33), up to the first
    that holds ``longest`` tokens; each is a multiple of the page size."""
    if longest < 1:
        raise ValueError(f"sequences must hold at least one token, longest has {longest}")
    out, b = [], smallest
    while True:
        for size in (b, b * 3 // 2):
            out.append(size)
            if size >= longest:
                return tuple(out)
        b *= 2


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
                  attention_impl: str | None = None
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
    sizes = token_buckets(max(len(s) for s in sequences))
    num_pages = sizes[-1] // PAGE_SIZE
    dtype = jax.tree_util.tree_leaves(model.weights)[0].dtype
    opts = StepOptions(attention=PagedAttention(attention_impl or default_attention_impl()))
    program = _program(model.spec.step, model.spec.head, model.cfg, opts, num_pages, dtype)
    out = []
    for seq, f in zip(sequences, first, strict=True):
        size = Buckets.pick(len(seq), sizes, "tokens")
        pages = size // PAGE_SIZE
        buckets = Buckets(tokens=(size,), seqs=(1,), pages=(pages,))
        chunk = SequenceChunk(tokens=[int(t) for t in seq], start=0, pages=list(range(pages)),
                              logits_at=list(range(f, len(seq) - 1)))
        batch, rows = build_step_batch([chunk], PAGE_SIZE, buckets)
        hidden, argmax = program(model.weights, batch)
        out.append((np.asarray(hidden[:rows]), np.asarray(argmax[:rows])))
    return out
