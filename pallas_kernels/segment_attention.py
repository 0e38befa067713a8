"""Packed bidirectional (encoder) attention: each token attends to every key of its own sequence.

Shapes: q [T, N, D]; k, v [T, K, D] with N % K == 0 (K == N for BERT); seq_start [S + 1]
int32 (sequence s holds tokens seq_start[s] .. seq_start[s+1]-1, back to back from 0;
empty sequence slots allowed); segment_ids [T] int32 (each token's sequence index; padding,
t >= seq_start[S], gets S). Output [T, N, D] in q's dtype; padding rows are exactly 0.

Design (Pallas, Triton lowering on GPU; ``interpret=True`` on CPU):
- grid (cdiv(T, block_q), K). Query block i is the fixed token range
  [i * block_q, (i + 1) * block_q) and may straddle sequences. A program handles those
  tokens x all G = N // K query heads of one KV head (G padded to a power of 2, Gp): a
  [block_q * Gp, D] query tile, so each K/V tile feeds G heads.
- Key range: a block only walks [seq_start[segment of its first token],
  seq_start[segment of its last real token + 1]), ``block_k`` keys per iteration starting
  at that range's first key (not aligned), so packed short sequences cost about
  sum(len * block-span) rather than T^2; all-padding blocks walk nothing. The per-block
  range is computed by jnp in the jitted wrapper (``key_ranges``: gathers only, no
  while/cond, so nothing syncs with the host).
- Masking: when the block lies in one sequence, the key tiles that lie wholly inside the
  range need no mask (first loop); the rest (the last partial tile, and every tile of a
  straddling block) are masked by segment equality (second loop). Padding rows are zeroed
  at the store (t >= seq_start[S]), whatever keys they saw.
- In bounds without copying q/k/v: a tile that would run past T is loaded from T - block
  instead (q: rows that belong to the previous block are computed but not stored, via a
  masked store; K/V: keys already seen by the previous tile are masked). Every output row
  is stored by exactly one program. Only T < max(block_q, block_k) pads the inputs.
- Softmax in f32, base 2, scale inside the exponent (``_common.online_softmax_step``);
  P is cast to V's dtype for the second dot (bf16 MMAs for bf16 inputs).

Block sizes (defaults; not yet swept on a GPU): block_q = max(16, 128 // Gp) tokens
(128 query rows, as in the ragged prefill kernel's H100 sweep), block_k = 64 keys
(32 for f32 with head_dim >= 128, for shared memory), num_warps 4 (8 when
rows * head_dim >= 128 * 128), num_stages 2. 64-key tiles keep the masked tail of a
single-sequence block small and suit head_dim 32-64 (BERT-base: 12 heads of 64;
MiniLM: 12 of 32) where each K/V tile is only 4-8 KiB in bf16. Sequences of 512 tokens
packed at multiples of 512 align with 128-token query blocks, so no block straddles.

Trusted inside jit: seq_start and segment_ids must agree (segment_ids[t] == s for
seq_start[s] <= t < seq_start[s+1], S for padding). Inconsistent values give wrong numbers,
never out-of-bounds reads (every index is clamped). K/V must be finite (masked keys get
weight 0, and 0 * inf is nan). head_dim must be a power of 2 >= 16 (Triton tiles).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as c

DEFAULT_BLOCK_ROWS = 128      # query rows (tokens x padded group) per block
DEFAULT_BLOCK_K = 64


def default_block_q(group_padded: int) -> int:
    """Tokens per query block: 128 query rows, at least 16 tokens."""
    return max(16, DEFAULT_BLOCK_ROWS // group_padded)


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernel takes heads of ``head_dim`` (a power of 2 >= 16: Triton tiles)."""
    return c.is_pow2(head_dim) and head_dim >= 16


def default_block_k(dtype, head_dim: int) -> int:
    """64 keys; 32 for f32 tiles of head_dim >= 128 (shared memory)."""
    return 32 if jnp.dtype(dtype).itemsize >= 4 and head_dim >= 128 else DEFAULT_BLOCK_K


