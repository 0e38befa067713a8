"""Selects the paged-attention implementation by name.

- ``"blocked"``: pure jnp in query and key blocks (``arctic_jax.attention.query_blocks``):
  reads only the keys each token sees; the CPU default. Its loops depend on the batch, so it is
  not for a GPU, where a data-dependent loop stalls the launching thread.
- ``"reference"``: pure jnp without control flow (``arctic_jax.attention.reference``); its cost
  grows with the step's page bucket.
- ``"pallas"``: the Pallas kernels of ``pallas_kernels`` (the GPU default): prefill
  through Mosaic GPU on Hopper where it applies, else Triton; decode through Triton;
  ``interpret=True`` off the GPU.
- ``"pallas-triton"``: the same with the Triton prefill kernel everywhere (for
  comparison, or where the Mosaic GPU compiler misbehaves).

Under a parallel step variant the call runs inside ``shard_map`` over the
attention-head axis: attention is local to each device's heads and cache shard,
so no implementation can move the cache.

``contiguous_causal_attention`` serves steps that are one sequence's first chunk
(no cached prefix): causal attention of the step's own K/V, through
``jax.nn.dot_product_attention`` (cuDNN flash attention on a GPU with 16-bit
inputs, XLA elsewhere). On the H100, 8k causal: cuDNN 486-517 TFLOP/s, the Mosaic GPU
ragged kernel 452-458 and the Triton one 304-314 (benchmarks/RESULTS.md); it also skips
reading the paged cache.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from arctic_jax.attention.query_blocks import query_block_attention
from arctic_jax.attention.reference import reference_attention
from arctic_jax.batch import StepBatch
from sharding import logical_axes as ax
from sharding.rules import ActivationSharding, partition_spec

ATTENTION_IMPLS = ("blocked", "reference", "pallas", "pallas-triton")
PALLAS_IMPLS = ("pallas", "pallas-triton")


def default_attention_impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "blocked"


def needs_page_buckets(impl: str) -> bool:
    """Whether steps of this implementation should be padded to several page-table widths.
    "blocked" reads only the key pages a step's tokens see, so its cost does not grow with the
    width: one bucket (the longest sequence's pages) then spares a program per bucket."""
    return impl != "blocked"


def check_attention_impl(impl: str) -> None:
    """Raise ValueError for an unknown ``attention_impl`` name."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")


def _over_local_heads(fn: Callable[..., jax.Array], sharding: ActivationSharding | None,
                      arg_axes: tuple[Any, ...], *args: Any) -> jax.Array:
    """``fn(*args)`` on one device, or inside ``shard_map`` over the attention-head axis
    (``arg_axes``: each argument's logical axes, None for a replicated pytree)."""
    if sharding is None:
        return fn(*args)
    specs = tuple(jax.tree_util.tree_map(lambda _: PartitionSpec(), a) if axes is None
                  else partition_spec(axes, sharding.rules) for a, axes in zip(args, arg_axes, strict=True))
    qkv = partition_spec(ax.ATTN_QKV_AXES, sharding.rules)
    return jax.shard_map(fn, mesh=sharding.mesh, in_specs=specs, out_specs=qkv,
                         check_vma=False)(*args)


def _local_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: StepBatch,
                     scale: float, impl: str) -> jax.Array:
    check_attention_impl(impl)
    if impl == "blocked":
        return query_block_attention(q, k_cache, v_cache, batch, scale)
    if impl == "reference":
        return reference_attention(q, k_cache, v_cache, batch, scale)
    from arctic_jax.attention.pallas import paged_attention_pallas
    return paged_attention_pallas(q, k_cache, v_cache, batch, scale,
                                  interpret=jax.default_backend() != "gpu",
                                  prefill_backend="triton" if impl == "pallas-triton" else "auto")


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: StepBatch,
                    scale: float, impl: str = "reference",
                    sharding: ActivationSharding | None = None) -> jax.Array:
    """q [T, N, D] attends over the paged cache [K, P, PS, D]; returns [T, N, D]."""
    fn = functools.partial(_local_attention, scale=scale, impl=impl)
    return _over_local_heads(fn, sharding, (ax.ATTN_QKV_AXES, ax.KV_CACHE_AXES, ax.KV_CACHE_AXES,
                                            None), q, k_cache, v_cache, batch)


def cudnn_attention_supported(dtype: Any, head_dim: int) -> bool:
    """Whether cuDNN flash attention takes these inputs here (a GPU, 16-bit, head_dim a
    multiple of 8 up to 128)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128)


def _local_contiguous(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                      impl: str) -> jax.Array:
    check_attention_impl(impl)
    cudnn = impl in PALLAS_IMPLS and cudnn_attention_supported(q.dtype, q.shape[-1])
    out = jax.nn.dot_product_attention(q[None], k[None], v[None], scale=scale, is_causal=True,
                                       implementation="cudnn" if cudnn else "xla")
    return out[0]


def contiguous_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                                impl: str = "reference",
                                sharding: ActivationSharding | None = None) -> jax.Array:
    """Causal attention of q [T, N, D] over the same tokens' k, v [T, K, D] (GQA: K divides N).

    Token i sees tokens 0..i. Only valid when the T tokens are one sequence from position
    0 followed by padding (padding rows come out as garbage and must be discarded).
    """
    fn = functools.partial(_local_contiguous, scale=scale, impl=impl)
    return _over_local_heads(fn, sharding, (ax.ATTN_QKV_AXES,) * 3, q, k, v)
