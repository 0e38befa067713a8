"""The ``arctic-jax generate`` subcommand: one prompt, its text streamed to stdout."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from arctic_jax.cli_args import add_model_args, engine_kwargs, parse_dtype


def register(sub: Any) -> None:
    """Add ``generate`` to the subparsers ``sub``."""
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from arctic_jax.llm import LLM
    from arctic_jax.sampling import SamplingParams
    from arctic_jax.tokenizer import encode_chat, encode_prompt

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed)
    # one prompt: one sequence slot unless asked (keeps the KV cache small on a CPU)
    kwargs = {"max_num_seqs": 1, **engine_kwargs(args)}
    llm = LLM(args.model, dtype=parse_dtype(args.dtype),
              compilation_cache_dir=args.compilation_cache_dir, **kwargs)
    if args.chat:
        ids = encode_chat(llm.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        ids = encode_prompt(llm.tokenizer, args.prompt)
    for piece in llm.stream(ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    log = logging.getLogger("arctic_jax")
    log.info("finish reason: %s", llm.last_finish_reason)
    llm.compilation_cache.stop()
    log.info("%s", llm.compilation_cache.summary())
    return 0
