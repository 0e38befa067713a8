"""Where a serving step's time goes: device step, host phases, launch blocking, front end.

Three measurements on one warmed-up engine (Llama-3.1-8B shape, random weights):

1. **Launch probe.** The same decode program launched back to back: how long each
   launch call holds the host (async dispatch should return in well under a step),
   against the synchronous step time.
2. **Offline decode loop.** ``LLMEngine.step`` driven directly with ``c`` running
   requests, after their prompts are in: per step, the time in scheduling, input
   building, the launch call, waiting for the result and applying it; once with the
   overlapped loop and once reading each step before scheduling the next (the loop the
   engine runs while greedy requests speculate: the cost of reading first).
3. **Async front end.** The same engine behind ``AsyncEngine`` with asyncio clients
   (what ``arctic-jax bench`` and the server do), at each ``sys.setswitchinterval``
   given, to see what the client thread's share of the GIL costs the engine thread.

    python benchmarks/engine_overhead.py --random llama-3.1-8b              # on a GPU
    python benchmarks/engine_overhead.py --random tiny --input-len 64 --output-len 64 \
        --max-model-len 256 --token-buckets 64,128 --page-buckets 16      # CPU smoke run
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from arctic_jax.bench import report as rep
from arctic_jax.bench import runner
from arctic_jax.bench import workload as wl
from arctic_jax.sampling import SamplingParams


def ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


class PhaseTimer:
    """Wraps methods of live objects and sums the seconds spent in each."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)

    def wrap(self, obj, method: str, name: str) -> None:
        inner = getattr(obj, method)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.total[name] += time.perf_counter() - t
        object.__setattr__(obj, method, timed)   # frozen dataclasses too

    def unwrap(self, obj, method: str) -> None:
        object.__delattr__(obj, method)


def launch_probe(engine, repeats: int = 20) -> dict:
    """Per-call host time of back-to-back launches of the smallest decode program."""
    r = engine.runner
    inputs = r.inputs.dummy(r.buckets.tokens[0], r.buckets.pages[-1])
    variant = r.variants[0]
    r._run(variant, inputs).block_until_ready()
    sync = []
    for _ in range(repeats):
        t = time.perf_counter()
        r._run(variant, inputs).block_until_ready()
        sync.append(time.perf_counter() - t)
    calls, out = [], None
    t0 = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        out = r._run(variant, inputs)
        calls.append(time.perf_counter() - t)
    out.block_until_ready()
    piped = (time.perf_counter() - t0) / repeats
    return {"sync_ms": 1e3 * float(np.median(sync)), "pipelined_ms": 1e3 * piped,
            "launch_call_ms": 1e3 * float(np.median(calls[2:]))}


def offline_decode(engine, c: int, input_len: int, steps: int, rng, read_first: bool = False) -> dict:
    """Per-step phase times with ``c`` requests decoding (prompts already prefilled).

    ``read_first``: every step is read before the next is scheduled (what the engine does
    while greedy requests speculate) instead of overlapping host work with the running step.
    """
    ids = []
    for _ in range(c):
        prompt = [int(t) for t in rng.integers(1, engine.cfg.vocab_size, size=input_len)]
        ids.append(engine.add_request(prompt, SamplingParams(max_tokens=steps + 64, temperature=0,
                                                             ignore_eos=True)))
    sched = engine.scheduler
    while any(r.num_computed < len(r.prompt_ids) for r in sched.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    timer = PhaseTimer()
    timer.wrap(sched, "schedule", "schedule")
    timer.wrap(engine.runner.inputs, "build", "build inputs")
    if read_first:
        object.__setattr__(engine, "_read_first", lambda step: True)
    timer.wrap(engine.runner, "_run", "launch call")
    timer.wrap(engine.runner, "fetch", "wait + copy result")
    timer.wrap(sched, "update", "apply tokens")
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    if read_first:
        object.__delattr__(engine, "_read_first")
    for obj, m in ((sched, "schedule"), (sched, "update"), (engine.runner.inputs, "build"),
                   (engine.runner, "_run"), (engine.runner, "fetch")):
        timer.unwrap(obj, m)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    row = {"step_ms": 1e3 * wall / steps, "tok_s": c * steps / wall}
    row.update({k: 1e3 * v / steps for k, v in timer.total.items()})
    return row


def front_end(engine, c: int, input_len: int, output_len: int, switch: float, seed: int) -> dict:
    reqs = wl.synthetic_requests(2 * c, wl.LengthRange(input_len, input_len),
                                 wl.LengthRange(output_len, output_len), engine.cfg.vocab_size, seed)
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch)
    try:
        result = runner.run_in_process(engine, reqs, concurrency=c)
    finally:
        sys.setswitchinterval(old)
    r = rep.build_report(result, {})
    return {"ttft_p50": r["ttft_ms"]["p50"], "tpot_p50": r["tpot_ms"]["p50"],
            "out_tps": r["output_throughput"], "compiles": result.info["xla_compiles_during_run"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", default="llama-3.1-8b", choices=sorted(runner.RANDOM_MODEL_SHAPES))
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--switch-intervals", default="0.005,0.0005")
    p.add_argument("--skip-front-end", action="store_true")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--token-buckets", default="64,128,256,512,1024,2048")
    p.add_argument("--page-buckets", default="128")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.5)
    p.add_argument("--attention-impl", default=None)
    args = p.parse_args()

    kwargs = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  token_buckets=ints(args.token_buckets), page_buckets=ints(args.page_buckets),
                  kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                  enable_prefix_caching=False, attention_impl=args.attention_impl)
    t = time.perf_counter()
    engine, name = runner.build_random_engine(args.random, kwargs)
    warm = runner.warmup_engine(engine, progress=False)
    print(f"# {name}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; built + warmed in "
          f"{time.perf_counter() - t:.0f} s (warm-up {warm:.0f} s)", flush=True)
    probe = launch_probe(engine)
    print("launch probe (smallest decode bucket): sync {sync_ms:.2f} ms, back-to-back "
          "{pipelined_ms:.2f} ms/step, launch call holds the host {launch_call_ms:.2f} ms"
          .format(**probe), flush=True)
    rng = np.random.default_rng(0)
    conc = ints(args.concurrency)
    for c in conc:
        for read_first in (False, True):
            row = offline_decode(engine, c, args.input_len, args.steps, rng, read_first)
            phases = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k not in ("step_ms", "tok_s"))
            loop = "read first" if read_first else "overlapped"
            print(f"offline decode c={c} ({loop}): {row['step_ms']:.2f} ms/step ({row['tok_s']:.0f} "
                  f"tok/s); ms/step in: {phases}", flush=True)
    if args.skip_front_end:
        return
    for switch in (float(x) for x in args.switch_intervals.split(",")):
        for c in conc:
            row = front_end(engine, c, args.input_len, args.output_len, switch, seed=c)
            print(f"front end c={c} switchinterval={switch}: TTFT p50 {row['ttft_p50']:.1f} ms, "
                  f"TPOT p50 {row['tpot_p50']:.2f} ms, {row['out_tps']:.0f} out tok/s, "
                  f"compiles {row['compiles']}", flush=True)


if __name__ == "__main__":
    main()