def key_ranges(seq_start: jax.Array, segment_ids: jax.Array, num_slots: int, block_q: int,
               block_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per query block i (tokens i*block_q ..): (first key, number of key tiles, number of
    those tiles that need no mask), each [cdiv(num_slots, block_q)] int32.

    segment_ids has T <= num_slots entries; slots past T are padding. A block's keys are
    those of the sequences of its first and last real token and every sequence between.
    """
    T = segment_ids.shape[0]
    S = seq_start.shape[0] - 1
    nb = c.cdiv_static(num_slots, block_q)
    first = jnp.arange(nb, dtype=jnp.int32) * block_q
    n_real = jnp.clip(seq_start[S], 0, T)
    last = jnp.minimum(jnp.minimum(first + block_q, T), n_real) - 1      # last real token
    live = first <= last
    seg_first = jnp.clip(segment_ids[jnp.clip(first, 0, T - 1)], 0, S - 1)
    seg_last = jnp.clip(segment_ids[jnp.clip(last, 0, T - 1)], seg_first, S - 1)
    k_lo = jnp.clip(seq_start[seg_first], 0, T)
    k_hi = jnp.clip(seq_start[seg_last + 1], k_lo, T)
    span = jnp.where(live, k_hi - k_lo, 0)
    n_tiles = (span + block_k - 1) // block_k
    n_full = jnp.where(seg_first == seg_last, span // block_k, 0)
    return k_lo, n_tiles, n_full


def _segment_kernel(q_ref, k_ref, v_ref, seg_ref, klo_ref, ntiles_ref, nfull_ref, nreal_ref,
                    o_ref, *, block_q: int, block_k: int, num_slots: int, scale_log2: float):
    blk = pl.program_id(0)
    _, gp, d = q_ref.shape
    rows = block_q * gp
    first = blk * block_q
    load_at = jnp.minimum(first, num_slots - block_q)
    tok = load_at + lax.div(jnp.arange(rows, dtype=jnp.int32), jnp.int32(gp))
    real = tok < nreal_ref[0]
    q_seg = seg_ref[tok]
    q = q_ref[pl.ds(load_at, block_q)].reshape(rows, d)
    k_lo = klo_ref[blk]

    def tile(j):
        nominal = k_lo + j * block_k
        start = jnp.minimum(nominal, num_slots - block_k)
        return nominal, start, k_ref[pl.ds(start, block_k)], v_ref[pl.ds(start, block_k)]

    def full_body(j, carry):
        _, _, k, v = tile(j)
        return c.online_softmax_step(q, k, v, None, scale_log2, carry)

    def masked_body(j, carry):
        nominal, start, k, v = tile(j)
        key = start + jnp.arange(block_k, dtype=jnp.int32)
        k_seg = jnp.where(key >= nominal, seg_ref[pl.ds(start, block_k)], -2)   # -2: seen already
        mask = q_seg[:, None] == k_seg[None, :]
        return c.online_softmax_step(q, k, v, mask, scale_log2, carry)

    n_full = nfull_ref[blk]
    carry = lax.fori_loop(0, n_full, full_body, c.init_carry(rows, d))
    _, l, acc = lax.fori_loop(n_full, ntiles_ref[blk], masked_body, carry)
    out = jnp.where(real[:, None], c.normalise(l, acc), 0.0).astype(o_ref.dtype)
    mine = (tok >= first).reshape(block_q, gp)
    c.masked_store(o_ref.at[pl.ds(load_at, block_q)], out.reshape(block_q, gp, d),
                   jnp.broadcast_to(mine[:, :, None], (block_q, gp, d)))


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, seq_start: jax.Array,
                  segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, D], got {q.shape}")
    T, N, D = q.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k and v must both be [{T}, K, {D}] like q {q.shape}; got {k.shape} and "
                         f"{v.shape}")
    if k.dtype != v.dtype:
        raise ValueError(f"k/v dtypes differ: {k.dtype} vs {v.dtype}")
    if N % k.shape[1]:
        raise ValueError(f"query heads {N} are not a multiple of kv heads {k.shape[1]}")
    if not supports_head_dim(D):
        raise ValueError(f"head_dim must be a power of 2 >= 16 for the Triton kernel, got {D}")
    if T < 1:
        raise ValueError("q has no token slots")
    if seq_start.ndim != 1 or seq_start.shape[0] < 2:
        raise ValueError(f"seq_start must be [S + 1] with S >= 1, got {seq_start.shape}")
    seq_start = c.check_int_vector(seq_start, seq_start.shape[0], "seq_start")
    return seq_start, c.check_int_vector(segment_ids, T, "segment_ids")


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_q", "block_k",
                                             "num_warps", "num_stages"))
def segment_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, seq_start: jax.Array,
                             segment_ids: jax.Array, *, scale: float, interpret: bool = False,
                             block_q: int | None = None, block_k: int | None = None,
                             num_warps: int | None = None, num_stages: int = 2) -> jax.Array:
    """Bidirectional attention of packed sequences, each token over its own sequence's keys;
    see the module docstring. block_q (tokens) and block_k (keys) must be powers of 2
    (block_k >= 16, block_q * padded group >= 16); None picks the defaults."""
    seq_start, segment_ids = _check_inputs(q, k, v, seq_start, segment_ids)
    T, N, d = q.shape
    kh = k.shape[1]
    g = N // kh
    gp = c.next_pow2(g)
    bq = c.check_block("block_q", block_q or default_block_q(gp))
    bk = c.check_block("block_k", block_k or default_block_k(q.dtype, d), 16)
    if bq * gp < 16:
        raise ValueError(f"block_q * padded group ({bq} * {gp}) must be >= 16 for Triton dots")
    rows = bq * gp
    num_warps = num_warps or (8 if rows * d >= 128 * 128 else 4)

    t_pad = max(T, bq, bk)                  # a tile load needs at least a block of rows
    q4 = q.reshape(T, kh, g, d)
    if gp != g or t_pad != T:
        q4 = jnp.pad(q4, ((0, t_pad - T), (0, 0), (0, gp - g), (0, 0)))
    if t_pad != T:
        k = jnp.pad(k, ((0, t_pad - T), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, t_pad - T), (0, 0), (0, 0)))
    S = seq_start.shape[0] - 1
    seg = segment_ids if t_pad == T else jnp.pad(segment_ids, (0, t_pad - T), constant_values=S)
    k_lo, n_tiles, n_full = key_ranges(seq_start, segment_ids, t_pad, bq, bk)
    n_real = jnp.clip(seq_start[S:], 0, T)
    nb = k_lo.shape[0]

    kernel = functools.partial(_segment_kernel, block_q=bq, block_k=bk, num_slots=t_pad,
                               scale_log2=float(scale) * c.LOG2E)
    vec = pl.BlockSpec((nb,), lambda i, h: (0,))
    kv_spec = pl.BlockSpec((t_pad, None, d), lambda i, h: (0, h, 0))
    out = pl.pallas_call(
        kernel,
        grid=(nb, kh),
        in_specs=[
            pl.BlockSpec((t_pad, None, gp, d), lambda i, h: (0, h, 0, 0)),
            kv_spec, kv_spec,
            pl.BlockSpec((t_pad,), lambda i, h: (0,)),
            vec, vec, vec,
            pl.BlockSpec((1,), lambda i, h: (0,)),
        ],
        out_specs=pl.BlockSpec((t_pad, None, gp, d), lambda i, h: (0, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((t_pad, kh, gp, d), q.dtype),
        compiler_params=c.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"segment_attention_bq{bq}_bk{bk}",
    )(q4, k, v, seg, k_lo, n_tiles, n_full, n_real)
    return out[:T, :, :g, :].reshape(T, N, d)
