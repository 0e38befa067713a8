"""Prefill on the CPU (issue 16): the engine's prompt throughput against a plain dense forward of
the same model, and the longest wait of a running stream while a long prompt is prefilled.

For each prompt length (random token ids, fixed seed):

- floor: one jitted ``arctic_jax.models.llama`` forward of the whole prompt at once, causal
  attention over the step's own K/V (``ContiguousCausalAttention``), logits of the last token;
- engine: ``LLM.generate`` with ``max_tokens=1`` (the user path: scheduler, chunked prefill
  under the step token budget, paged attention, sampler); TTFT is its wall time;
- stream gap (the longest prompt only): a greedy stream decodes in the engine, then the prompt
  arrives next to it; the largest time between two of the stream's tokens from the last one
  before the prompt's arrival to the first one after the prompt's first token.

Compile time is excluded: every case runs once on other random tokens of the same length
first (same programs), and the timed runs use fresh tokens (no prefix-cache hits). Times are
the best of ``--repeats`` runs (the largest gap over them); the load average is printed
because this is meant for a small shared machine.

    python benchmarks/cpu_prefill.py                        # embedded SmolLM2-135M, float32
    python benchmarks/cpu_prefill.py --max-num-batched-tokens 512 --append-results
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.attention.strategy import ContiguousCausalAttention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.bench.report import append_results
from arctic_jax.kv_cache import KVCache
from arctic_jax.models import llama
from arctic_jax.models.step_options import StepOptions
from arctic_jax.sampling import SamplingParams

GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0)


def cpu_model() -> str:
    """The CPU's model name (lscpu), or what platform knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_prompt(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(0, vocab, size=n)]


