"""Paged decode attention: one query token per row over the paged KV cache.

Shapes: q [B, N, D]; k_cache, v_cache [K, P, PS, D]; page_tables [S, MP] int32;
kv_lens [B] int32 (keys 0 .. kv_len-1 are attended; 0 = padding row, output 0);
optional row_to_seq [B] int32 picks each row's page-table row (default: row b
uses page_tables[b], which then needs S == B). Output [B, N, D] in q's dtype.

Kernel design (Pallas, Triton lowering on GPU; ``interpret=True`` on CPU):
- grid (B, K, splits). A program owns all G = N // K query heads of one KV head
  for one row, so each K/V page is read once per row. The G heads are padded to
  Gp = max(16, next_pow2(G)) rows because Triton dots need M >= 16.
- Each program walks its split of the row's keys ``block_k`` keys per iteration.
  Every key's page is looked up in the page table (a [block_k] int gather), so
  one tile spans block_k / PS pages; K/V tiles are loaded as [block_k, D] from
  the cache viewed as slots [K, P * PS, D]. When block_k divides PS a tile lies
  in one page and is one contiguous load. Keys at or past kv_len are masked, so
  lengths may end mid-page.
- An fp8 cache uses 64-key tiles (see default_block_k); its tiles are cast to the
  query dtype before the dots.
- Split-K: the row's keys (from its actual kv_len) are divided evenly over
  ``num_splits`` programs, in whole tiles. Each writes a partial (max, sum,
  unnormalised acc) in f32; a small jnp log-sum-exp combine merges them. With one
  split the kernel normalises and writes the output directly. Softmax is in f32
  (base 2).
- ``num_splits`` defaults from static shapes: enough programs to fill the GPU
  (about 2 per SM on an H100) when B * K is small, at most one split per 256
  tokens of the page-table capacity.

Inputs are trusted inside jit: kv_lens past the page table's capacity are
clipped and page ids clamped into the cache (wrong numbers, never out-of-bounds
reads). Queries whose dtype differs from the cache's are matched by casting the
K/V tiles to the query dtype.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as c

TARGET_PROGRAMS = 264          # ~2 programs per SM on a 132-SM H100
MIN_TOKENS_PER_SPLIT = 256


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Block parameters; None picks a default from the static shapes."""

    block_k: int | None = None           # keys per iteration (block_k / PS pages); default_block_k
    num_splits: int | None = None        # default: default_num_splits(...)
    num_warps: int = 4
    num_stages: int = 2


def default_block_k(cache_dtype) -> int:
    """128 keys for 16-bit caches; 64 for f32 (keeps 2 pipeline stages in shared memory) and
    for fp8 (H100, B=64, 32/8 heads, ps 16: 89 us at 64 keys vs 101 at 128 and 116 at 256
    for 1,152-token contexts; 280 / 295 / 321 us at 4,096)."""
    return 128 if jnp.dtype(cache_dtype).itemsize == 2 else 64


def default_num_splits(num_rows: int, num_kv_heads: int, max_kv_len: int) -> int:
    """Splits per row so that rows * kv_heads * splits roughly fills the GPU."""
    base = num_rows * num_kv_heads
    if base >= TARGET_PROGRAMS:
        return 1
    want = c.cdiv_static(TARGET_PROGRAMS, base)
    cap = max(1, max_kv_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap))


