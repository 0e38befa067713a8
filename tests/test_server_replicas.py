"""``serve --replicas-per-gpu N``: N whole servers behind one port (SO_REUSEPORT), each naming
itself in ``X-Arctic-Replica``; the same input gets the same answer from either; SIGTERM to
the parent drains them all and exits 0; impossible flag combinations fail loudly."""
from __future__ import annotations

import os
import time

import httpx
import numpy as np
import pytest

from arctic_jax import cli
from arctic_jax.serving.cli_commands import ServerProcess
from arctic_jax.serving.server_replicas import REPLICA_HEADER, child_argv, child_env
from helpers import REPO_ROOT, server_env

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


def embed(url: str, text: str) -> tuple[str, np.ndarray]:
    """One request on a new connection: (the replica that answered, the vector)."""
    r = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": text}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER], np.asarray(r.json()["data"][0]["embedding"])


def test_two_replicas_share_the_port_and_answer_alike():
    proc = ServerProcess(ARGS, env=server_env(), cwd=REPO_ROOT)
    try:
        ready: set[str] = set()
        deadline = time.monotonic() + 300
        while ready != {"0", "1"}:   # each new connection may land on either replica
            assert proc.proc.poll() is None and time.monotonic() < deadline, proc.log_tail()
            try:
                r = httpx.get(proc.url + "/health", timeout=5)
                if r.status_code == 200:
                    ready.add(r.headers[REPLICA_HEADER])
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        by_replica: dict[str, list[np.ndarray]] = {"0": [], "1": []}
        for _ in range(40):
            replica, vector = embed(proc.url, "the same sentence, twice over")
            by_replica[replica].append(vector)
        assert all(by_replica.values()), {k: len(v) for k, v in by_replica.items()}
        np.testing.assert_allclose(by_replica["0"][0], by_replica["1"][0], atol=1e-6)
    finally:
        code = proc.stop(timeout=60)
    assert code == 0, proc.log_tail()
    assert proc.log_tail(20000).count("arctic-jax serve: ready") == 2


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
