"""``serve --replicas-per-gpu N``: N whole servers behind one port (SO_REUSEPORT), each naming
itself in ``X-Arctic-Replica``; the same input gets the same answer from either; SIGTERM to
the parent drains them all and exits 0 (``examples/embedding_replicas.ipynb`` runs the README's
command and checks each step); impossible flag combinations fail loudly."""
from __future__ import annotations

import os
import re

import pytest

from arctic_jax import cli
from arctic_jax.serving.server_replicas import child_argv, child_env
from helpers import REPO_ROOT, server_env
from notebooks import run_notebook

MODEL = "minilm-replicas"


def readme_replicas_command() -> list[str]:
    """The README's ``serve ... --replicas-per-gpu`` command's flags, without its port."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        lines = [ln.split() for ln in f if ln.startswith("arctic-jax serve")
                 and "--replicas-per-gpu" in ln]
    assert len(lines) == 1, lines
    argv = lines[0][2:]
    i = argv.index("--port")
    return argv[:i] + argv[i + 2:]


# the README's command, with small limits (few programs to compile) and a name for the model
ARGS = [*readme_replicas_command(), "--served-model-name", MODEL, "--max-model-len", "128",
        "--max-num-batched-tokens", "128", "--token-buckets", "128", "--max-num-seqs", "8",
        "--seq-buckets", "8"]


def notebook_command() -> list[str]:
    """The flags of the ``serve`` command in ``examples/embedding_replicas.ipynb``."""
    import nbformat

    nb = nbformat.read(os.path.join(REPO_ROOT, "examples", "embedding_replicas.ipynb"), as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code" and '"serve"' in c.source)
    start = source.index('"serve"')
    return re.findall(r'"([^"]+)"', source[start:source.index("]", start)])[1:]


def test_the_notebook_runs_the_readme_command():
    """The notebook's server is the README's command (its port aside) with the small limits above."""
    flags = notebook_command()
    i = flags.index("--port")
    assert flags[:i] + flags[i + 1:] == [a for a in ARGS if a not in ("--served-model-name", MODEL)]


def test_two_replicas_share_the_port_and_answer_alike(monkeypatch):
    """The notebook (it asserts every step): both replicas answer on one port, with the same
    vector for the same input; SIGTERM to the parent drains them and exits 0."""
    monkeypatch.setenv("XLA_FLAGS", server_env()["XLA_FLAGS"])   # one CPU device per server
    out = run_notebook("embedding_replicas.ipynb")
    assert "replicas ready: ['0', '1']" in out
    assert "replicas notebook: two replicas behind one port answered alike and stopped cleanly" in out


def test_replica_arguments_and_memory_share(monkeypatch):
    assert child_argv(["--model", "m", "--replicas-per-gpu", "3", "--port", "9"]) == [
        "--model", "m", "--port", "9"]
    assert child_argv(["--replicas-per-gpu=3", "--model", "m"]) == ["--model", "m"]
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    env = child_env(1, 4)
    assert env["ARCTIC_JAX_REPLICA"] == "1"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.75 / 4, abs=1e-4)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert float(child_env(0, 2)["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.25)


@pytest.mark.parametrize("extra,message", [
    (["--port", "0"], "needs a fixed --port"),
    (["-dp", "2"], "cannot be combined"),
])
def test_impossible_replica_flags_fail_loudly(capsys, extra, message):
    assert cli.main(["serve", *ARGS, *extra]) == 2
    assert message in capsys.readouterr().err
    assert "ARCTIC_JAX_REPLICA" not in os.environ
