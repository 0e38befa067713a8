"""The top-k / top-p cut-off of a sampling step, both ways ``sampling._cutoff_values`` finds it:
the bisection (the CPU default) against the sort of [R, V] (the default elsewhere,
``sampling.cutoff_method``).

Both are jitted over random logits of R rows and V columns and timed back to back in one process;
the table gives milliseconds per call and the ratio. The two must agree on every row first.

    python benchmarks/sampling_cutoff.py --rows 1,8,64 --vocab 49152,128256 [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.bench.report import append_results
from arctic_jax.sampling import _cutoff_values, cutoff_method


def best_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,64", help="comma-separated R")
    ap.add_argument("--vocab", default="49152,128256", help="comma-separated V")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--append-results", nargs="?", const="benchmarks/RESULTS.md", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    bisect, sort = (jax.jit(functools.partial(_cutoff_values, method=m)) for m in ("bisect", "sort"))
    lines = ["| R | V | sort (ms) | bisection (ms) | speed-up |", "|---:|---:|---:|---:|---:|"]
    for v in (int(x) for x in args.vocab.split(",")):
        for r in (int(x) for x in args.rows.split(",")):
            scaled = jnp.asarray(rng.standard_normal((r, v)).astype(np.float32) * 3.0)
            top_k = jnp.asarray(rng.choice([0, 50], r).astype(np.int32))
            top_p = jnp.asarray(rng.choice([1.0, 0.9, 0.5], r).astype(np.float32))
            a = np.asarray(sort(scaled, top_k, top_p))
            b = np.asarray(bisect(scaled, top_k, top_p))
            if not np.array_equal(a, b):
                raise SystemExit(f"R={r} V={v}: the cut-offs differ: {a} vs {b}")
            t_sort = best_ms(sort, (scaled, top_k, top_p), args.repeats)
            t_bisect = best_ms(bisect, (scaled, top_k, top_p), args.repeats)
            lines.append(f"| {r} | {v} | {t_sort:.3f} | {t_bisect:.3f} | {t_sort / t_bisect:.1f}x |")
    table = "\n".join(lines)
    print(table)
    if args.append_results:
        device = jax.devices()[0]
        card = device.device_kind if device.platform != "cpu" else f"CPU ({platform.machine()}, " \
            f"{os.cpu_count()} cores)"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        append_results(args.append_results, "\n".join([
            "## Sampling cut-off: bisection against a sort (`benchmarks/sampling_cutoff.py`)", "",
            f"- Date: {now}; card {card}; jax {jax.__version__}; Python {platform.python_version()}",
            f"- Floor: the sort of [R, V] (same rule, same results, checked); this backend's "
            f"default: {cutoff_method(jax.default_backend())}",
            f"- Command: `python benchmarks/sampling_cutoff.py --rows {args.rows} --vocab {args.vocab}`",
            "", table, "", ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
