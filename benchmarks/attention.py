"""Attention kernel benchmark: correctness vs an f32 oracle, then timing, per variant.

Decode (one query token per sequence, 32 q heads / 8 kv heads, head_dim 128, bf16):
batch x context x page size; effective TB/s = K/V bytes read / time. Variants:
our Pallas paged decode kernel, the XLA reference (arctic_jax.attention.reference),
JAX's Pallas ops paged_attention (paged) and decode_attention.gqa (contiguous KV).
Prefill (one sequence, N new tokens after an optional cached prefix): TFLOP/s
over the causal pairs (n * prefix + n (n + 1) / 2 query-key pairs, 4 * D * heads
FLOPs each). Variants: our Triton ragged prefill kernel, our Mosaic GPU one (on a
Hopper GPU; `--mgpu-block-k/--mgpu-stages/--mgpu-heads` sweep it), the XLA reference, cuDNN
(`jax.nn.dot_product_attention(implementation="cudnn")` on contiguous KV).
Mixed (a serving step: B decodes at one context plus one prefill chunk of N new
tokens after a cached prefix, in a token bucket of B + N): effective TB/s over
the K/V bytes the step must read. Variants: `paged_attention_pallas` in each
mode ("mixed", "prefill", "decode"; `--modes`) with each prefill kernel
(`--prefill-backends auto,triton,mosaic`) and the XLA reference.

Timing: each variant runs `n` times inside one jitted fori_loop (static trip
count, each iteration depending on the last through a negligible update of q),
so launch gaps, not Python dispatch, are what is measured; per-call time is the
median over repeats of wall / n. Paged variants rotate over copies of the cache
(identical contents, different pages) so that small cases do not run from L2;
contiguous baselines do not rotate (small cases may be flattered by L2).
Any failing variant is reported and the run continues.

    python benchmarks/attention.py                    # full grid (~4 min on an H100)
    python benchmarks/attention.py --quick            # a few cases
    python benchmarks/attention.py --only decode --batches 1 --contexts 16384 --sweep
    python benchmarks/attention.py --only mixed --batches 64 --contexts 1152 --prefill-new 448
    python benchmarks/attention.py --smoke            # CPU, interpret mode, tiny shapes
    python benchmarks/attention.py --append-results   # append the table to benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arctic_jax.attention.kv_write_check import compile_write_kv, write_in_place_report
from arctic_jax.attention.pallas import paged_attention_pallas
from arctic_jax.attention.reference import reference_attention
from arctic_jax.batch import StepBatch
from pallas_kernels import (
    DecodeConfig,
    PrefillConfig,
    default_num_splits,
    paged_decode_attention,
    paged_decode_reference,
    ragged_prefill_attention,
)
from pallas_kernels.ragged_prefill_mgpu import MosaicPrefillConfig, is_hopper, ragged_prefill_attention_mgpu

ROTATE_BYTES = 256 << 20     # paged variants rotate over this much KV at least
TARGET_LOOP_S = 0.01         # aim for ~10 ms per timed loop
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


@dataclasses.dataclass
class Row:
    kind: str
    case: str
    variant: str
    config: str = ""
    us: float | None = None
    tbps: float | None = None
    tflops: float | None = None
    err: float | None = None
    status: str = "ok"


# ---------------------------------------------------------------------------- timing
def looped(step: Callable[..., jax.Array], n: int, n_rot: int) -> Callable[..., Any]:
    """jit(fori_loop of n calls step(q, rot, *arrays)); returns (q, last output)."""

    def run(q, *arrays):
        def body(i, carry):
            q, _ = carry
            out = step(q, i % n_rot, *arrays)
            idx = (0,) * q.ndim
            tiny = (out[(0,) * out.ndim].astype(jnp.float32) * 1e-30).astype(q.dtype)
            return q.at[idx].add(tiny), out

        out0 = jax.eval_shape(step, q, 0, *arrays)
        return lax.fori_loop(0, n, body, (q, jnp.zeros(out0.shape, out0.dtype)))

    return jax.jit(run)


def time_variant(step, q, arrays, est_s: float, n_rot: int, reps: int, max_iters: int):
    """(seconds per call, output of the last call)."""
    n = int(min(max_iters, max(3, math.ceil(TARGET_LOOP_S / max(est_s, 1e-7)))))
    fn = looped(step, n, n_rot)
    _, out = jax.block_until_ready(fn(q, *arrays))          # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, *arrays))
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)), out


def max_err(out, ref) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))


def err_ok(err: float, ref) -> bool:
    return err <= 1e-2 + 2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32))))


def short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg[:160]


def run_variant(rows: list[Row], row: Row, step, q, arrays, ref, est_s, n_rot, args,
                metric: Callable[[float], dict]) -> Row:
    try:
        t, out = time_variant(step, q, arrays, est_s, n_rot, args.reps, args.max_iters)
        row.us = t * 1e6
        for k, v in metric(t).items():
            setattr(row, k, v)
        out = out if ref is None else ref[1](out)
        if ref is not None:
            row.err = max_err(out, ref[0])
            if not err_ok(row.err, ref[0]):
                row.status = "WRONG"
    except Exception as e:  # report and continue
        row.status = "error: " + short(e)
        if args.verbose:
            traceback.print_exc()
    rows.append(row)
    print(fmt_row(row), flush=True)
    gc.collect()
    return row


# ---------------------------------------------------------------------------- decode
def decode_case(args, B, ctx, ps, rng):
    K, N, D = args.kv_heads, args.q_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    kv_dtype = jnp.dtype(args.kv_dtype or args.dtype)
    mp = -(-ctx // ps)
    pages = B * mp
    kv_bytes = 2 * B * ctx * K * D * kv_dtype.itemsize
    n_rot = args.rotate or int(min(16, max(1, ROTATE_BYTES // max(kv_bytes, 1))))
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    k1, k2, k3 = jax.random.split(key, 3)
    base_k = jax.random.normal(k1, (K, pages, ps, D), jnp.float32).astype(kv_dtype)
    base_v = jax.random.normal(k2, (K, pages, ps, D), jnp.float32).astype(kv_dtype)
    q = jax.random.normal(k3, (B, N, D), jnp.float32).astype(dtype)
    pt0 = jnp.asarray(rng.permutation(pages).reshape(B, mp).astype(np.int32))
    lens = jnp.full((B,), ctx, jnp.int32)
    kc = jnp.concatenate([base_k] * n_rot, axis=1) if n_rot > 1 else base_k
    vc = jnp.concatenate([base_v] * n_rot, axis=1) if n_rot > 1 else base_v
    pts = jnp.stack([pt0 + r * pages for r in range(n_rot)])
    ref = paged_decode_reference(q, base_k, base_v, pt0, lens, scale=args.scale)
    return dict(q=q, kc=kc, vc=vc, pts=pts, lens=lens, ref=ref, base_k=base_k, base_v=base_v,
                pt0=pt0, n_rot=n_rot, kv_bytes=kv_bytes, mp=mp)


def decode_configs(args, B, ctx) -> list[DecodeConfig]:
    if not args.sweep:
        return [DecodeConfig()]
    auto = default_num_splits(B, args.kv_heads, ctx)
    splits = sorted(set(args.num_splits or [1, auto, 2 * auto, max(1, auto // 2)]))
    out = []
    for bk, ns, nw, st in itertools.product(args.block_k or [64, 128, 256], splits,
                                            args.num_warps or [4, 8], args.num_stages or [2, 3]):
        out.append(DecodeConfig(block_k=bk, num_splits=ns, num_warps=nw, num_stages=st))
    return out


def describe(cfg, B=None, K=None, ctx=None) -> str:
    if isinstance(cfg, DecodeConfig):
        ns = cfg.num_splits or default_num_splits(B, K, ctx)
        return f"bk={cfg.block_k or 'auto'} ns={ns} w={cfg.num_warps} s={cfg.num_stages}"
    if isinstance(cfg, PrefillConfig):
        return (f"bq={cfg.block_q or 'auto'} bk={cfg.block_k or 'auto'} w={cfg.num_warps or 'auto'} "
                f"s={cfg.num_stages}{'' if cfg.heavy_first else ' in-order'}")
    return str(cfg)


def bench_decode(args, rows: list[Row]) -> None:
    rng = np.random.default_rng(0)
    scale, interp = args.scale, args.smoke
    for ps, B, ctx in itertools.product(args.page_sizes, args.batches, args.contexts):
        name = f"B={B} ctx={ctx} ps={ps}"
        try:
            c = decode_case(args, B, ctx, ps, rng)
        except Exception as e:
            rows.append(Row("decode", name, "setup", status="error: " + short(e)))
            print(fmt_row(rows[-1]), flush=True)
            continue
        est = c["kv_bytes"] / 2.0e12 + 5e-6
        def metric(t: float, kv_bytes: float = c["kv_bytes"]) -> dict:
            return {"tbps": kv_bytes / t / 1e12}
        ref = (c["ref"], lambda o: o)
        arrays = (c["kc"], c["vc"], c["pts"], c["lens"])

        best = None
        for cfg in decode_configs(args, B, ctx):
            def ours(q, r, kc, vc, pts, lens, cfg=cfg):
                return paged_decode_attention(q, kc, vc, pts[r], lens, scale=scale, config=cfg,
                                              interpret=interp)
            row = run_variant(rows, Row("decode", name, "pallas paged_decode",
                                        describe(cfg, B, args.kv_heads, ctx)),
                              ours, c["q"], arrays, ref, est, c["n_rot"], args, metric)
            if row.status == "ok" and (best is None or row.us < best.us):
                best = row
        if args.sweep and best is not None:
            print(f"  best for {name}: {best.config} {best.us:.1f} us {best.tbps:.2f} TB/s")

        if "xla" in args.baselines:
            def xla(q, r, kc, vc, pts, lens):
                Bq = q.shape[0]
                batch = StepBatch(
                    tokens=jnp.zeros((Bq,), jnp.int32), positions=lens - 1,
                    slot_mapping=jnp.zeros((Bq,), jnp.int32), seq_ids=jnp.arange(Bq, dtype=jnp.int32),
                    page_tables=pts[r], query_start=jnp.arange(Bq + 1, dtype=jnp.int32),
                    kv_lens=lens, logits_indices=jnp.arange(Bq, dtype=jnp.int32))
                return reference_attention(q, kc, vc, batch, scale)
            run_variant(rows, Row("decode", name, "xla reference"), xla, c["q"], arrays, ref,
                        est * 3, c["n_rot"], args, metric)

        if "jax_paged" in args.baselines:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
                ppcb = next(p for p in (8, 4, 2, 1) if p * ps <= max(128, ps) and c["mp"] % p == 0)
                ks = next(s for s in (16, 8, 4, 2, 1) if c["mp"] % (s * ppcb) == 0)

                def jax_paged(q, r, kc, vc, pts, lens, ppcb=ppcb, ks=ks):
                    # this op applies no softmax scale: pre-scale q
                    return jpa.paged_attention(q * jnp.asarray(scale, q.dtype), kc, vc, pts[r],
                                               lens, block_h=16,
                                               pages_per_compute_block=ppcb, k_splits=ks,
                                               interpret=interp)
                run_variant(rows, Row("decode", name, "jax ops paged_attention",
                                      f"ppcb={ppcb} ks={ks}"),
                            jax_paged, c["q"], arrays, ref, est, c["n_rot"], args, metric)
            except Exception as e:
                rows.append(Row("decode", name, "jax ops paged_attention",
                                status="error: " + short(e)))
                print(fmt_row(rows[-1]), flush=True)

        if "jax_gqa" in args.baselines:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from jax.experimental.pallas.ops.gpu import decode_attention as jda
                K, D = args.kv_heads, args.head_dim
                kk = jnp.moveaxis(c["base_k"][:, c["pt0"]].reshape(K, B, c["mp"] * ps, D), 0, 2)
                vv = jnp.moveaxis(c["base_v"][:, c["pt0"]].reshape(K, B, c["mp"] * ps, D), 0, 2)

                L = c["mp"] * ps
                gks = next(s for s in (16, 8, 4, 2, 1) if L % s == 0 and L // s >= 16)
                gbk = min(128, L // gks)

                def jax_gqa(q, r, kk, vv, lens, gks=gks, block_k=gbk):
                    return jda.gqa(q, kk, vv, kv_seq_len=lens, sm_scale=scale, k_splits=gks,
                                   block_k=block_k, interpret=interp)
                run_variant(rows, Row("decode", name, "jax ops decode_attention.gqa",
                                      f"contiguous KV, ks={gks}"),
                            jax_gqa, c["q"], (kk, vv, c["lens"]), ref, est, 1, args, metric)
                del kk, vv
            except Exception as e:
                rows.append(Row("decode", name, "jax ops decode_attention.gqa",
                                status="error: " + short(e)))
                print(fmt_row(rows[-1]), flush=True)
        del c
        gc.collect()


# --------------------------------------------------------------------------- prefill
def prefill_oracle_rows(q, k, v, prefix, rows, scale):
    """f32 oracle for selected new-token rows of one sequence; k/v contiguous [L, K, D]."""
    n, N, D = q.shape
    L, K, _ = k.shape
    qq = q[rows].astype(jnp.float32).reshape(len(rows), K, N // K, D)
    s = jnp.einsum("rkgd,lkd->rkgl", qq, k.astype(jnp.float32), precision="highest") * scale
    pos = prefix + jnp.asarray(rows)
    s = jnp.where((jnp.arange(L)[None, :] <= pos[:, None])[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("rkgl,lkd->rkgd", p, v.astype(jnp.float32), precision="highest")
    return o.reshape(len(rows), N, D)


def prefill_configs(args) -> list[PrefillConfig]:
    if not args.sweep:
        return [PrefillConfig()]
    out = []
    g = args.q_heads // args.kv_heads
    gp = 1 << max(0, (g - 1).bit_length())
    for bq, bk, nw, st, hf in itertools.product(
            args.block_q or [16, 32, 64], args.block_k or [32, 64, 128], args.num_warps or [4, 8],
            args.num_stages or [2, 3], args.heavy_first or [1]):
        if 16 <= bq * gp <= 256:
            out.append(PrefillConfig(block_q=bq, block_k=bk, num_warps=nw, num_stages=st,
                                     heavy_first=bool(hf)))
    return out


def to_pages(x: jax.Array, perm: np.ndarray, ps: int) -> jax.Array:
    """Contiguous KV [L, K, D] as pages [K, len(perm), ps, D], logical page j at perm[j]."""
    mp = len(perm)
    x = jnp.pad(x, ((0, mp * ps - x.shape[0]), (0, 0), (0, 0))).reshape(mp, ps, *x.shape[1:])
    pages = jnp.zeros_like(x).at[perm].set(x)
    return jnp.transpose(pages, (2, 0, 1, 3))


def bench_prefill(args, rows: list[Row]) -> None:
    rng = np.random.default_rng(1)
    K, N, D = args.kv_heads, args.q_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    scale, interp = args.scale, args.smoke
    for ps, n, prefix in itertools.product(args.page_sizes, args.prefill_new, args.prefill_prefix):
        name = f"new={n} prefix={prefix} ps={ps}"
        L = n + prefix
        mp = -(-L // ps)
        pairs = n * prefix + n * (n + 1) // 2
        flops = 4.0 * pairs * N * D
        def metric(t: float, flops: float = flops) -> dict:
            return {"tflops": flops / t / 1e12}
        est = flops / 2.5e14 + 1e-5
        try:
            key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
            k1, k2, k3 = jax.random.split(key, 3)
            kcont = jax.random.normal(k1, (L, K, D), jnp.float32).astype(dtype)
            vcont = jax.random.normal(k2, (L, K, D), jnp.float32).astype(dtype)
            q = jax.random.normal(k3, (n, N, D), jnp.float32).astype(dtype)
            perm = rng.permutation(mp).astype(np.int32)
            kc, vc = to_pages(kcont, perm, ps), to_pages(vcont, perm, ps)
            pt = jnp.asarray(perm[None, :])
            qs = jnp.asarray([0, n], jnp.int32)
            kv = jnp.asarray([L], jnp.int32)
            check = np.unique(np.concatenate([np.arange(min(n, 128)), np.arange(max(0, n - 256), n),
                                              rng.integers(0, n, 128)]))
            ref_rows = prefill_oracle_rows(q, kcont, vcont, prefix, check, scale)
            ref = (ref_rows, lambda o, check=check: o[check])
        except Exception as e:
            rows.append(Row("prefill", name, "setup", status="error: " + short(e)))
            print(fmt_row(rows[-1]), flush=True)
            continue

        arrays = (kc, vc, pt, qs, kv)
        best = None
        for cfg in prefill_configs(args):
            def ours(q, r, kc, vc, pt, qs, kv, cfg=cfg):
                return ragged_prefill_attention(q, kc, vc, qs, kv, pt, scale=scale, config=cfg,
                                                interpret=interp)
            row = run_variant(rows, Row("prefill", name, "pallas ragged_prefill", describe(cfg)),
                              ours, q, arrays, ref, est, 1, args, metric)
            if row.status == "ok" and (best is None or row.us < best.us):
                best = row
        if args.sweep and best is not None:
            print(f"  best for {name}: {best.config} {best.us:.1f} us {best.tflops:.1f} TFLOP/s")

        if is_hopper() and not interp:
            for bk, stages, hpp in itertools.product(args.mgpu_block_k, args.mgpu_stages,
                                                     args.mgpu_heads):
                mcfg = MosaicPrefillConfig(block_k=bk, num_stages=stages,
                                           heads_per_program=hpp or None)

                def mosaic(q, r, kc, vc, pt, qs, kv, mcfg=mcfg):
                    return ragged_prefill_attention_mgpu(q, kc, vc, qs, kv, pt, scale=scale,
                                                         config=mcfg)
                run_variant(rows, Row("prefill", name, "mosaic ragged_prefill",
                                      f"bk{bk} st{stages} heads {hpp or 'all'}"),
                            mosaic, q, arrays, ref, est, 1, args, metric)

        if "xla" in args.baselines:
            score_bytes = 3 * n * N * mp * ps * 4
            if score_bytes > args.xla_max_gb * 2**30:
                rows.append(Row("prefill", name, "xla reference",
                                status=f"skipped: ~{score_bytes / 2**30:.0f} GiB of scores"))
                print(fmt_row(rows[-1]), flush=True)
            else:
                def xla(q, r, kc, vc, pt, qs, kv):
                    T = q.shape[0]
                    batch = StepBatch(
                        tokens=jnp.zeros((T,), jnp.int32),
                        positions=kv[0] - T + jnp.arange(T, dtype=jnp.int32),
                        slot_mapping=jnp.zeros((T,), jnp.int32), seq_ids=jnp.zeros((T,), jnp.int32),
                        page_tables=pt, query_start=qs, kv_lens=kv,
                        logits_indices=jnp.zeros((1,), jnp.int32))
                    return reference_attention(q, kc, vc, batch, scale)
                run_variant(rows, Row("prefill", name, "xla reference"), xla, q, arrays, ref,
                            est * 10, 1, args, metric)

        if "cudnn" in args.baselines:
            def cudnn_step(q, r, kk, vv):
                return jax.nn.dot_product_attention(q[None], kk[None], vv[None], scale=scale,
                                                    is_causal=True, implementation="cudnn")[0]
            run_variant(rows, Row("prefill", name, "cudnn", "contiguous, causal"), cudnn_step,
                        q, (kcont, vcont), ref, est, 1, args, metric)
            if prefix:
                # cuDNN's causal mask may align queries to the top-left when T < S; this variant
                # recomputes the prefix queries too (useful FLOPs are counted) and slices.
                def cudnn_full(q, r, kk, vv, qpre, prefix=prefix):
                    qf = jnp.concatenate([qpre, q])[None]
                    o = jax.nn.dot_product_attention(qf, kk[None], vv[None], scale=scale,
                                                     is_causal=True, implementation="cudnn")
                    return o[0, prefix:]
                qpre = jax.random.normal(jax.random.PRNGKey(5), (prefix, N, D)).astype(dtype)
                run_variant(rows, Row("prefill", name, "cudnn", "full causal, prefix recomputed"),
                            cudnn_full, q, (kcont, vcont, qpre), ref, est * 2, 1, args, metric)
        del arrays, kc, vc, kcont, vcont, q
        gc.collect()


# ---------------------------------------------------------------------------- mixed
def mixed_case(args, B, ctx, n, prefix, ps, rng):
    """A step of B decode rows (context ctx) then one chunk of n tokens after `prefix`."""
    K, N, D = args.kv_heads, args.q_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    kv_dtype = jnp.dtype(args.kv_dtype or args.dtype)
    lens = np.array([ctx] * B + [prefix + n], np.int32)
    mp = -(-int(lens.max()) // ps)
    pages = (B + 1) * mp
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    k1, k2, k3 = jax.random.split(key, 3)
    kc = jax.random.normal(k1, (K, pages, ps, D), jnp.float32).astype(kv_dtype)
    vc = jax.random.normal(k2, (K, pages, ps, D), jnp.float32).astype(kv_dtype)
    T = B + n
    q = jax.random.normal(k3, (T, N, D), jnp.float32).astype(dtype)
    batch = StepBatch(
        tokens=jnp.zeros((T,), jnp.int32),
        positions=jnp.asarray(np.concatenate([lens[:B] - 1, prefix + np.arange(n)]), jnp.int32),
        slot_mapping=jnp.zeros((T,), jnp.int32),
        seq_ids=jnp.asarray(np.concatenate([np.arange(B), np.full(n, B)]), jnp.int32),
        page_tables=jnp.asarray(rng.permutation(pages).reshape(B + 1, mp).astype(np.int32)),
        query_start=jnp.asarray(np.concatenate([np.arange(B + 1), [B + n]]), jnp.int32),
        kv_lens=jnp.asarray(lens),
        logits_indices=jnp.asarray(np.concatenate([np.arange(B), [B + n - 1]]), jnp.int32))
    kv_bytes = 2 * int(lens.sum()) * K * D * kv_dtype.itemsize
    return q, kc, vc, batch, kv_bytes


def bench_mixed(args, rows: list[Row]) -> None:
    rng = np.random.default_rng(2)
    scale, interp = args.scale, args.smoke
    for ps, B, ctx, n, prefix in itertools.product(args.page_sizes, args.batches, args.contexts,
                                                   args.prefill_new, args.prefill_prefix):
        name = f"B={B} ctx={ctx} + new={n} prefix={prefix} ps={ps}"
        q, kc, vc, batch, kv_bytes = mixed_case(args, B, ctx, n, prefix, ps, rng)
        ref = (reference_attention(q.astype(jnp.float32), kc.astype(jnp.float32),
                                   vc.astype(jnp.float32), batch, scale), lambda o: o)
        def metric(t: float, kv_bytes: float = kv_bytes) -> dict:
            return {"tbps": kv_bytes / t / 1e12}
        est = kv_bytes / 2.0e12 + 1e-5
        for mode, backend in itertools.product(args.modes, args.prefill_backends):
            if mode == "decode" and backend != args.prefill_backends[0]:
                continue                                   # the decode mode has no prefill share
            def ours(q, r, kc, vc, batch, mode=mode, backend=backend):
                return paged_attention_pallas(q, kc, vc, batch, scale, interp, mode=mode,
                                              prefill_backend=backend)
            run_variant(rows, Row("mixed", name, f"pallas mode={mode}", f"prefill {backend}"),
                        ours, q, (kc, vc, batch), ref, est, 1, args, metric)
        if "xla" in args.baselines:
            def xla(q, r, kc, vc, batch):
                return reference_attention(q, kc, vc, batch, scale)
            run_variant(rows, Row("mixed", name, "xla reference"), xla, q, (kc, vc, batch), ref,
                        est * 3, 1, args, metric)
        del q, kc, vc, batch
        gc.collect()


# ---------------------------------------------------------------------------- output
def fmt(x, spec):
    return "" if x is None else format(x, spec)


HEADER = ("| kind | case | variant | config | us | TB/s | TFLOP/s | max err | status |\n"
          "|---|---|---|---|---:|---:|---:|---:|---|")


def fmt_row(r: Row) -> str:
    return (f"| {r.kind} | {r.case} | {r.variant} | {r.config} | {fmt(r.us, '.1f')} | "
            f"{fmt(r.tbps, '.3f')} | {fmt(r.tflops, '.1f')} | {fmt(r.err, '.1e')} | {r.status} |")


def kv_write_check(args) -> str:
    try:
        shape = (args.kv_heads, 4096, 16, args.head_dim)
        rep = write_in_place_report(compile_write_kv(shape, jnp.dtype(args.dtype), 256),
                                    shape, jnp.dtype(args.dtype))
        return (f"write_kv under donation: in_place={rep.in_place} (aliased {rep.aliased_bytes} B, "
                f"temp {rep.temp_bytes} B, cache copies {len(rep.cache_copies)})")
    except Exception as e:
        return "write_kv in-place check failed: " + short(e)


def ints(text: str) -> list[int]:
    """A comma-separated list of integers, as argparse's ``type``."""
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few cases, fewer repeats")
    p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    p.add_argument("--only", choices=["all", "decode", "prefill", "mixed"], default="all",
                   help="all = decode and prefill (the issue's grid); mixed runs only when named")
    p.add_argument("--batches", type=ints, default=None)
    p.add_argument("--contexts", type=ints, default=None)
    p.add_argument("--page-sizes", type=ints, default=None)
    p.add_argument("--prefill-new", type=ints, default=None)
    p.add_argument("--prefill-prefix", type=ints, default=None)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-dtype", default=None, type=lambda v: "float8_e4m3fn" if v == "fp8" else v,
                   help="KV cache dtype of the decode and mixed cases (default: --dtype; "
                        "fp8 = float8_e4m3fn)")
    p.add_argument("--baselines", default="xla,jax_paged,jax_gqa,cudnn",
                   help="comma list from xla,jax_paged,jax_gqa,cudnn (empty: none)")
    p.add_argument("--sweep", action="store_true", help="sweep kernel block parameters")
    p.add_argument("--block-k", type=ints, default=None, help="sweep: keys per iteration")
    p.add_argument("--block-q", type=ints, default=None, help="sweep: prefill tokens per block")
    p.add_argument("--num-splits", type=ints, default=None, help="sweep: decode KV splits")
    p.add_argument("--num-warps", type=ints, default=None)
    p.add_argument("--num-stages", type=ints, default=None)
    p.add_argument("--heavy-first", type=ints, default=None,
                   help="sweep: 1 launches the prefill blocks with the most keys first, 0 in order")
    p.add_argument("--mgpu-block-k", type=ints, default=[128],
                   help="Mosaic GPU prefill (GPU only): keys per pipeline stage")
    p.add_argument("--mgpu-stages", type=ints, default=[2],
                   help="Mosaic GPU prefill (GPU only): K/V stages in flight")
    p.add_argument("--modes", type=lambda v: v.split(","), default=["mixed", "prefill", "decode"],
                   help="mixed cases: paged_attention_pallas modes to time")
    p.add_argument("--prefill-backends", type=lambda v: v.split(","), default=["auto"],
                   help="mixed cases: prefill kernels to time (auto, triton, mosaic)")
    p.add_argument("--mgpu-heads", type=ints, default=[0],
                   help="Mosaic GPU prefill (GPU only): query heads per program (0: all of a KV head)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--max-iters", type=int, default=200, help="max calls per timed loop")
    p.add_argument("--rotate", type=int, default=None,
                   help="cache copies paged variants rotate over (default: >= 256 MiB of KV)")
    p.add_argument("--xla-max-gb", type=float, default=24.0,
                   help="skip the XLA prefill reference above this many GiB of scores")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    a = p.parse_args(argv)
    a.baselines = [b for b in a.baselines.split(",") if b]
    if a.smoke:
        a.q_heads, a.kv_heads, a.head_dim = min(a.q_heads, 8), min(a.kv_heads, 2), min(a.head_dim, 64)
        defaults = dict(batches=[1, 3], contexts=[100, 300], page_sizes=[16], prefill_new=[40],
                        prefill_prefix=[0, 50], reps=1, rotate=1)
        a.max_iters = 3
    elif a.quick:
        defaults = dict(batches=[1, 64], contexts=[4096, 16384], page_sizes=[16],
                        prefill_new=[2048], prefill_prefix=[0, 4096], reps=3)
    else:
        defaults = dict(batches=[1, 16, 64], contexts=[1024, 4096, 16384], page_sizes=[16, 64],
                        prefill_new=[2048, 8192], prefill_prefix=[0, 4096], reps=5)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.scale = 1.0 / math.sqrt(a.head_dim)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", str(dev))
    print(f"device: {card}; jax {jax.__version__}; backend {jax.default_backend()}", flush=True)
    if jax.default_backend() == "cpu" and not args.smoke:
        print("note: on CPU the kernels only run with --smoke (interpret mode)", flush=True)
    rows: list[Row] = []
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    if args.only in ("all", "decode"):
        bench_decode(args, rows)
    if args.only in ("all", "prefill"):
        bench_prefill(args, rows)
    if args.only == "mixed":
        bench_mixed(args, rows)
    note = kv_write_check(args)
    elapsed = time.perf_counter() - t0
    table = "\n".join([HEADER] + [fmt_row(r) for r in rows])
    bad = [r for r in rows if r.status != "ok" and not r.status.startswith("skipped")]
    print("\n" + table)
    print(f"\n{note}\n{len(rows)} rows, {len(bad)} not ok, {elapsed:.0f} s", flush=True)
    if args.append_results:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        cmd = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        with open(RESULTS, "a") as f:
            f.write(f"\n## Attention kernels: {card}, {stamp}, jax {jax.__version__}\n\n"
                    f"`python benchmarks/attention.py {cmd}`; {args.dtype}, {args.q_heads} q heads /"
                    f" {args.kv_heads} kv heads, head_dim {args.head_dim}.\n\n{table}\n\n{note}\n")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
