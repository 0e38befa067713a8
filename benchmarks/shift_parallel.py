"""Shift parallelism against static TP and static SP, in one deployment.

One engine in shift mode holds both step variants, so static TP (threshold = the
largest bucket: every step TP), static SP (threshold 0: every step SP) and shift
(the threshold) are measured on the same compiled programs, weights and cache.

Cases (Llama-3.1-8B shape, random bf16 weights):
- single requests: TTFT of a 4k-token prompt (p50 of three); TPOT at batch 1 and 8;
- mixed load: inputs uniform in [1k, 8k], 250 outputs, Poisson arrivals.

``--data-parallel`` runs the same cases on P = SP x TP independent one-device engines
instead (data-parallel replicas in one process, each request sent to the replica
with the fewest requests in flight), each replica with the same KV memory per
device as replica 0 sized itself. Run it as a separate process (it needs the
devices' memory for itself).

    python benchmarks/shift_parallel.py --sp 2 --tp 1                    # 2 GPUs
    python benchmarks/shift_parallel.py --sp 2 --tp 1 --data-parallel    # 2 one-GPU replicas
    python benchmarks/shift_parallel.py --tiny --sp 2 --tp 2             # CPU smoke run, 8 simulated devices
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from arctic_jax.bench import report as rep
from arctic_jax.bench import runner
from arctic_jax.bench import workload as wl
from arctic_jax.engine.replicas import build_replicas


def summarize(name: str, result) -> dict:
    r = rep.build_report(result, {})
    return {"mode": name, "ttft_p50": r["ttft_ms"]["p50"], "tpot_p50": r["tpot_ms"]["p50"],
            "e2e_p50": r["e2e_ms"]["p50"], "e2e_p95": r["e2e_ms"]["p95"],
            "out_tps": r["output_throughput"], "n": r["num_completed"]}


def one_device_kwargs(kwargs: dict) -> dict:
    """The engine options without the parallel ones (for one-device replicas)."""
    return {k: v for k, v in kwargs.items()
            if k not in ("parallel_mode", "sequence_parallel_size", "tensor_parallel_size",
                         "shift_parallel_threshold")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--threshold", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second (mixed load)")
    p.add_argument("--num-mixed", type=int, default=24)
    p.add_argument("--long-prompt", type=int, default=4096)
    p.add_argument("--mixed-in", default="1024:8192")
    p.add_argument("--mixed-out", type=int, default=250)
    p.add_argument("--max-model-len", type=int, default=8448)
    p.add_argument("--token-buckets", default="16,64,256,512,1024,2048")
    p.add_argument("--data-parallel", action="store_true",
                   help="P = SP x TP one-device replicas instead of one shift deployment")
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args()

    if args.tiny:
        args.long_prompt, args.mixed_in, args.mixed_out, args.max_model_len = 200, "50:300", 8, 512
        args.num_mixed = 6
    kwargs = dict(parallel_mode="shift", sequence_parallel_size=args.sp,
                  tensor_parallel_size=args.tp, shift_parallel_threshold=args.threshold,
                  max_model_len=args.max_model_len, max_num_seqs=32,
                  max_num_batched_tokens=2048 if not args.tiny else 128,
                  token_buckets=(tuple(int(x) for x in args.token_buckets.split(","))
                                 if not args.tiny else (16, 64, 128)),
                  page_buckets=(-(-args.max_model_len // 16),), kv_cache_memory_fraction=0.5,
                  enable_prefix_caching=False)  # modes replay the same prompts
    shape = "tiny" if args.tiny else "llama-3.1-8b"
    if args.data_parallel:
        engine, name = build_replicas(lambda kw: runner.build_random_engine(shape, kw),
                                             one_device_kwargs(kwargs), args.sp * args.tp)
        warm_s = sum(runner.warmup_engine(e) for e in engine)
        modes = ((f"DP={len(engine)} replicas", None),)
        first = engine[0]
    else:
        engine, name = runner.build_random_engine(shape, kwargs)
        warm_s = runner.warmup_engine(engine)
        top = engine.runner.buckets.tokens[-1]
        modes = (("TP (static)", top), ("SP (static)", 0), ("shift", args.threshold))
        first = engine
    vocab = first.cfg.vocab_size
    long_req = wl.synthetic_requests(3, wl.LengthRange(args.long_prompt, args.long_prompt),
                                     wl.LengthRange(8, 8), vocab, 1)
    n_out = 8 if args.tiny else 64

    def short(n: int) -> list:
        return wl.synthetic_requests(n, wl.LengthRange(128, 128), wl.LengthRange(n_out, n_out),
                                     vocab, 2)
    lo, hi = (int(x) for x in args.mixed_in.split(":"))
    mixed = wl.synthetic_requests(args.num_mixed, wl.LengthRange(lo, hi),
                                  wl.LengthRange(args.mixed_out, args.mixed_out), vocab, 3)
    offsets = wl.poisson_arrival_offsets(len(mixed), args.rate, 4)

    rows = []
    for mode, threshold in modes:
        if threshold is not None:
            engine.runner.shift_threshold = threshold
        ttft = summarize(mode, runner.run_in_process(engine, long_req, concurrency=1))["ttft_p50"]
        tpot1 = summarize(mode, runner.run_in_process(engine, short(2), concurrency=1))["tpot_p50"]
        tpot8 = summarize(mode, runner.run_in_process(engine, short(8), concurrency=8))["tpot_p50"]
        m = summarize(mode, runner.run_in_process(engine, mixed, arrival_offsets=offsets))
        rows.append((mode, ttft, tpot1, tpot8, m))
        print(mode, ttft, tpot1, tpot8, m, flush=True)

    steps = "".join(e.metrics.render().decode() for e in (engine if args.data_parallel else [engine]))
    setup = (f"{args.sp * args.tp} data-parallel one-device replicas" if args.data_parallel
             else f"SP={args.sp} x TP={args.tp}, threshold {args.threshold}")
    lines = [f"### Shift parallelism: {name}, {setup}",
             "",
             f"- date {datetime.date.today()}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
             f"jax {jax.__version__}; warm-up {warm_s:.0f} s",
             f"- single requests: TTFT p50 of three {args.long_prompt}-token prompts, one at a time; "
             f"TPOT at batch 1 and 8 "
             f"(128-token prompts)",
             f"- mixed load: {args.num_mixed} requests, inputs uniform in [{lo}, {hi}], "
             f"{args.mixed_out} outputs, Poisson {args.rate} req/s",
             "",
             "| mode | TTFT 4k ms | TPOT b=1 ms | TPOT b=8 ms | mixed p50 completion ms | "
             "mixed p95 completion ms | mixed output tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, ttft, t1, t8, m in rows:
        lines.append(f"| {mode} | {ttft:.1f} | {t1:.2f} | {t8:.2f} | {m['e2e_p50']:.0f} | "
                     f"{m['e2e_p95']:.0f} | {m['out_tps']:.0f} |")
    table = "\n".join(lines)
    print(table)
    print("\n".join(line for line in steps.splitlines() if line.startswith("arctic_engine_step")))
    if args.append_results:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
