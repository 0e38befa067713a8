"""Model-step speed: decode ms/step at several batch sizes and contexts, and prefill time.

Runs the one ragged step function directly (no scheduler), with the KV cache
filled with random values. Compares against the floor: weight bytes over the
device copy bandwidth measured in the same run.

    python benchmarks/decode_prefill.py --model default            # SmolLM2 on CPU
    python benchmarks/decode_prefill.py --random llama-3.1-8b      # on a GPU, bf16
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.attention.strategy import ContiguousCausalAttention, PagedAttention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import llama_3_1_8b
from arctic_jax.engine.engine import resolve_kv_cache_dtype
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import StepOptions, make_step_fn
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.pytree import tree_nbytes


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), median of runs."""
    x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / float(np.median(times))


def random_cache(cfg, num_pages, page_size, dtype, key):
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    draw = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype))
    keys = jax.random.split(key, 2 * cfg.num_layers)
    return KVCache(k=tuple(draw(keys[2 * i]) for i in range(cfg.num_layers)),
                   v=tuple(draw(keys[2 * i + 1]) for i in range(cfg.num_layers)),
                   page_size=page_size)


def time_steps(step, weights, cache, batch, iters):
    """Seconds per step: (median of synchronous steps, mean of back-to-back steps).

    Synchronous steps include the host's dispatch time; back-to-back steps are
    launched without waiting, as the engine does, so dispatch overlaps the device.
    """
    batch = jax.device_put(batch)
    for _ in range(3):
        logits, cache = step(weights, cache, batch)
    logits.block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        logits, cache = step(weights, cache, batch)
        logits.block_until_ready()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(iters):
        logits, cache = step(weights, cache, batch)
    logits.block_until_ready()
    pipelined = (time.perf_counter() - t) / iters
    return float(np.median(times)), pipelined, cache


def decode_batch(batch_size, context, page_size, rng):
    pages_per_seq = -(-(context + 1) // page_size)
    chunks = [SequenceChunk(tokens=[int(rng.integers(0, 1000))], start=context,
                            pages=list(range(b * pages_per_seq, (b + 1) * pages_per_seq)))
              for b in range(batch_size)]
    buckets = Buckets(tokens=(max(batch_size, 1),), seqs=(batch_size,), pages=(pages_per_seq,))
    return build_step_batch(chunks, page_size, buckets)[0], batch_size * pages_per_seq


def prefill_batch(num_tokens, page_size, rng):
    pages = -(-num_tokens // page_size)
    chunk = SequenceChunk(tokens=list(rng.integers(0, 1000, size=num_tokens)), start=0,
                          pages=list(range(pages)))
    buckets = Buckets(tokens=(num_tokens,), seqs=(1,), pages=(pages,))
    return build_step_batch([chunk], page_size, buckets)[0], pages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2)")
    p.add_argument("--random", default=None, choices=["llama-3.1-8b"],
                   help="random weights of a real model shape instead of a checkpoint")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--prefill", default="2048")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-impl", default="reference")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="cache element type: auto (the model's), fp8, bfloat16, ... (as the engine)")
    p.add_argument("--contiguous-prefill", action="store_true",
                   help="also time prefill with StepOptions.contiguous_prefill (cuDNN on a GPU)")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--note", default="")
    args = p.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    if args.random:
        cfg = llama_3_1_8b()
        weights = random_weights(cfg, jax.random.PRNGKey(0), dtype)
        name = f"{args.random} (random weights)"
    else:
        import checkpoints
        loaded = checkpoints.load_model(args.model, dtype=dtype)
        cfg, weights, name = loaded.config, loaded.weights, loaded.name
    wbytes = tree_nbytes(weights)
    bw = copy_bandwidth((2 << 30) if on_gpu else (256 << 20))
    floor_ms = wbytes / bw * 1e3
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
    step = make_step_fn(cfg, StepOptions(attention=PagedAttention(args.attention_impl)))
    rng = np.random.default_rng(0)
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        for b in [int(x) for x in args.batches.split(",")]:
            batch, pages = decode_batch(b, ctx, args.page_size, rng)
            cache = random_cache(cfg, pages, args.page_size, kv_dtype, jax.random.PRNGKey(b + ctx))
            sec, piped, cache = time_steps(step, weights, cache, batch, args.iters)
            del cache
            rows.append((f"decode batch {b}, context {ctx}", sec * 1e3, piped * 1e3, b / piped))
    for n in [int(x) for x in args.prefill.split(",") if x]:
        batch, pages = prefill_batch(n, args.page_size, rng)
        cache = random_cache(cfg, pages, args.page_size, kv_dtype, jax.random.PRNGKey(n))
        sec, piped, cache = time_steps(step, weights, cache, batch, max(3, args.iters // 4))
        rows.append((f"prefill {n} tokens", sec * 1e3, piped * 1e3, n / piped))
        if args.contiguous_prefill:  # the engine's route for a prompt's first chunk
            contiguous = make_step_fn(cfg, StepOptions(
                attention=ContiguousCausalAttention(args.attention_impl)))
            sec, piped, cache = time_steps(contiguous, weights, cache, batch,
                                           max(3, args.iters // 4))
            rows.append((f"prefill {n} tokens, contiguous attention", sec * 1e3, piped * 1e3,
                         n / piped))
        del cache

    device = jax.devices()[0].device_kind
    lines = [f"### decode_prefill: {name}, {dtype.name}, KV cache {kv_dtype.name}, "
             f"attention={args.attention_impl}",
             "",
             f"- date {datetime.date.today()}, device **{device}** ({jax.default_backend()}), "
             f"jax {jax.__version__}, python {platform.python_version()}",
             f"- weights {wbytes / 1e9:.2f} GB; measured copy bandwidth {bw / 1e12:.3f} TB/s; "
             f"floor for one decode step (weights / bandwidth) **{floor_ms:.2f} ms**",
             ]
    if os.environ.get("XLA_FLAGS"):
        lines.append(f"- XLA_FLAGS `{os.environ['XLA_FLAGS']}`")
    if args.note:
        lines.append(f"- {args.note}")
    lines += ["", "| case | ms/step, synchronous | ms/step, back-to-back | tokens/s | x floor |",
              "|---|---|---|---|---|"]
    for label, ms, piped_ms, tps in rows:
        ratio = f"{piped_ms / floor_ms:.2f}" if label.startswith("decode") else "-"
        lines.append(f"| {label} | {ms:.2f} | {piped_ms:.2f} | {tps:,.0f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.append_results:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
