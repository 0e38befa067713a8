"""Checks that writing new K/V into the paged cache happens in place (no Pallas kernel is needed).

``arctic_jax.kv_cache.write_kv`` is an XLA scatter into the cache viewed as
slots [K, P * PS, D]. When the caller jits it (or the whole step) with the cache
buffers donated, XLA aliases the cache input to the output and scatters in
place: the compiled module carries an ``input_output_alias`` for both caches and
contains no copy of a cache-sized buffer. Without donation it copies both caches
first. ``write_in_place_report`` inspects a compiled program for exactly this, so
tests (CPU) and the benchmark (GPU) can check it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.kv_cache import write_kv

_COPY = re.compile(r"=\s*(\w+)\[([\d,]*)\]\S*\s+copy(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class InPlaceReport:
    cache_bytes: int         # bytes of one cache (K or V)
    aliased_bytes: int       # bytes of outputs aliased to donated inputs
    temp_bytes: int          # scratch the program allocates
    cache_copies: tuple[str, ...]   # HLO copy instructions of cache-sized buffers

    @property
    def in_place(self) -> bool:
        return (self.aliased_bytes >= 2 * self.cache_bytes and not self.cache_copies
                and self.temp_bytes < self.cache_bytes)


def write_in_place_report(compiled: Any, cache_shape: tuple[int, ...], dtype: Any) -> InPlaceReport:
    """Inspects a compiled ``write_kv``-like program (``jit(...).lower(...).compile()``)."""
    n = 1
    for s in cache_shape:
        n *= s
    cache_bytes = n * jnp.dtype(dtype).itemsize
    text = compiled.as_text()
    copies = []
    for line in text.splitlines():
        m = _COPY.search(line)
        if m:
            dims = [int(x) for x in m.group(2).split(",") if x]
            size = 1
            for x in dims:
                size *= x
            if size == n:
                copies.append(line.strip())
    try:
        stats = compiled.memory_analysis()
    except Exception:   # some backends do not report it
        stats = None
    return InPlaceReport(cache_bytes=cache_bytes,
                         aliased_bytes=int(getattr(stats, "alias_size_in_bytes", 0) or 0),
                         temp_bytes=int(getattr(stats, "temp_size_in_bytes", 0) or 0),
                         cache_copies=tuple(copies))


def compile_write_kv(cache_shape: tuple[int, int, int, int], dtype: Any, num_tokens: int,
                     donate: bool = True) -> Any:
    """Compiles ``write_kv`` for caches [K, P, PS, D] and num_tokens new tokens."""
    kh, _, _, d = cache_shape
    cache = jax.ShapeDtypeStruct(cache_shape, dtype)
    new = jax.ShapeDtypeStruct((num_tokens, kh, d), dtype)
    slots = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    fn = jax.jit(write_kv, donate_argnums=(0, 1) if donate else ())
    return fn.lower(cache, cache, new, new, slots).compile()
