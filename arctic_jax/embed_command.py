"""The ``arctic-jax embed`` subcommand: the lines of a text file -> embeddings in a .npy file."""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from arctic_jax.cli_args import add_embedding_engine_args, embedding_engine_kwargs, parse_dtype


def register(sub: Any) -> None:
    """Add ``embed`` to the subparsers ``sub``."""
    e = sub.add_parser("embed", help="embed each line of a text file; writes a .npy array [N, d]")
    add_embedding_engine_args(e)
    e.add_argument("--input", required=True,
                   help="UTF-8 text file, one text per line (no empty lines)")
    e.add_argument("--output", required=True, help="the .npy file to write (float32 [lines, d])")
    e.add_argument("--prompt-name", default=None,
                   help="prepend this prompt of the model (config_sentence_transformers.json) to "
                        "every text (default: the model's default prompt, if any)")
    e.add_argument("--dimensions", type=int, default=None,
                   help="Matryoshka width to truncate to (only one the model declares)")
    e.add_argument("--truncate-prompt-tokens", type=int, default=None,
                   help="keep each text's last N tokens (-1: --max-model-len); default: a longer "
                        "text is an error")
    e.set_defaults(func=cmd_embed)


def read_lines(path: str) -> list[str]:
    """One text per line of a UTF-8 file (\\n or \\r\\n endings); ValueError for an empty
    file or an empty line (named by its number)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines:
        raise ValueError(f"{path} holds no lines")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}: line {n} is empty")
    return lines


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from arctic_jax.embedder import Embedder

    texts = read_lines(args.input)
    embedder = Embedder(args.model, dtype=parse_dtype(args.dtype),
                        compilation_cache_dir=args.compilation_cache_dir,
                        **embedding_engine_kwargs(args))
    start = time.perf_counter()
    ids = embedder.tokenize(texts, prompt_name=args.prompt_name,
                            truncate_prompt_tokens=args.truncate_prompt_tokens)
    embeddings = embedder.embed_token_ids(ids, dimensions=args.dimensions)
    seconds = time.perf_counter() - start
    output = args.output if args.output.endswith(".npy") else args.output + ".npy"
    np.save(output, embeddings)
    embedder.compilation_cache.stop()
    logging.getLogger("arctic_jax").info("%s", embedder.compilation_cache.summary())
    tokens = sum(len(s) for s in ids)
    print(f"{len(texts)} texts, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:,.0f} tokens/s "
          f"(tokenization, compilation and device) -> {output} "
          f"{list(embeddings.shape)} float32", flush=True)
    return 0
