"""Ragged prefill attention for Hopper GPUs through Pallas Mosaic GPU (wgmma, TMA, warp roles).

Same contract as ``ragged_prefill.ragged_prefill_attention`` (q [T, N, D], the paged
cache [K, P, PS, D], query_start [S + 1], kv_lens [S], page_tables [S, MP];
output [T, N, D], 0 for padding tokens), and the same block schedule
(``ragged_prefill.block_schedule``), with ``2 * BLOCK_Q`` = 128 tokens per block.

Why a second kernel: the Triton lowering tops out near 310 TFLOP/s (8k causal) and
345 (8k with a 4k prefix) on the H100, below the tensor cores' reach, because it
has no warpgroup MMA with operands in shared memory and no copy engine feeding a
software pipeline. This kernel is built like FlashAttention-3:

- One program per (query block, ``heads_per_program`` query heads of one KV
  head, handled one after another over one continuous K/V pipeline). Three
  warpgroups: two compute warpgroups of ``BLOCK_Q`` (64) query rows each (consecutive
  tokens of one sequence) and one producer warpgroup that only issues bulk
  copies (TMA). The default is all G heads of a KV head per program: it is the
  code the GPU tests and the final H100 timings ran (8k causal 452-458 TFLOP/s,
  500-505 with a 4k prefix). An earlier revision with one head per program
  measured faster (508-516 / 558-564); ``heads_per_program=1`` selects that
  layout, which should become the default once it is re-timed in this revision.
  At head_dim 128 every program reserves ~190 KiB of shared memory, so one fits
  on an SM; a mixed serving step has one short block per decoding sequence,
  which ``fill_empty=False`` makes exit at once.
- The producer walks the block's keys ``block_k`` at a time. Each stage is one
  copy per page (``block_k / PS`` copies, or one copy of part of a page when
  PS > block_k): page ids come from the page table in global memory. Stages
  are a ring of ``num_stages`` shared-memory buffers with a "loaded" barrier
  (copy bytes) and a "consumed" barrier (both compute warpgroups) each.
- A compute warpgroup computes S = Q K^T with wgmma (both operands in shared
  memory, f32 accumulators in registers), the online softmax in base 2 with the
  scale folded into the exponent, and O += P V with P from registers. A shared
  "turn" barrier staggers the two warpgroups by half a step, so one's softmax
  overlaps the other's matrix products.
- Causal masking: steps wholly at or before the warpgroup's first query position
  skip the mask; the rest mask key > query position. A warpgroup stops at the
  last position of its tile (even when none of its rows is stored, a known waste
  in blocks of <= BLOCK_Q rows) and then only acknowledges the stages the other
  warpgroup still needs (waits for them to land, releases them, takes its turns),
  so the ring, the turn-taking and each warpgroup's barrier phases stay in step.
- q rows go through registers into the swizzled tile (a bulk copy into a tiled
  buffer needs tile-aligned rows, and ragged blocks start anywhere). Stores go
  through an unswizzled shared buffer and bulk copies of exactly the block's rows
  (a ladder of power-of-two row counts), so blocks that end mid-tile never
  overwrite another block's rows.

Limits (``unsupported_reason``, ``MosaicPrefillConfig``): q and cache both bf16 or
both f16 (no fp8 cache); head_dim 64 or 128; block_k a multiple of 64 up to 256; PS a multiple
of 8 that divides block_k or is a multiple of it; the tiles within 227 KiB of shared memory.
``paged_attention_pallas`` falls back to the Triton kernel otherwise.

Testing: Mosaic GPU has no public interpret mode, so this kernel runs only on a
Hopper GPU (tests/test_ragged_prefill_mgpu.py, GPU class, against a float64
numpy oracle). On CPU those tests lower it for CUDA, which catches API, layout
and shared-memory errors; the block schedule it shares with the Triton kernel
is tested in interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common as c
from pallas_kernels.ragged_prefill import block_schedule

COMPUTE_WARPGROUPS = 2
BLOCK_Q = 64                     # query rows per compute warpgroup: one wgmma row tile
PRODUCER_REGISTERS = 40          # per thread; the producer only issues copies
COMPUTE_REGISTERS = 232          # 2 x 232 + 40 <= 512 per thread-slot of 3 warpgroups
SHARED_MEMORY_LIMIT = 227 << 10  # per block on Hopper (the H100 reports 232,448 bytes)


@dataclasses.dataclass(frozen=True)
class MosaicPrefillConfig:
    """``block_k`` keys per pipeline stage, ``num_stages`` K/V buffers in flight, and
    ``heads_per_program`` query heads (of one KV head) handled one after another. Each
    program takes 2 x ``BLOCK_Q`` query rows."""

    block_k: int = 128
    num_stages: int = 2
    heads_per_program: int | None = None     # None: all query heads of one KV head

    def __post_init__(self):
        if self.block_k % 64 or not 0 < self.block_k <= 256:
            raise ValueError(f"block_k must be a multiple of 64 up to 256 (the widest wgmma and "
                             f"bulk copy), got {self.block_k}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        if self.heads_per_program is not None and self.heads_per_program < 1:
            raise ValueError(f"heads_per_program must be >= 1, got {self.heads_per_program}")


def shared_memory_bytes(config: MosaicPrefillConfig, head_dim: int, itemsize: int) -> int:
    """Tiles' shared memory: q and output staging (two warpgroups), K and V rings, plus
    4 KiB for barriers and alignment (Mosaic GPU reported 2,152-2,168 bytes over the
    tiles when rejecting block_k 128 x 3 stages at head_dim 128)."""
    q_and_out = 2 * COMPUTE_WARPGROUPS * BLOCK_Q * head_dim * itemsize
    rings = 2 * config.num_stages * config.block_k * head_dim * itemsize
    return q_and_out + rings + 4096


def unsupported_reason(q_dtype, cache_dtype, head_dim: int, page_size: int,
                       config: MosaicPrefillConfig | None = None) -> str | None:
    """Why this kernel cannot take these inputs, or None if it can."""
    config = config or MosaicPrefillConfig()
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"queries must be bf16 or f16, got {jnp.dtype(q_dtype)}"
    if jnp.dtype(cache_dtype) != jnp.dtype(q_dtype):
        return f"cache dtype {jnp.dtype(cache_dtype)} differs from the queries' {jnp.dtype(q_dtype)}"
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128, got {head_dim}"
    bk = config.block_k
    need = shared_memory_bytes(config, head_dim, jnp.dtype(q_dtype).itemsize)
    if need > SHARED_MEMORY_LIMIT:
        return (f"block_k={bk} x num_stages={config.num_stages} needs {need >> 10} KiB of shared "
                f"memory, over the {SHARED_MEMORY_LIMIT >> 10} KiB a Hopper block may use: "
                f"lower block_k or num_stages")
    if page_size % 8 or not (bk % page_size == 0 or page_size % bk == 0):
        return (f"page size {page_size} must be a multiple of 8 that divides block_k={bk} "
                f"or is a multiple of it")
    return None


def is_hopper() -> bool:
    """Whether JAX's default devices are Hopper GPUs (compute capability 9.x)."""
    dev = jax.devices()[0]
    return jax.default_backend() == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def _store_rows(o_smem, first: jax.Array, o_gmem_rows, num_rows: jax.Array, max_rows: int) -> None:
    """Bulk-copy rows [first, first + num_rows) of o_smem [max_rows, D] to
    o_gmem_rows(start, n) [n, D] (start counted from ``first``).

    A copy's shape is static, so the count is split into its binary digits: one
    copy per set bit, largest first (e.g. 37 rows -> 32 + 4 + 1)."""
    start: int | jax.Array = 0
    size = 1 << (max_rows.bit_length() - 1)
    while size >= 1:
        bit = (num_rows & size) != 0

        @pl.when(bit)
        def _(start=start, size=size):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(first + start, size)], o_gmem_rows(start, size))

        start = start + jnp.where(bit, jnp.int32(size), jnp.int32(0))
        size //= 2
    plgpu.wait_smem_to_gmem(0)


