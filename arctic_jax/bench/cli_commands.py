"""``arctic-jax bench``: measure latency and throughput of the engine or of a server.

In-process (default): loads ``--model`` (or ``--random-weights SHAPE``), compiles
every step bucket, then times the workload through an ``AsyncEngine``.
HTTP (``--url``): streams ``/v1/completions`` from a running server.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any

from arctic_jax.bench import embeddings as emb
from arctic_jax.bench import report as rep
from arctic_jax.bench import workload as wl
from arctic_jax.cli_args import add_model_args, engine_kwargs, parse_dtype

log = logging.getLogger(__name__)

DEFAULT_RESULTS = "benchmarks/RESULTS.md"


def register(sub: Any) -> None:
    """Add ``bench`` to the subparsers ``sub``."""
    p = sub.add_parser("bench", help="benchmark latency and throughput (in-process or over HTTP)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = p.add_argument_group("target")
    src.add_argument("--url", default=None,
                     help="benchmark a running server (http://host:port) instead of in-process")
    src.add_argument("--random-weights", default=None, metavar="SHAPE",
                     choices=["llama-3.1-8b", "smollm2-shape", "tiny", "bert-base"],
                     help="in-process model with random weights of this shape: llama-3.1-8b, "
                          "smollm2-shape, or tiny (harness smoke test); with --embeddings: "
                          "bert-base or tiny (an encoder); ignores --model")
    src.add_argument("--swiftkv", default=None, metavar="LKV[:G]",
                     help="with --random-weights: the SwiftKV model of that shape, Lkv layers on "
                          "every token and AcrossKV groups of G later layers (a SwiftKV checkpoint "
                          "given as --model is served as SwiftKV without this flag)")
    src.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                     help="in-process: N one-device engine replicas on devices 0..N-1, each "
                          "request sent to the replica with the fewest in flight")
    src.add_argument("--warmup-requests", type=int, default=1,
                     help="untimed requests sent to a server first (HTTP only)")
    load = p.add_argument_group("load (default: every request at once)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_int_levels, default=None,
                      help="closed loop: N clients, each sends its next request when one finishes; "
                           "a comma list (1,16,64) runs one level after another on one engine")
    mode.add_argument("--request-rate", type=float, default=None,
                      help="open loop: Poisson arrivals at this mean rate (req/s; 'inf' = all at once)")
    load.add_argument("--num-requests", type=int, default=None,
                      help="requests to send (default 100; with --dataset: all of its lines)")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    work = p.add_argument_group("workload (synthetic random-token prompts unless --dataset)")
    work.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 256)")
    work.add_argument("--output-len", type=int, default=None, help="output tokens (default 128)")
    work.add_argument("--input-len-range", default=None, metavar="LO:HI",
                      help="uniform prompt length in [LO, HI]")
    work.add_argument("--output-len-range", default=None, metavar="LO:HI",
                      help="uniform output length in [LO, HI]")
    work.add_argument("--vocab-size", type=int, default=None,
                      help="token ids of synthetic prompts are drawn below this (required with --url; "
                           "in-process default: the model's vocabulary)")
    work.add_argument("--dataset", default=None,
                      help='JSONL file, one {"prompt": str or [ids], "max_tokens": int} a line')
    out = p.add_argument_group("output")
    out.add_argument("--output-json", default=None, help="write the full report here")
    out.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    out.add_argument("--append-results", nargs="?", const=DEFAULT_RESULTS, default=None,
                     metavar="PATH", help=f"append a markdown section to PATH (default {DEFAULT_RESULTS})")
    out.add_argument("--title", default=None, help="section title for --append-results")
    out.add_argument("--compare-note", default="",
                     help="free text for --append-results: the peer or floor to compare with")
    emb.add_args(p)
    p.set_defaults(func=cmd_bench)


# --------------------------------------------------------------------- workload
def _lengths(args: argparse.Namespace) -> tuple[wl.LengthRange, wl.LengthRange]:
    def one(fixed: int | None, rng: str | None, default: int, name: str) -> wl.LengthRange:
        if fixed is not None and rng is not None:
            raise ValueError(f"give --{name} or --{name}-range, not both")
        if rng is not None:
            return wl.parse_range(rng, f"--{name}-range")
        value = default if fixed is None else fixed
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
        return wl.LengthRange(value, value)

    return (one(args.input_len, args.input_len_range, 256, "input-len"),
            one(args.output_len, args.output_len_range, 128, "output-len"))


def build_workload(args: argparse.Namespace, vocab_size: int | None) -> tuple[list[wl.BenchRequest], str]:
    """The requests and a one-line description of them."""
    if args.dataset:
        if any(v is not None for v in (args.input_len, args.output_len, args.input_len_range,
                                       args.output_len_range)):
            raise ValueError("--dataset sets prompt and output lengths; drop the length flags")
        requests = wl.load_dataset(args.dataset, args.num_requests)
        d = wl.describe(requests)
        return requests, (f"dataset {args.dataset}: {d['num_requests']} requests, max_tokens "
                          f"{d['output_len_min']}..{d['output_len_max']} (greedy)")
    if vocab_size is None:
        raise ValueError("synthetic prompts over HTTP need --vocab-size (the served model's "
                         "vocabulary size, e.g. 49152 for SmolLM2)")
    input_len, output_len = _lengths(args)
    n = 100 if args.num_requests is None else args.num_requests
    requests = wl.synthetic_requests(n, input_len, output_len, vocab_size, args.seed)
    return requests, (f"synthetic random tokens: {n} requests, input {input_len}, output "
                      f"{output_len} (ignore_eos, greedy, seed {args.seed})")


def _int_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or a comma list of N, got {text!r}") from None
    if not levels:
        raise argparse.ArgumentTypeError("empty concurrency list")
    return levels


def _load(args: argparse.Namespace, n: int, concurrency: int | None = None) -> tuple[dict, str]:
    """Keyword arguments of the drivers' load shape, and its description."""
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        return {"concurrency": concurrency}, f"closed loop, concurrency {concurrency}"
    rate = math.inf if args.request_rate is None else args.request_rate
    offsets = wl.poisson_arrival_offsets(n, rate, args.seed)
    text = "all requests at once" if math.isinf(rate) else \
        f"Poisson arrivals, {rate:g} req/s (seed {args.seed})"
    return {"arrival_offsets": offsets}, text


