"""Ragged prefill attention over the flat token layout and the paged KV cache.

Shapes: q [T, N, D] (tokens of S sequences packed back to back, then padding);
query_start [S + 1] int32 (tokens of sequence s are query_start[s] ..
query_start[s+1]-1); kv_lens [S] int32 (KV length after this step: cached prefix
plus new tokens; the new K/V are already in the cache); page_tables [S, MP] int32;
k_cache, v_cache [K, P, PS, D]. The new tokens of s take the last
n_s = query_start[s+1] - query_start[s] positions of kv_lens[s], so token i of
s (0-based) is at position kv_lens[s] - n_s + i and sees keys 0 .. that position
(causal among new tokens, full over the prefix). Output [T, N, D] in q's dtype;
padding tokens (t >= query_start[S]) and sequences with no key get 0.

Design (Pallas, Triton lowering on GPU; ``interpret=True`` on CPU):
- Query blocks never straddle sequences. A jnp block schedule, computed inside
  the jitted wrapper from query_start/kv_lens (``block_schedule``), cuts every
  sequence into blocks of ``block_q`` tokens; the padding tail [query_start[S], T)
  is cut the same way and written as zeros. Its static length
  NB = T // block_q + S + 1 bounds the real number of blocks; spare entries
  are empty programs that return at once.
- grid (NB, K). A program handles block_q tokens x all G = N // K query heads of
  one KV head (G padded to a power of 2, Gp): a [block_q * Gp, D] query tile, so
  each K/V tile feeds G heads.
- A block's tokens start anywhere in the flat layout. To keep every access in
  bounds without padding q, the tile is loaded from min(start, T - block_q); rows
  that belong to other blocks are computed but not stored (masked store). Every
  token row is stored by exactly one block.
- Heavy first: program i handles block NB-1-i, so the blocks with the most keys
  (the last ones of each sequence) start first and short ones fill the tail.
- Causal early exit: KV is walked only up to the block's last query position,
  ``block_k`` keys (block_k / PS pages) per iteration, each key's page looked up
  in the page table (see paged_decode). Blocks that lie entirely at or before
  the first query position need no mask (first loop); the rest are masked
  key_pos <= query_pos (second loop). Softmax in f32, base 2.
- T < block_q: q is padded to block_q rows (small steps only).

Token trees (speculative tree verification): with ``lookback`` [T] int32, token t also
hides the keys d = 1..32 slots before its own slot whose bit d - 1 is clear (itself
and keys further back stay visible). The unmasked first loop then stops 32 keys
earlier, so the bits are applied wherever they matter.

Inputs are trusted inside jit: KV lengths past the page table's capacity are
clipped and page ids clamped into the cache, so bad values give wrong numbers,
never out-of-bounds reads. The cache must hold finite values (as for the
reference: masked keys get weight 0, and 0 * inf is nan).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as c


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Block parameters; None picks a default from the static shapes."""

    block_q: int | None = None           # tokens per query block; default_block_q
    block_k: int | None = None           # keys per iteration (block_k / PS pages); default_block_k
    num_warps: int | None = None         # default: 8 for 128x128+ tiles, else 4
    num_stages: int = 2
    heavy_first: bool = True             # launch the blocks with the most keys first


