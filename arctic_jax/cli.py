"""The ``arctic-jax`` command line: generate, serve, bench.

Generated text goes to stdout; logs and progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="HF checkpoint dir, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None)
    p.add_argument("--attention-impl", default=None,
                   help="reference, pallas (GPU default) or pallas-triton (Triton prefill kernel)")
    p.add_argument("--token-buckets", type=int_list, default=None,
                   help="comma-separated step token counts to compile (default: powers of 2)")
    p.add_argument("--page-buckets", type=int_list, default=None,
                   help="comma-separated page-table widths to compile (default: powers of 2)")
    p.add_argument("--contiguous-prefill-min-tokens", type=int, default=None,
                   help="steps that are one prompt's first chunk of at least this many (padded) "
                        "tokens run cuDNN causal attention on their own K/V; 0: never "
                        "(default: 1024 on a GPU with Pallas attention, else 0)")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="KV cache element type: auto (the model's dtype, default) or fp8 "
                        "(float8_e4m3fn, saturating: half the cache bytes of a 16-bit model)")
    p.add_argument("--max-logprobs", type=int, default=None,
                   help="most top logprobs a request may ask for (default 5, at most 20)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--sequence-parallel-size", "-sp", type=int, default=1,
                   help="Ulysses sequence parallelism; SP x TP devices in all")
    p.add_argument("--enable-shift-parallel", action="store_true",
                   help="TP for small steps, SP for large ones, over one KV cache")
    p.add_argument("--shift-parallel-threshold", default="512",
                   help="tokens per step at or below which TP is used, or 'auto' to calibrate")
    p.add_argument("--parallel-mode", choices=["tp", "sp", "shift"], default=None,
                   help="shortcut for the parallel flags above")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="persistent XLA compilation cache directory")
    p.add_argument("--log-level", default="WARNING")


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the shared model/engine flags."""
    names = ["max_model_len", "max_num_seqs", "max_num_batched_tokens", "page_size", "num_pages",
             "kv_cache_memory_fraction", "attention_impl", "tensor_parallel_size",
             "sequence_parallel_size", "shift_parallel_threshold", "parallel_mode",
             "token_buckets", "page_buckets", "max_logprobs", "contiguous_prefill_min_tokens",
             "kv_cache_dtype"]
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "enable_shift_parallel", False):
        kwargs["enable_shift_parallel"] = True
    return kwargs


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper(), 30),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.compilation_cache_dir:
        import jax
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def parse_dtype(name: str | None):
    if name is None:
        return None
    import jax.numpy as jnp
    return jnp.dtype(name)


def cmd_generate(args: argparse.Namespace) -> int:
    from arctic_jax.llm import LLM
    from arctic_jax.sampling import SamplingParams
    from arctic_jax.tokenizer import encode_chat, encode_prompt

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed)
    llm = LLM(args.model, dtype=parse_dtype(args.dtype), **engine_kwargs(args))
    if args.chat:
        ids = encode_chat(llm.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        ids = encode_prompt(llm.tokenizer, args.prompt)
    for piece in llm.stream(ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    logging.getLogger("arctic_jax").info("finish reason: %s", llm.last_finish_reason)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arctic-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    for register in _extra_commands():
        register(sub, _add_model_args)
    return parser


def _extra_commands() -> list:
    """``serve`` and ``bench`` live beside their code; each module has ``register(sub, add_model_args)``."""
    import importlib

    found = []
    for module in ("arctic_jax.serving.cli_commands", "arctic_jax.bench.cli_commands"):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as e:  # optional extras may be missing (no FastAPI on a GPU host)
            if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic", "httpx"):
                raise
            logging.getLogger("arctic_jax").warning("%s unavailable: %s is not installed",
                                                    module, e.name)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"arctic-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