# ---------------------------------------------------------------------- command
def cmd_bench(args: argparse.Namespace) -> int:
    from arctic_jax.bench import runner

    # In-process engines (LLM, Embedder) keep this setting: their "auto" keeps what is set.
    cache = None
    if not args.url:
        from arctic_jax.engine.compilation_cache import configure_compilation_cache
        cache = configure_compilation_cache(args.compilation_cache_dir)
    if args.embeddings:
        rc = emb.cmd_embeddings(args)
        if cache is not None:
            cache.stop()
            print(cache.summary(), file=sys.stderr)
        return rc
    emb.check_llm_args(args)
    if args.plot:
        rep.check_plotting_available()
    if args.url and args.random_weights:
        raise ValueError("--random-weights runs in-process; it cannot be combined with --url")
    if args.swiftkv and not args.random_weights:
        raise ValueError("--swiftkv builds a random-weight SwiftKV model: give --random-weights "
                         "(a SwiftKV checkpoint is served as SwiftKV from --model)")
    if args.warmup_requests < 0:
        raise ValueError("--warmup-requests must be >= 0")
    if args.num_requests is not None and args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.data_parallel_size > 1 and args.url:
        raise ValueError("--data-parallel-size runs in-process replicas; it cannot be combined "
                         "with --url")
    if args.dataset is None:
        _lengths(args)  # fail on bad length flags before loading a model

    levels = args.concurrency or [None]
    if args.url:
        requests, workload_text = build_workload(args, args.vocab_size)
        meta = {"driver": f"HTTP {args.url}", "model": args.model,
                "card": f"server at {args.url} (not reported over HTTP)", "engine_config": {}}
        engine, vocab = None, args.vocab_size
    else:
        replicas, model_name, meta = _build_engines(args)
        engine = replicas[0]
        vocab = engine.limits().vocab_size
        if args.vocab_size is not None:
            if not 1 <= args.vocab_size <= vocab:
                raise ValueError(f"--vocab-size must be in [1, {vocab}] for this model")
            vocab = args.vocab_size
        requests, workload_text = build_workload(args, vocab)
        requests = runner.tokenize_requests(requests, engine.tokenizer)
        runner.check_fits(requests, engine)  # before the (long) warm-up
        print(f"warming up: compiling {len(engine.runner.buckets.tokens)} x "
              f"{len(engine.runner.buckets.pages)} step buckets ...", file=sys.stderr)
        meta["warmup_s"] = sum(runner.warmup_engine(e) for e in replicas)
        cache.stop()
        print(cache.summary(), file=sys.stderr)
        meta["model"] = model_name
    failed = False
    for level in levels:
        if len(levels) > 1 and args.num_requests is None and args.dataset is None:
            # A sweep without --num-requests: four waves of requests per concurrency level.
            args.num_requests = max(8, 4 * level)
            requests, workload_text = build_workload(args, vocab if engine else args.vocab_size)
            if engine is not None:
                requests = runner.tokenize_requests(requests, engine.tokenizer)
            args.num_requests = None
        load_kwargs, load_text = _load(args, len(requests), level)
        if engine is None:
            result = runner.run_http(args.url, args.model, requests,
                                     warmup_requests=args.warmup_requests, **load_kwargs)
            meta["model"] = result.info.get("served_model", args.model)
        else:
            result = runner.run_in_process(replicas, requests, **load_kwargs)
        level_meta = dict(meta, workload=wl.describe(requests), workload_text=workload_text,
                          load_text=load_text)
        report = rep.build_report(result, level_meta)
        print(rep.format_table(report))
        suffix = "" if len(levels) == 1 else f".c{level}"
        if args.output_json:
            with open(_with_suffix(args.output_json, suffix), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        if args.plot:
            rep.write_plot(result, _with_suffix(args.plot, suffix),
                           title=f"{level_meta['model']} - {load_text}")
        if args.append_results:
            title = args.title or f"{level_meta['model']} on {meta.get('card', '?')}: {load_text}"
            rep.append_results(args.append_results,
                               rep.results_section(report, title=title,
                                                   compare_note=args.compare_note))
            print(f"appended to {args.append_results}", file=sys.stderr)
        failed |= report["num_failed"] > 0 or (engine is not None and
                                              bool(report["length_mismatches"]))
    return 1 if failed else 0


def _with_suffix(path: str, suffix: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}{suffix}{ext}"


def _build_engines(args: argparse.Namespace) -> tuple[list[Any], str, dict]:
    """The in-process engine (or ``--data-parallel-size`` replicas), its name and metadata."""
    import jax

    from arctic_jax.attention.dispatch import default_attention_impl
    from arctic_jax.bench import runner
    from arctic_jax.engine.replicas import build_engines

    kwargs = engine_kwargs(args)
    dtype = parse_dtype(args.dtype)

    def build(kw: dict) -> tuple[Any, str]:
        if args.random_weights:
            return runner.build_random_engine(args.random_weights, kw, dtype=dtype, seed=args.seed,
                                              swiftkv=args.swiftkv)
        return runner.build_checkpoint_engine(args.model, kw, dtype=dtype)

    dp = args.data_parallel_size
    replicas, name = build_engines(build, kwargs, dp)
    engine = replicas[0]
    sc = engine.sched_config
    config = dataclasses.asdict(engine.config)
    config.update(max_model_len=sc.max_model_len, num_pages=sc.num_pages,
                  attention_impl=config["attention_impl"] or default_attention_impl(),
                  contiguous_prefill_min_tokens=engine.runner.contiguous_prefill_min_tokens)
    config = {k: v for k, v in config.items() if v is not None}
    driver = "in-process AsyncEngine" if dp == 1 else f"in-process, {dp} data-parallel replicas"
    meta = {"driver": driver, "engine_config": config, "data_parallel_size": dp,
            "dtype": str(jax.tree_util.tree_leaves(engine.runner.weights)[0].dtype),
            **runner.device_info()}
    return replicas, name, meta