def _decode_kernel(q_ref, k_ref, v_ref, pt_ref, rows_ref, lens_ref, *out_refs,
                   page_size: int, block_k: int, num_splits: int, num_slots: int,
                   scale_log2: float):
    b = pl.program_id(0)
    split = pl.program_id(2)
    gp, d = q_ref.shape
    length = lens_ref[b]
    row = rows_ref[b]
    per_split = c.cdiv(c.cdiv(length, num_splits), block_k) * block_k
    first = split * per_split
    last = jnp.minimum(first + per_split, length)
    n_blocks = c.cdiv(jnp.maximum(last - first, 0), block_k)
    q = q_ref[...]

    def body(i, carry):
        tok0 = first + i * block_k
        k, v = c.kv_tile(k_ref, v_ref, pt_ref, row, tok0, block_k, page_size, length, num_slots)
        mask = (tok0 + jnp.arange(block_k, dtype=jnp.int32) < length)[None, :]
        return c.online_softmax_step(q, k, v, mask, scale_log2, carry)

    m, l, acc = lax.fori_loop(0, n_blocks, body, c.init_carry(gp, d))
    if num_splits == 1:
        (o_ref,) = out_refs
        o_ref[...] = c.normalise(l, acc).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges split partials. acc [..., NS, R, D], m/l [..., NS, R] (base-2 max) -> [..., R, D] f32."""
    m_max = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - m_max)
    l_tot = jnp.sum(w * l, axis=-2)
    out = jnp.sum(w[..., None] * acc, axis=-3)
    inv = jnp.where(l_tot > 0, 1.0 / jnp.where(l_tot > 0, l_tot, 1.0), 0.0)
    return out * inv[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           page_tables: jax.Array, kv_lens: jax.Array,
                           row_to_seq: jax.Array | None = None, *, scale: float,
                           config: DecodeConfig | None = None,
                           interpret: bool = False) -> jax.Array:
    """Decode attention of q [B, N, D] over the paged cache; see the module docstring."""
    config = config or DecodeConfig()
    kh, num_pages, page_size, d, B, N = c.check_query(q, k_cache, v_cache, "B")
    kv_lens = c.check_int_vector(kv_lens, B, "kv_lens")
    S = page_tables.shape[0] if page_tables.ndim == 2 else -1
    if row_to_seq is None:
        if S != B:
            raise ValueError(f"page_tables {page_tables.shape} must have B={B} rows when "
                             "row_to_seq is not given")
        row_to_seq = jnp.arange(B, dtype=jnp.int32)
    else:
        row_to_seq = c.check_int_vector(row_to_seq, B, "row_to_seq")
    bk = c.check_block("block_k", config.block_k or default_block_k(k_cache.dtype), 16)
    pt = c.check_page_tables(page_tables)
    mp = pt.shape[1]
    ns = config.num_splits or default_num_splits(B, kh, mp * page_size)
    if ns < 1:
        raise ValueError(f"num_splits must be >= 1, got {ns}")
    # A length past the page table's capacity would read columns that do not exist.
    kv_lens = jnp.clip(kv_lens, 0, mp * page_size)

    g = N // kh
    gp = max(16, c.next_pow2(g))
    q4 = q.reshape(B, kh, g, d)
    if gp != g:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, gp - g), (0, 0)))

    kernel = functools.partial(
        _decode_kernel, page_size=page_size, block_k=bk, num_splits=ns,
        num_slots=num_pages * page_size, scale_log2=float(scale) * c.LOG2E)
    in_specs = [
        pl.BlockSpec((None, None, gp, d), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((None, num_pages * page_size, d), lambda b, h, s: (h, 0, 0)),
        pl.BlockSpec((None, num_pages * page_size, d), lambda b, h, s: (h, 0, 0)),
        pl.BlockSpec(pt.shape, lambda b, h, s: (0, 0)),
        pl.BlockSpec((B,), lambda b, h, s: (0,)),
        pl.BlockSpec((B,), lambda b, h, s: (0,)),
    ]
    if ns == 1:
        out_shape = [jax.ShapeDtypeStruct((B, kh, gp, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, gp, d), lambda b, h, s: (b, h, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((B, kh, ns, gp, d), jnp.float32),
                     jax.ShapeDtypeStruct((B, kh, ns, gp), jnp.float32),
                     jax.ShapeDtypeStruct((B, kh, ns, gp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, gp, d), lambda b, h, s: (b, h, s, 0, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, h, s, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, h, s, 0))]
    outs = pl.pallas_call(
        kernel,
        grid=(B, kh, ns),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=c.triton_compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"paged_decode_bk{bk}_ns{ns}",
    )(q4, c.flat_slots(k_cache), c.flat_slots(v_cache), pt, row_to_seq, kv_lens)
    if ns == 1:
        out = outs[0][:, :, :g, :]
    else:
        acc, m, l = outs
        out = combine_splits(acc[..., :g, :], m[..., :g], l[..., :g]).astype(q.dtype)
    return out.reshape(B, N, d)


def paged_decode_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           page_tables: jax.Array, kv_lens: jax.Array,
                           row_to_seq: jax.Array | None = None, *, scale: float) -> jax.Array:
    """Plain-jnp oracle (f32): gathers each row's pages densely and masks keys >= kv_len."""
    B, N, D = q.shape
    kh, _, page_size, _ = k_cache.shape
    rows = jnp.arange(B) if row_to_seq is None else row_to_seq
    pages = page_tables[rows]                                        # [B, MP]
    L = pages.shape[1] * page_size
    k = jnp.moveaxis(k_cache[:, pages], 0, 1).reshape(B, kh, L, D).astype(jnp.float32)
    v = jnp.moveaxis(v_cache[:, pages], 0, 1).reshape(B, kh, L, D).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(B, kh, N // kh, D)
    s = jnp.einsum("bkgd,bkld->bkgl", qg, k, precision="highest") * scale
    valid = jnp.arange(L)[None, :] < kv_lens[:, None]                # [B, L]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    s_max = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - jnp.where(jnp.isfinite(s_max), s_max, 0)), 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1)
    out = jnp.einsum("bkgl,bkld->bkgd", p, v, precision="highest")
    return out.reshape(B, N, D).astype(q.dtype)
