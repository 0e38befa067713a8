"""The ``arctic-jax`` parser: static command modules, no import circle, and no FastAPI needed.

Each check runs in a fresh interpreter so that modules imported by other tests do not hide
an import (or a missing one).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("fastapi", "uvicorn", "starlette", "httpx", "pydantic")


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)


def test_parser_builds_without_the_http_stack():
    """Where FastAPI and uvicorn are missing, every subcommand still parses; ``serve`` fails
    only when run, naming the missing module."""
    code = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None            # any import of it raises ImportError
from arctic_jax import cli
parser = cli.build_parser()
sub = next(a for a in parser._actions if a.dest == "command")
assert list(sub.choices) == ["generate", "embed", "serve", "bench", "train-speculator",
                             "distill-swiftkv"], list(sub.choices)
args = parser.parse_args(["generate", "--prompt", "hi", "--token-buckets", "8,16"])
assert args.func.__name__ == "cmd_generate" and args.token_buckets == (8, 16)
args = parser.parse_args(["bench", "--random-weights", "tiny", "--concurrency", "1,4"])
assert args.func.__name__ == "cmd_bench" and args.concurrency == [1, 4]
args = parser.parse_args(["serve", "--port", "0", "-dp", "2"])
assert args.func.__name__ == "cmd_serve" and args.data_parallel_size == 2
assert all(sys.modules[name] is None for name in {BLOCKED!r})
rc = cli.main(["serve", "--port", "0"])
assert rc == 2, rc
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "arctic-jax: error:" in done.stderr and "uvicorn" in done.stderr, done.stderr


def _imported_modules(path: str) -> set[str]:
    """Every module an ``import`` statement in ``path`` names, at any depth (functions too)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_cli_imports_its_commands_statically_and_they_do_not_import_it_back():
    commands = ["arctic_jax/generate_command.py", "arctic_jax/serving/cli_commands.py",
                "arctic_jax/bench/cli_commands.py", "arctic_jax/training/cli_command.py"]
    for path in commands:
        assert "arctic_jax.cli" not in _imported_modules(os.path.join(REPO_ROOT, path)), path
    cli_imports = _imported_modules(os.path.join(REPO_ROOT, "arctic_jax/cli.py"))
    assert "importlib" not in cli_imports
    assert {"arctic_jax.generate_command", "arctic_jax.serving.cli_commands",
            "arctic_jax.bench.cli_commands"} <= cli_imports
