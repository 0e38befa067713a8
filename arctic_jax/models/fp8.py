"""FP8 (E4M3) weight-and-activation matmuls: ``--quantization fp8``.

A weight matrix is stored once as ``Fp8Weight``: its values in float8_e4m3fn, transposed to
[O, K] (the contracted dimension minor, the layout Hopper's FP8 GEMMs read), and one float32
scale per output column, s_w[o] = max_k |w[k, o]| / 448. Activations are quantised on the fly,
one scale per row (token), s_x[t] = max_k |x[t, k]| / 448, so no calibration is needed and one
outlier token costs no precision elsewhere. Both scales factor out of the dot product:

    y[t, o] = s_x[t] * s_w[o] * sum_k q(x[t, k] / s_x[t]) * q(w[k, o] / s_w[o])

so the GEMM runs on FP8 operands with float32 accumulation and the scales are one element-wise
multiply after it. E4M3 keeps 3 mantissa bits: each operand carries a relative rounding error of
at most 2^-4, a matmul's output about 3-4% (relative Frobenius error on random data).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.pytree import pytree_dataclass, static_field

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0          # the largest finite float8_e4m3fn
_TINY = 1e-12            # scale floor: an all-zero row or column quantises to zeros, not NaN


@pytree_dataclass
class Fp8Weight:
    """A weight w [*K, *O] (contracted dims first) as ``values`` [O, K] float8_e4m3fn and
    ``scale`` [O] float32 (O, K: the flattened products); ``out_shape`` is *O."""

    values: jax.Array
    scale: jax.Array
    out_shape: tuple[int, ...] = static_field()


def quantize_weight(w: jax.Array, contract: int = 1) -> Fp8Weight:
    """w [*K, *O], its first ``contract`` dims contracted -> ``Fp8Weight`` (per-column scales)."""
    if not 1 <= contract < w.ndim:
        raise ValueError(f"contract must leave at least one output dim of a {w.ndim}-d weight, "
                         f"got {contract}")
    k, out_shape = math.prod(w.shape[:contract]), tuple(w.shape[contract:])
    values, scale = quantize_rows(w.reshape(k, math.prod(out_shape)).T)     # rows: [O, K]
    return Fp8Weight(values=values, scale=scale[:, 0], out_shape=out_shape)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, K] -> (float8_e4m3fn [T, K], per-row scale [T, 1] float32)."""
    h = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(h), axis=1, keepdims=True), _TINY) / FP8_MAX
    return jnp.clip(h / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def fp8_matmul(x: jax.Array, w: Fp8Weight) -> jax.Array:
    """x [T, *K] (trailing dims contracted) . w -> [T, *w.out_shape] in x's dtype."""
    t = x.shape[0]
    xq, sx = quantize_rows(x.reshape(t, -1))
    if xq.shape[1] != w.values.shape[1]:
        raise ValueError(f"x contracts {xq.shape[1]} values per row, the weight {w.values.shape[1]}")
    y = jax.lax.dot_general(xq, w.values, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)              # [T, O]
    return (y * sx * w.scale).astype(x.dtype).reshape(t, *w.out_shape)


def dense(x: jax.Array, w: Any, contract: int = 1) -> jax.Array:
    """x [T, *K] . w [*K, *O] -> [T, *O], the ``contract`` trailing dims of x against the leading
    dims of w; w an array (a plain dot in x's dtype, float32 accumulation) or an ``Fp8Weight``."""
    if isinstance(w, Fp8Weight):
        return fp8_matmul(x, w)
    dims = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
    return jax.lax.dot_general(x, w, (dims, ((), ())))