def floor_seconds(cfg, weights, n: int, repeats: int, rng: np.random.Generator,
                  page_size: int = 16) -> float:
    """Best wall time of one dense causal forward of n tokens (last-token logits)."""
    step = llama.make_step_fn(cfg, StepOptions(attention=ContiguousCausalAttention("reference")))
    pages = -(-n // page_size)
    buckets = Buckets(tokens=(n,), seqs=(1,), pages=(pages,))
    cache = KVCache.allocate(cfg, pages, page_size, jnp.float32)
    times = []
    for i in range(repeats + 2):   # runs 0 and 1 compile (the fresh cache, then a step's output)
        chunk = SequenceChunk(tokens=random_prompt(rng, n, cfg.vocab_size), start=0,
                              pages=list(range(pages)))
        batch = jax.device_put(build_step_batch([chunk], page_size, buckets)[0])
        start = time.perf_counter()
        logits, cache = step(weights, cache, batch)
        logits.block_until_ready()
        if i > 1:
            times.append(time.perf_counter() - start)
    return min(times)


def engine_seconds(llm, n: int, repeats: int, rng: np.random.Generator) -> float:
    """Best wall time of ``LLM.generate`` of an n-token prompt with one output token."""
    vocab = llm.config.vocab_size
    llm.generate([random_prompt(rng, n, vocab)], GREEDY_ONE)   # compiles this length's programs
    times = []
    for _ in range(repeats):
        prompt = random_prompt(rng, n, vocab)
        start = time.perf_counter()
        out = llm.generate([prompt], GREEDY_ONE)
        times.append(time.perf_counter() - start)
        if len(out[0].token_ids) != 1:
            raise RuntimeError(f"expected one output token, got {out[0].token_ids}")
    return min(times)


def stream_gap(llm, n: int, rng: np.random.Generator, stream_prompt: int = 32) -> dict:
    """One run of the stream-gap scenario: returns the largest gap (s) around the prefill, the
    stream's median gap before the prompt arrived, the prompt's TTFT and its prefill steps."""
    engine = llm.engine
    vocab = llm.config.vocab_size
    stream = engine.add_request(random_prompt(rng, stream_prompt, vocab),
                                SamplingParams(max_tokens=engine.sched_config.max_model_len
                                               - stream_prompt, temperature=0.0, ignore_eos=True))
    times: list[float] = []          # when each step delivered stream tokens
    prompt_id = arrival = first_token = None
    steps_with_prompt = 0
    while True:
        outputs = engine.step()
        now = time.perf_counter()
        if any(o.request_id == stream and o.new_token_ids for o in outputs):
            times.append(now)
        if prompt_id is None and len(times) >= 8:       # the stream decodes steadily: add the prompt
            arrival_index = len(times) - 1
            prompt_id = engine.add_request(random_prompt(rng, n, vocab), GREEDY_ONE)
            arrival = time.perf_counter()
        elif prompt_id is not None:
            steps_with_prompt += 1
            if first_token is None and any(o.request_id == prompt_id and o.new_token_ids
                                           for o in outputs):
                first_token = now
                first_index = len(times)
            if first_token is not None and len(times) > first_index:
                break
    engine.abort(stream)
    while engine.has_unfinished():
        engine.step()
    window = np.diff(times[arrival_index:first_index + 1])
    before = np.diff(times[:arrival_index + 1])
    return {"gap": float(window.max()), "decode_gap": float(np.median(before)),
            "ttft": first_token - arrival, "steps": steps_with_prompt}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--lengths", default="200,800,2000", help="prompt lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is reported)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="the engine's step token budget (default: the engine's default)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--attention-impl", default=None)
    p.add_argument("--compilation-cache-dir", default="none",
                   help="persistent compilation cache ('none': off, so nothing is loaded)")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--skip-gap", action="store_true")
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if not lengths or min(lengths) < 1:
        raise SystemExit(f"--lengths: expected positive integers, got {args.lengths!r}")

    from arctic_jax.llm import LLM

    engine_kwargs = {k: v for k, v in (("max_num_batched_tokens", args.max_num_batched_tokens),
                                       ("max_num_seqs", args.max_num_seqs),
                                       ("attention_impl", args.attention_impl)) if v is not None}
    llm = LLM(args.model, compilation_cache_dir=args.compilation_cache_dir, **engine_kwargs)
    if llm.engine.spec.step is not llama.step:
        raise SystemExit(f"the floor is a Llama forward; {llm.model_name} is a "
                         f"{llm.engine.spec.name} model")
    cfg = llm.config
    sched = llm.engine.sched_config
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        floor = None if args.skip_floor else floor_seconds(cfg, llm.engine.runner.weights[
            llm.engine.runner.variants[0]], n, args.repeats, rng)
        eng = engine_seconds(llm, n, args.repeats, rng)
        rows.append((n, floor, eng))
        print(f"{n} tokens: floor {floor if floor is None else round(floor, 3)} s, engine "
              f"{eng:.3f} s", file=sys.stderr, flush=True)
    gap = None
    if not args.skip_gap:
        n = max(lengths)
        stream_gap(llm, n, rng)                         # compiles the mixed steps' programs
        runs = [stream_gap(llm, n, rng) for _ in range(args.repeats)]
        gap = max(runs, key=lambda r: r["gap"])

    def tps(n: int, sec: float | None) -> str:
        return "-" if sec is None else f"{n / sec:,.0f}"

    flags = sys.argv[1:] if argv is None else argv
    lines = [f"## CPU prefill (issue 16): {llm.model_name}, {cpu_model()} ({os.cpu_count()} cores)", "",
             f"- date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax "
             f"{jax.__version__}, python {platform.python_version()}, backend {jax.default_backend()}, "
             f"weights {jax.tree_util.tree_leaves(llm.engine.runner.weights)[0].dtype}",
             f"- engine: max_num_batched_tokens {sched.max_num_batched_tokens}, max_num_seqs "
             f"{sched.max_num_seqs}, token buckets {list(llm.engine.runner.buckets.tokens)}, page "
             f"buckets {list(llm.engine.runner.buckets.pages)}, attention "
             f"{llm.engine.runner.routes[False].impl}",
             f"- compile time excluded (each case ran once first); best of {args.repeats} runs; "
             f"load average at the end {os.getloadavg()[0]:.2f}",
             f"- command: `python benchmarks/cpu_prefill.py {' '.join(flags)}`"]
    if args.note:
        lines.append(f"- {args.note}")
    lines += ["", "| prompt tokens | floor: dense forward s | floor tok/s | engine TTFT s | engine tok/s "
              "| engine / floor time |", "|---:|---:|---:|---:|---:|---:|"]
    for n, floor, eng in rows:
        ratio = "-" if floor is None else f"{eng / floor:.2f}"
        lines.append(f"| {n:,} | {'-' if floor is None else f'{floor:.3f}'} | {tps(n, floor)} | "
                     f"{eng:.3f} | {tps(n, eng)} | {ratio} |")
    if gap is not None:
        lines += ["", f"Stream gap: a greedy stream decoding next to a {max(lengths):,}-token prompt's "
                  f"prefill ({gap['steps']} steps until its first token, TTFT {gap['ttft']:.2f} s): "
                  f"**largest gap between two stream tokens {gap['gap']:.3f} s** (worst of "
                  f"{args.repeats} runs); {gap['decode_gap'] * 1e3:.0f} ms per token before the "
                  f"prompt arrived."]
    table = "\n".join(lines)
    print(table)
    if args.append_results:
        append_results(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                       "\n" + table + "\n")
    return table


if __name__ == "__main__":
    main()
