"""Rotary position embeddings (HF "rotate half" convention)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[D/2] float64 inverse frequencies with the config's rope scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
                  / (rs.high_freq_factor - rs.low_freq_factor))
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_mid, mid, scaled)
    return inv


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [T] -> cos, sin [T, D] in float32."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, D]; cos, sin [T, D]. Computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.astype(x.dtype)