def _kernel(q_start_ref, num_rows_ref, seq_ref, first_pos_ref, kv_stop_ref, pt_ref,
            q_ref, k_ref, v_ref, o_ref, scoped, *, cfg: MosaicPrefillConfig, group: int,
            heads: int, page_size: int, num_pages: int, scale_log2: float, num_blocks: int,
            fill_empty: bool):
    (q_smem2, k_smem, v_smem, o_smem2), (k_loaded, v_loaded), (k_consumed, v_consumed), turn = scoped
    bq, bk, stages = BLOCK_Q, cfg.block_k, cfg.num_stages
    dtype = q_ref.dtype
    head0 = lax.axis_index("heads") * heads             # this program's first query head
    kv_head = lax.div(head0, jnp.int32(group))
    blk = num_blocks - 1 - lax.axis_index("block")     # heavy first: last blocks see most keys
    wg = lax.axis_index("wg")
    num_rows = num_rows_ref[blk]
    n_steps = c.cdiv(kv_stop_ref[blk], bk)            # K/V stages per head; the same for all
    runs = (num_rows > 0) if fill_empty else (num_rows > 0) & (n_steps > 0)

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    def ring(j):                                       # ring slot of the j-th stage overall
        return lax.rem(j, jnp.int32(stages))

    @pl.when(runs & (wg < COMPUTE_WARPGROUPS))
    def _consumer():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
        row0 = q_start_ref[blk] + wg * bq                # first token row of this warpgroup
        # Ragged rows start anywhere, but a bulk copy into a tiled buffer needs tile-aligned
        # rows: q goes through registers instead (once per head and block). The load is
        # clamped into the array; tile row r then holds token load_at + r, at position base + r.
        load_at = jnp.minimum(row0, q_ref.shape[0] - bq)
        shift = row0 - load_at
        base = first_pos_ref[blk] + wg * bq - shift
        my_steps = jnp.clip(c.cdiv(jnp.maximum(base + bq, 0), bk), 0, n_steps)
        full_steps = jnp.clip(lax.div(jnp.maximum(base + 1, 0), jnp.int32(bk)), 0, my_steps)
        my_rows = jnp.clip(num_rows - wg * bq, 0, bq)

        @pl.loop(0, heads)                               # query heads sharing one KV head
        def _head(g):
            head = head0 + g
            j0 = g * n_steps                             # stages consumed by earlier heads
            q_smem[...] = plgpu.load(q_ref.at[pl.ds(load_at, bq), head], (),
                                     layout=plgpu.Layout.WGMMA, optimized=False)
            plgpu.commit_smem()
            m = plgpu.layout_cast(jnp.full((bq,), c.M_INIT, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.zeros((bq, q_ref.shape[-1]), jnp.float32),
                                    plgpu.Layout.WGMMA)

            @pl.when(my_steps > 0)
            def _():
                plgpu.barrier_wait(k_loaded.at[ring(j0)])

            pl.when(wg == 1)(take_turn)                   # stagger: wg 1 runs half a step behind

            def step(i, carry, masked: bool):
                acc, m, l = carry
                slot = ring(j0 + i)

                def scores(s_ref):
                    plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return s_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_consumed.at[slot])
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(cols + i * bk <= rows + base, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_wait(turn)

                def values(o_acc):
                    plgpu.wgmma(o_acc, p16, v_smem.at[slot])

                    @pl.when(i + 1 < my_steps)
                    def _():
                        plgpu.barrier_wait(k_loaded.at[ring(j0 + i + 1)])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l

            def acknowledge(i, _):
                # A stage only the other warpgroup needs: still wait for it to land (each
                # barrier wait flips this warpgroup's phase bit, which later heads rely on),
                # then release it and keep taking turns.
                slot = ring(j0 + i)
                plgpu.barrier_wait(k_loaded.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                take_turn()
                take_turn()

            carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(full_steps, my_steps, functools.partial(step, masked=True),
                                      carry)
            lax.fori_loop(my_steps, n_steps, acknowledge, None)
            pl.when(wg == 0)(take_turn)

            inv = jnp.where(l > 0, 1.0 / l, 0.0)          # rows with no key (padding) give 0
            o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            _store_rows(o_smem, shift, lambda start, n: o_ref.at[pl.ds(row0 + start, n), head],
                        my_rows, bq)

    @pl.when(runs & (wg == COMPUTE_WARPGROUPS))
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        seq = seq_ref[blk]
        max_pages = pt_ref.shape[1]

        def load(cache_ref, smem, barrier, i, slot):
            if page_size <= bk:                            # whole pages: bk / PS copies
                for j in range(bk // page_size):
                    idx = jnp.minimum(i * (bk // page_size) + j, max_pages - 1)
                    page = jnp.clip(pt_ref[seq, idx], 0, num_pages - 1)
                    plgpu.copy_gmem_to_smem(cache_ref.at[kv_head, page],
                                            smem.at[slot, pl.ds(j * page_size, page_size)],
                                            barrier.at[slot])
            else:                                          # one bk-row part of a page
                per_page = page_size // bk
                idx = jnp.minimum(lax.div(i, jnp.int32(per_page)), max_pages - 1)
                page = jnp.clip(pt_ref[seq, idx], 0, num_pages - 1)
                rows = pl.ds(lax.rem(i, jnp.int32(per_page)) * bk, bk)
                plgpu.copy_gmem_to_smem(cache_ref.at[kv_head, page, rows], smem.at[slot],
                                        barrier.at[slot])

        # Every head of the program walks the same keys: stage j is key step j % n_steps.
        @pl.loop(0, heads * n_steps)
        def _(j):
            i, slot = lax.rem(j, n_steps), ring(j)

            @pl.when(j >= stages)                          # the slot's previous stage is done
            def _():
                plgpu.barrier_wait(k_consumed.at[slot])
            load(k_ref, k_smem, k_loaded, i, slot)

            @pl.when(j >= stages)
            def _():
                plgpu.barrier_wait(v_consumed.at[slot])
            load(v_ref, v_smem, v_loaded, i, slot)


@functools.partial(jax.jit, static_argnames=("scale", "config", "fill_empty"))
def ragged_prefill_attention_mgpu(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                  query_start: jax.Array, kv_lens: jax.Array,
                                  page_tables: jax.Array, *, scale: float,
                                  config: MosaicPrefillConfig | None = None,
                                  fill_empty: bool = True) -> jax.Array:
    """Causal attention of ragged new tokens over their paged KV (Hopper only); see the
    module docstring and ``ragged_prefill`` for the contract.

    ``fill_empty=False`` leaves the rows of sequences without keys (kv_lens 0) and of
    padding tokens unwritten (arbitrary values) and skips their blocks: for callers that
    overwrite those rows anyway (the mixed mode, whose one-token sequences go to the
    decode kernel)."""
    config = config or MosaicPrefillConfig()
    (kh, num_pages, page_size, d, T, N), pt, kv_lens, query_start = c.check_ragged(
        q, k_cache, v_cache, query_start, kv_lens, page_tables)
    reason = unsupported_reason(q.dtype, k_cache.dtype, d, page_size, config)
    if reason:
        raise ValueError(f"ragged_prefill_attention_mgpu: {reason}")
    mp = pt.shape[1]
    bq, bk, stages = BLOCK_Q, config.block_k, config.num_stages
    rows_per_block = COMPUTE_WARPGROUPS * bq
    heads = config.heads_per_program or N // kh
    if (N // kh) % heads:
        raise ValueError(f"heads_per_program={heads} must divide the {N // kh} query heads "
                         f"per KV head")

    t_pad = max(T, rows_per_block)                     # clamped q loads need >= bq rows
    qp = jnp.pad(q, ((0, t_pad - T), (0, 0), (0, 0))) if t_pad != T else q
    sched = block_schedule(query_start, kv_lens, t_pad, rows_per_block, mp * page_size)
    nb = sched.q_start.shape[0]
    copies = bk // min(page_size, bk)

    swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    buffers = (                                        # q tiles, K ring, V ring, output staging
        plgpu.SMEM((COMPUTE_WARPGROUPS, bq, d), q.dtype, **swizzled),
        plgpu.SMEM((stages, bk, d), q.dtype, **swizzled),
        plgpu.SMEM((stages, bk, d), q.dtype, **swizzled),
        plgpu.SMEM((COMPUTE_WARPGROUPS, bq, d), q.dtype),
    )
    loaded = (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),) * 2
    consumed = (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2
    turn = plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS)
    body = functools.partial(_kernel, cfg=config, group=N // kh, heads=heads, page_size=page_size,
                             num_pages=num_pages, scale_log2=float(scale) * c.LOG2E, num_blocks=nb,
                             fill_empty=fill_empty)

    def entry(*refs):
        pl.run_scoped(lambda *scoped: body(*refs, scoped), buffers, loaded, consumed, turn,
                      collective_axes="wg")

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((t_pad, N, d), q.dtype),
        grid=(N // heads, nb),
        grid_names=("heads", "block"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(sched.q_start, sched.num_rows, sched.seq, sched.first_pos, sched.kv_stop, pt, qp,
      k_cache, v_cache)
    return out[:T]

