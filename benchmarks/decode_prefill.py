"""Model-step speed: decode ms/step at several batch sizes and contexts, and prefill time.

Runs the one ragged step function directly (no scheduler), with the KV cache
filled with random values. Compares against the floor: weight bytes over the
device copy bandwidth measured in the same run.

    python benchmarks/decode_prefill.py --model default            # SmolLM2 on CPU
    python benchmarks/decode_prefill.py --random llama-3.1-8b      # on a GPU, bf16

``--swiftkv LKV[:G]`` also times the SwiftKV model of the same shape (random weights, Lkv
layers on every token, AcrossKV groups of G) in the same run, and reports each case's
SwiftKV / base time (prefill throughput gain; decode overhead, which should be ~1).
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
from arctic_jax.bench.report import append_results
from arctic_jax.bench.runner import RANDOM_MODEL_SHAPES
from arctic_jax.engine.engine import resolve_kv_cache_dtype
from arctic_jax.engine.programs import jit_forward
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.registry import LLAMA, SWIFTKV
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.pytree import tree_nbytes
from sharding.deployment import SINGLE, Deployment


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
    layers = cfg.num_cache_layers
    keys = jax.random.split(key, 2 * layers)
    return KVCache(k=tuple(draw(keys[2 * i]) for i in range(layers)),
                   v=tuple(draw(keys[2 * i + 1]) for i in range(layers)), page_size=page_size)


def make_step(spec, cfg, weights, attention):
    """The jitted one-device ``(weights, cache, batch) -> (logits, cache)``, cache donated."""
    dep = Deployment.create(cfg, weights)
    return jit_forward(spec, dep, SINGLE, attention), dep.weights[SINGLE]


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


def prefill_batch(num_tokens, num_prompts, page_size, rng):
    """One step prefilling ``num_prompts`` whole prompts of ``num_tokens`` tokens each."""
    pages = -(-num_tokens // page_size)
    chunks = [SequenceChunk(tokens=list(rng.integers(0, 1000, size=num_tokens)), start=0,
                            pages=list(range(p * pages, (p + 1) * pages)))
              for p in range(num_prompts)]
    buckets = Buckets(tokens=(num_tokens * num_prompts,), seqs=(num_prompts,), pages=(pages,))
    return build_step_batch(chunks, page_size, buckets)[0], pages * num_prompts


def parse_prefill(text):
    """``"2048,2048x4"`` -> [(2048, 1), (2048, 4)]: prompt tokens and prompts in one step."""
    cases = []
    for item in (x for x in text.split(",") if x):
        tokens, _, prompts = item.partition("x")
        try:
            cases.append((int(tokens), int(prompts or 1)))
        except ValueError:
            raise SystemExit(f"--prefill: expected N or NxP, got {item!r}") from None
    return cases


def main(argv=None) -> str:
    """Run the cases of ``argv`` (default: the command line); returns the printed table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: embedded SmolLM2)")
    p.add_argument("--random", default=None, choices=sorted(RANDOM_MODEL_SHAPES),
                   help="random weights of a real model shape instead of a checkpoint")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--prefill", default="2048",
                   help="prompt lengths, comma-separated; NxP prefills P prompts of N in one step")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-impl", default="reference")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="cache element type: auto (the model's), fp8, bfloat16, ... (as the engine)")
    p.add_argument("--contiguous-prefill", action="store_true",
                   help="also time prefill with StepOptions.contiguous_prefill (cuDNN on a GPU)")
    p.add_argument("--swiftkv", default=None, metavar="LKV[:G]",
                   help="also time the SwiftKV model of this split (same shape, random weights)")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    if args.random:
        cfg = RANDOM_MODEL_SHAPES[args.random]()
        spec, weights = LLAMA, LLAMA.random_weights(cfg, jax.random.PRNGKey(0), dtype)
        name = f"{args.random} (random weights)"
    else:
        import checkpoints
        loaded = checkpoints.load_model(args.model, dtype=dtype)
        spec, cfg, weights, name = loaded.spec, loaded.config, loaded.weights, loaded.name
    models = {"base": (spec, cfg, weights)}
    if args.swiftkv:
        if spec is not LLAMA:
            raise SystemExit("--swiftkv compares against a Llama base model")
        skv = SwiftKVConfig.from_llama(cfg, *SwiftKVConfig.parse_split(args.swiftkv))
        models["swiftkv"] = (SWIFTKV, skv, SWIFTKV.random_weights(skv, jax.random.PRNGKey(1), dtype))
        name += (f"; SwiftKV Lkv {skv.num_key_value_layers} of {skv.num_layers}, group "
                 f"{skv.key_value_group_size} (random weights)")
    wbytes = tree_nbytes(weights)
    bw = copy_bandwidth((2 << 30) if on_gpu else (256 << 20))
    floor_ms = wbytes / bw * 1e3
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
    cases = [(f"decode batch {b}, context {ctx}", "decode", b, ctx)
             for ctx in [int(c) for c in args.contexts.split(",")]
             for b in [int(x) for x in args.batches.split(",")]]
    for n, prompts in parse_prefill(args.prefill):
        what = f"prefill {n} tokens" + (f" x {prompts} prompts" if prompts > 1 else "")
        cases.append((what, "prefill", n, prompts))
        if args.contiguous_prefill:  # the engine's route for a prompt's first chunk
            cases.append((f"{what}, contiguous attention", "contiguous", n, prompts))
    # results[model][case] = (ms synchronous, ms back-to-back, tokens/s)
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label, (mspec, mcfg, mweights) in models.items():
        steps = {route: make_step(mspec, mcfg, mweights, attention)
                 for route, attention in (("paged", PagedAttention(args.attention_impl)),
                                          ("contiguous", ContiguousCausalAttention(args.attention_impl)))}
        out = results[label] = {}
        rng = np.random.default_rng(0)
        for case, kind, n, extra in cases:  # extra: decode context, or prompts per prefill step
            if kind == "decode":
                batch, pages = decode_batch(n, extra, args.page_size, rng)
                iters, tokens = args.iters, n
            else:
                batch, pages = prefill_batch(n, extra, args.page_size, rng)
                iters, tokens = max(3, args.iters // 4), n * extra
            step, placed = steps["contiguous" if kind == "contiguous" else "paged"]
            cache = random_cache(mcfg, pages, args.page_size, kv_dtype, jax.random.PRNGKey(n + extra))
            sec, piped, cache = time_steps(step, placed, cache, batch, iters)
            del cache
            out[case] = (sec * 1e3, piped * 1e3, tokens / piped)
        del steps

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
    if args.swiftkv:
        lines += ["", "| case | base ms/step | SwiftKV ms/step | SwiftKV / base time | "
                  "base tokens/s | SwiftKV tokens/s |", "|---|---|---|---|---|---|"]
        for case, *_ in cases:
            base, skv = results["base"][case], results["swiftkv"][case]
            lines.append(f"| {case} | {base[1]:.2f} | {skv[1]:.2f} | {skv[1] / base[1]:.3f} | "
                         f"{base[2]:,.0f} | {skv[2]:,.0f} |")
        lines.append("")
        lines.append("(back-to-back ms/step; prefill throughput gain = base / SwiftKV time)")
    else:
        lines += ["", "| case | ms/step, synchronous | ms/step, back-to-back | tokens/s | x floor |",
                  "|---|---|---|---|---|"]
        for case, kind, *_ in cases:
            ms, piped_ms, tps = results["base"][case]
            ratio = f"{piped_ms / floor_ms:.2f}" if kind == "decode" else "-"
            lines.append(f"| {case} | {ms:.2f} | {piped_ms:.2f} | {tps:,.0f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.append_results:
        append_results(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                       "\n" + table + "\n")
    return table


if __name__ == "__main__":
    main()
