"""The ``arctic-jax`` command line: generate, embed, serve, bench.

Generated text goes to stdout; logs and progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from arctic_jax import embed_command, generate_command
from arctic_jax.bench import cli_commands as bench_command
from arctic_jax.serving import cli_commands as serve_command
from arctic_jax.training import cli_command as train_command
from arctic_jax.training import swiftkv_cli as distill_swiftkv_command

# Each command module registers its subcommand; none imports jax, FastAPI or uvicorn until it runs.
COMMANDS = (generate_command, embed_command, serve_command, bench_command, train_command,
            distill_swiftkv_command)


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, args.log_level.upper(), 30),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arctic-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_malloc_arena() -> None:
    """On glibc, one malloc arena for every thread (``M_ARENA_MAX`` = 1, as
    ``MALLOC_ARENA_MAX=1``): the threads that load programs, tokenize or serve would otherwise
    each grow an arena of their own, and memory freed in one is never reused by another (for
    the embedded model's ``generate``, 1.54 GiB peak instead of 1.34). Only on a machine without
    an NVIDIA GPU (where the host's memory is the model's, and no serving throughput was
    measured with one arena); nothing elsewhere, or when ``MALLOC_ARENA_MAX`` is set."""
    if (not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ
            or os.path.exists("/dev/nvidiactl")):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)   # M_ARENA_MAX
    except (OSError, AttributeError):   # not glibc
        pass


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if argv is None:   # a process of its own (the console script), not a library call
        _one_malloc_arena()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv   # as given (serve --replicas-per-gpu hands them to its replicas)
    _setup(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"arctic-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
