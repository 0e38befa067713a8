"""Plain numpy float64 oracles for attention and the Llama decoder, and a chi-square check of
sampled tokens (test use only).

They share no code with the runtime except ``rope.inverse_frequencies`` (the
frequency table only) and work on contiguous, non-paged KV.
"""
from __future__ import annotations

import numpy as np

from arctic_jax.config import ModelConfig
from arctic_jax.models.llama_weights import LlamaWeights
from arctic_jax.models.rope import inverse_frequencies


def _f64(x) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def dense_causal_attention(q, k, v, q_positions, scale: float | None = None) -> np.ndarray:
    """q [T, N, D] at positions q_positions [T] attends to k, v [L, K, D] at positions 0..p.

    Head n uses kv head n // (N // K). ``scale`` defaults to D ** -0.5. Returns [T, N, D] float64.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    pos = np.asarray(q_positions, dtype=np.int64)
    T, N, D = q.shape
    L, K, _ = k.shape
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    if pos.shape != (T,) or pos.min() < 0 or pos.max() >= L:
        raise ValueError(f"q_positions {pos} must be [T={T}] within 0..{L - 1}")
    scale = D ** -0.5 if scale is None else scale
    kv_head = np.arange(N) // (N // K)
    kh, vh = k[:, kv_head], v[:, kv_head]                      # [L, N, D]
    scores = np.einsum("tnd,lnd->tnl", q, kh) * scale
    allowed = np.arange(L)[None, :] <= pos[:, None]            # [T, L]
    scores = np.where(allowed[:, None, :], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("tnl,lnd->tnd", probs, vh)


def gather_sequence_kv(cache, pages, length: int) -> np.ndarray:
    """Positions 0..length-1 of one sequence from a paged cache [K, P, PS, D], its
    positions living on ``pages`` in order: returns [length, K, D]."""
    cache = np.asarray(cache)
    pos = np.arange(length)
    return np.transpose(cache[:, np.asarray(pages)[pos // cache.shape[2]], pos % cache.shape[2]],
                        (1, 0, 2))


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF rotate-half rope on x [T, heads, D]."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]     # [T, D/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _bias(b) -> np.ndarray | float:
    return 0.0 if b is None else _f64(b)


def llama_forward_dense(weights: LlamaWeights, cfg: ModelConfig, tokens, *,
                        return_kv: bool = False):
    """Logits [T, V] float64 of ``tokens`` [T] at positions 0..T-1, with contiguous KV.

    With ``return_kv``, also returns per layer (k [T, K, D] after rope, v [T, K, D]).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    T = tokens.shape[0]
    positions = np.arange(T)
    inv_freq = np.asarray(inverse_frequencies(cfg), dtype=np.float64)
    eps = cfg.rms_norm_eps
    x = _f64(weights.embed)[tokens]
    kvs = []
    for layer in weights.layers:
        h = _rms_norm(x, _f64(layer.input_norm), eps)
        q = np.einsum("th,hnd->tnd", h, _f64(layer.q_proj)) + _bias(layer.q_bias)
        kv = np.einsum("th,hckd->tckd", h, _f64(layer.kv_proj)) + _bias(layer.kv_bias)
        q = _rotate(q, positions, inv_freq)
        k = _rotate(kv[:, 0], positions, inv_freq)
        v = kv[:, 1]
        kvs.append((k, v))
        attn = dense_causal_attention(q, k, v, positions, scale=cfg.head_dim ** -0.5)
        x = x + np.einsum("tnd,ndh->th", attn, _f64(layer.o_proj)) + _bias(layer.o_bias)
        h = _rms_norm(x, _f64(layer.post_norm), eps)
        gate_up = np.einsum("th,hci->tci", h, _f64(layer.gate_up)) + _bias(layer.gate_up_bias)
        gate, up = gate_up[:, 0], gate_up[:, 1]
        act = gate / (1.0 + np.exp(-gate)) * up
        x = x + act @ _f64(layer.down) + _bias(layer.down_bias)
    h = _rms_norm(x, _f64(weights.final_norm), eps)
    head = _f64(weights.embed).T if weights.lm_head is None else _f64(weights.lm_head)
    logits = h @ head
    return (logits, kvs) if return_kv else logits


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def chi2_pvalue(samples, probs) -> float:
    """P-value of a chi-square goodness-of-fit test of ``samples`` (cell indices) against
    ``probs``; a sample in a zero-probability cell gives 0. Cells expected below 5 are pooled."""
    from scipy import stats

    probs = np.asarray(probs, np.float64).ravel()
    counts = np.bincount(np.asarray(samples).ravel(), minlength=probs.size)
    if counts.size != probs.size or counts[probs == 0].any():
        return 0.0
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chi2.sf(float(((obs - exp) ** 2 / exp).sum()), obs.size - 1))