def default_block_q(group_padded: int) -> int:
    """128 query rows (tokens x padded group) per block, >= 16 tokens: the best tile in the
    H100 sweep (8k causal prefill, 32 q / 8 kv heads, bf16: bq=32 bk=128 8 warps 2 stages,
    311 TFLOP/s without and 333 with a 4k prefix, against 294 / 310 at bq=64 bk=64)."""
    return max(16, 128 // group_padded)


def default_block_k(cache_dtype, query_dtype) -> int:
    """128 keys, or 64 when the cache or the queries are f32 (shared memory: the tiles are
    used in the wider of the two dtypes)."""
    widest = max(jnp.dtype(cache_dtype).itemsize, jnp.dtype(query_dtype).itemsize)
    return 64 if widest >= 4 else 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Per query block (all [NB] int32): flat start, real rows, page-table row,
    position of the first row, number of keys to visit (0: store zeros)."""

    q_start: jax.Array
    num_rows: jax.Array
    seq: jax.Array
    first_pos: jax.Array
    kv_stop: jax.Array


def block_schedule(query_start: jax.Array, kv_lens: jax.Array, num_tokens: int, block_q: int,
                   max_kv_len: int) -> BlockSchedule:
    """Cuts each sequence (and the padding tail) into query blocks; see the module docstring."""
    S = kv_lens.shape[0]
    nb = num_tokens // block_q + S + 1
    qs = query_start.astype(jnp.int32)
    lens = jnp.concatenate([qs[1:] - qs[:-1], (num_tokens - qs[S])[None]])   # [S+1]
    lens = jnp.maximum(lens, 0)
    kv = jnp.concatenate([kv_lens.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    nblk = (lens + block_q - 1) // block_q
    cum = jnp.cumsum(nblk)
    j = jnp.arange(nb, dtype=jnp.int32)
    # compare_all: a [NB, S+1] comparison. The default binary search is a while loop, which
    # on a GPU copies its predicate to the host every iteration (blocking the launch).
    s = jnp.searchsorted(cum, j, side="right", method="compare_all").astype(jnp.int32)
    sc = jnp.minimum(s, S)
    local = j - (cum[sc] - nblk[sc])
    q_start = qs[sc] + local * block_q
    num_rows = jnp.where(s <= S, jnp.clip(lens[sc] - local * block_q, 0, block_q), 0)
    first_pos = kv[sc] - lens[sc] + local * block_q
    kv_stop = jnp.where(s < S, jnp.clip(first_pos + num_rows, 0, max_kv_len), 0)
    return BlockSchedule(q_start=q_start, num_rows=num_rows, seq=jnp.minimum(sc, S - 1),
                         first_pos=first_pos, kv_stop=kv_stop)


LOOKBACK = 32   # slots covered by a token's lookback bits


def _tree_mask(q_pos: jax.Array, key_pos: jax.Array, bits: jax.Array) -> jax.Array:
    """[rows, bk] causal mask that also hides the keys a token's lookback bits clear."""
    dist = q_pos[:, None] - key_pos[None, :]
    bit = jnp.right_shift(bits[:, None], jnp.clip(dist - 1, 0, LOOKBACK - 1)) & 1
    return (dist >= 0) & ((dist == 0) | (dist > LOOKBACK) | (bit == 1))


def _prefill_kernel(q_ref, k_ref, v_ref, pt_ref, qstart_ref, nrows_ref, seq_ref, pos0_ref,
                    kvstop_ref, *rest, block_q: int, block_k: int, page_size: int,
                    num_slots: int, num_tokens: int, scale_log2: float, heavy_first: bool,
                    tree: bool):
    lb_ref, o_ref = rest if tree else (None, rest[0])
    blk = pl.program_id(0)
    if heavy_first:  # later blocks of a sequence see more keys: start them first (less tail)
        blk = pl.num_programs(0) - 1 - blk
    _, gp, d = q_ref.shape
    rows = block_q * gp
    n_rows = nrows_ref[blk]

    @pl.when(n_rows > 0)
    def _():
        q_start = qstart_ref[blk]
        pos0 = pos0_ref[blk]
        kv_stop = kvstop_ref[blk]
        seq = seq_ref[blk]
        load_at = jnp.minimum(q_start, num_tokens - block_q)
        q = q_ref[pl.ds(load_at, block_q)].reshape(rows, d)
        rel = load_at - q_start + lax.div(jnp.arange(rows, dtype=jnp.int32), jnp.int32(gp))
        valid = (rel >= 0) & (rel < n_rows)
        q_pos = jnp.where(valid, pos0 + rel, -1)
        n_total = c.cdiv(kv_stop, block_k)
        unmasked = pos0 + 1 - LOOKBACK if tree else pos0 + 1   # keys every row sees
        n_full = jnp.minimum(lax.div(jnp.maximum(unmasked, 0), jnp.int32(block_k)), n_total)
        if tree:
            bits = lb_ref[load_at + lax.div(jnp.arange(rows, dtype=jnp.int32), jnp.int32(gp))]

        def full_body(i, carry):
            k, v = c.kv_tile(k_ref, v_ref, pt_ref, seq, i * block_k, block_k, page_size, kv_stop,
                             num_slots)
            return c.online_softmax_step(q, k, v, None, scale_log2, carry)

        def masked_body(i, carry):
            k, v = c.kv_tile(k_ref, v_ref, pt_ref, seq, i * block_k, block_k, page_size, kv_stop,
                             num_slots)
            key_pos = i * block_k + jnp.arange(block_k, dtype=jnp.int32)
            mask = _tree_mask(q_pos, key_pos, bits) if tree else key_pos[None, :] <= q_pos[:, None]
            return c.online_softmax_step(q, k, v, mask, scale_log2, carry)

        carry = lax.fori_loop(0, n_full, full_body, c.init_carry(rows, d))
        _, l, acc = lax.fori_loop(n_full, n_total, masked_body, carry)
        out = c.normalise(l, acc).astype(o_ref.dtype).reshape(block_q, gp, d)
        store_mask = jnp.broadcast_to(valid.reshape(block_q, gp)[:, :, None], (block_q, gp, d))
        c.masked_store(o_ref.at[pl.ds(load_at, block_q)], out, store_mask)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def ragged_prefill_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                             query_start: jax.Array, kv_lens: jax.Array,
                             page_tables: jax.Array, *, scale: float,
                             config: PrefillConfig | None = None,
                             interpret: bool = False,
                             lookback: jax.Array | None = None) -> jax.Array:
    """Causal attention of ragged new tokens over their paged KV; see the module docstring
    (``lookback`` [T] int32: token-tree bits, None for plain causal)."""
    config = config or PrefillConfig()
    (kh, num_pages, page_size, d, T, N), pt, kv_lens, query_start = c.check_ragged(
        q, k_cache, v_cache, query_start, kv_lens, page_tables)
    mp = pt.shape[1]

    g = N // kh
    gp = c.next_pow2(g)
    bq = config.block_q or default_block_q(gp)
    c.check_block("block_q", bq)
    bk = c.check_block("block_k", config.block_k or default_block_k(k_cache.dtype, q.dtype), 16)
    if bq * gp < 16:
        raise ValueError(f"block_q * padded group ({bq} * {gp}) must be >= 16 for Triton dots")
    num_warps = config.num_warps or (8 if bq * gp * d >= 128 * 128 else 4)

    t_pad = max(T, bq)                     # the tile load needs at least block_q rows
    q4 = q.reshape(T, kh, g, d)
    if gp != g or t_pad != T:
        q4 = jnp.pad(q4, ((0, t_pad - T), (0, 0), (0, gp - g), (0, 0)))
    sched = block_schedule(query_start, kv_lens, t_pad, bq, mp * page_size)
    nb = sched.q_start.shape[0]

    kernel = functools.partial(
        _prefill_kernel, block_q=bq, block_k=bk, page_size=page_size,
        num_slots=num_pages * page_size, num_tokens=t_pad, scale_log2=float(scale) * c.LOG2E,
        heavy_first=config.heavy_first, tree=lookback is not None)
    vec = pl.BlockSpec((nb,), lambda i, h: (0,))
    tree_in, tree_spec = [], []
    if lookback is not None:
        if lookback.shape != (T,):
            raise ValueError(f"lookback must have shape ({T},), got {lookback.shape}")
        tree_in = [jnp.pad(lookback.astype(jnp.int32), (0, t_pad - T), constant_values=-1)]
        tree_spec = [pl.BlockSpec((t_pad,), lambda i, h: (0,))]
    out = pl.pallas_call(
        kernel,
        grid=(nb, kh),
        in_specs=[
            pl.BlockSpec((t_pad, None, gp, d), lambda i, h: (0, h, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size, d), lambda i, h: (h, 0, 0)),
            pl.BlockSpec((None, num_pages * page_size, d), lambda i, h: (h, 0, 0)),
            pl.BlockSpec(pt.shape, lambda i, h: (0, 0)),
            vec, vec, vec, vec, vec, *tree_spec,
        ],
        out_specs=pl.BlockSpec((t_pad, None, gp, d), lambda i, h: (0, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((t_pad, kh, gp, d), q.dtype),
        compiler_params=c.triton_compiler_params(num_warps, config.num_stages),
        interpret=interpret,
        name=f"ragged_prefill_bq{bq}_bk{bk}",
    )(q4, c.flat_slots(k_cache), c.flat_slots(v_cache), pt, sched.q_start, sched.num_rows, sched.seq,
      sched.first_pos, sched.kv_stop, *tree_in)
    return out[:T, :, :g, :].reshape(T, N, d)


def ragged_prefill_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                             query_start, kv_lens, page_tables, *, scale: float) -> jax.Array:
    """Plain oracle (f32, host loop over sequences; needs concrete query_start/kv_lens)."""
    import numpy as np
    qs = np.asarray(query_start)
    kl = np.asarray(kv_lens)
    pt = np.asarray(page_tables)
    T, N, D = q.shape
    kh, _, page_size, _ = k_cache.shape
    g = N // kh
    out = jnp.zeros((T, N, D), jnp.float32)
    for s in range(kl.shape[0]):
        n = int(qs[s + 1] - qs[s])
        L = int(kl[s])
        if n <= 0 or L <= 0:
            continue
        pages = pt[s, : -(-L // page_size)]
        k = k_cache[:, pages].reshape(kh, -1, D)[:, :L].astype(jnp.float32)    # [K, L, D]
        v = v_cache[:, pages].reshape(kh, -1, D)[:, :L].astype(jnp.float32)
        qq = q[qs[s]:qs[s] + n].astype(jnp.float32).reshape(n, kh, g, D)
        sc = jnp.einsum("nkgd,kld->nkgl", qq, k, precision="highest") * scale
        q_pos = np.arange(L - n, L)
        allowed = np.arange(L)[None, :] <= q_pos[:, None]                     # [n, L]
        sc = jnp.where(allowed[:, None, None, :], sc, -jnp.inf)
        p = jax.nn.softmax(sc, axis=-1)
        o = jnp.einsum("nkgl,kld->nkgd", p, v, precision="highest").reshape(n, N, D)
        out = out.at[qs[s]:qs[s] + n].set(o)
    return out.astype(q.dtype)