def swiftkv_forward_hf(tensors, cfg, tokens) -> np.ndarray:
    """Logits [T, V] float64 of a SwiftKV Llama from its HF-named, torch-layout tensors
    (Snowflake's names), whole sequence at positions 0..T-1, no cache.

    Layers [0, Lkv) are Llama's; x = norm_swiftkv(residual entering layer Lkv) gives layer j's
    k, v through the ``*_proj_swiftkv`` of layer Lkv + (j - Lkv) // g * g; layers >= Lkv take
    their queries from ``q_proj_swiftkv``. Every token runs every layer here.
    """
    t = {n: _f64(a) for n, a in tensors.items()}
    tokens = np.asarray(tokens, dtype=np.int64)
    T = tokens.shape[0]
    pos = np.arange(T)
    inv_freq = np.asarray(inverse_frequencies(cfg), dtype=np.float64)
    eps, N, K, D = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L, Lkv, g = cfg.num_layers, cfg.num_key_value_layers, cfg.key_value_group_size

    def linear(h, name):
        out = h @ t[name + ".weight"].T
        return out + t[name + ".bias"] if name + ".bias" in t else out

    x = t["model.embed_tokens.weight"][tokens]
    swift = None
    for i in range(L):
        p = f"model.layers.{i}."
        if i == Lkv:
            swift = _rms_norm(x, t["model.norm_swiftkv.weight"], eps)
        h = _rms_norm(x, t[p + "input_layernorm.weight"], eps)
        if i < Lkv:
            q, k, v = (linear(h, p + f"self_attn.{n}_proj") for n in "qkv")
        else:
            src = f"model.layers.{Lkv + (i - Lkv) // g * g}.self_attn."
            q = linear(h, p + "self_attn.q_proj_swiftkv")
            k, v = linear(swift, src + "k_proj_swiftkv"), linear(swift, src + "v_proj_swiftkv")
        q = _rotate(q.reshape(T, N, D), pos, inv_freq)
        k = _rotate(k.reshape(T, K, D), pos, inv_freq)
        attn = dense_causal_attention(q, k, v.reshape(T, K, D), pos, scale=D ** -0.5)
        x = x + linear(attn.reshape(T, N * D), p + "self_attn.o_proj")
        h = _rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(gate / (1.0 + np.exp(-gate)) * up, p + "mlp.down_proj")
    h = _rms_norm(x, t["model.norm.weight"], eps)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return h @ head.T


def paged_causal_attention(q, k_cache, v_cache, chunks) -> tuple[np.ndarray, int]:
    """Dense causal attention of each chunk's tokens over its sequence's KV gathered
    contiguously from its pages; (outputs of the real tokens, their count)."""
    outs, t = [], 0
    for c in chunks:
        n, end = len(c.tokens), c.start + len(c.tokens)
        k, v = (gather_sequence_kv(cache, c.pages, end) for cache in (k_cache, v_cache))
        outs.append(dense_causal_attention(q[t:t + n], k, v, np.arange(c.start, end)))
        t += n
    return np.concatenate(outs), t
