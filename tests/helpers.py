"""Small helpers shared by test modules."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ModelConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import make_step_fn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny random Llama of the engine tests (a program compiles in well under a second).
TINY_ENGINE_CFG = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=12,
                              max_position_embeddings=256, eos_token_ids=())


class CharTokenizer:
    """Test tokenizer: token i decodes to one printable character."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(33 + int(i) % 90) for i in ids)


def running_server(args: list[str]):
    """A live ``arctic-jax serve`` with ``args`` (the test environment, one device), ready;
    stopped when the generator is closed (yield it from a module fixture)."""
    from arctic_jax.serving.cli_commands import ServerProcess

    proc = ServerProcess(args, env=server_env(), cwd=REPO_ROOT)
    try:
        proc.wait_ready(timeout=300)
        yield proc
    finally:
        proc.stop()


def tiny_server_args(model: str, *extra: str) -> list[str]:
    """``serve`` flags of the embedded SmolLM2 with small limits (few programs to compile),
    served as ``model``, with the tests' shared compilation cache, then ``extra``."""
    import tempfile

    return ["--model", "default", "--served-model-name", model,
            "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
            "--max-model-len", "256", "--page-size", "16",
            "--token-buckets", "8,64", "--page-buckets", "16",
            "--compilation-cache-dir",
            os.path.join(tempfile.gettempdir(), f"arctic-jax-test-xla-{os.getuid()}"), *extra]


def prefill_logits(cfg, weights, tokens: np.ndarray, page_size: int = 16) -> np.ndarray:
    """Float32 logits at every position of one single-sequence prefill step of ``tokens``."""
    n = len(tokens)
    pages = -(-n // page_size)
    buckets = Buckets.for_limits(max_tokens=n, max_seqs=1, max_pages_per_seq=pages)
    chunk = SequenceChunk(tokens=[int(t) for t in tokens], start=0, pages=list(range(pages)),
                          logits_at=list(range(n)))
    batch, rows = build_step_batch([chunk], page_size, buckets)
    cache = KVCache.allocate(cfg, num_pages=pages, page_size=page_size, dtype=jnp.float32)
    logits, _ = make_step_fn(cfg)(weights, cache, batch)
    return np.asarray(logits)[:rows]


def deal_pages(rng: np.random.Generator, counts: list[int], num_pages: int) -> list[list[int]]:
    """Shuffled page ids of a pool of ``num_pages`` dealt round-robin, ``counts[i]`` to
    sequence i, so the sequences' pages interleave in the cache."""
    pool = list(rng.permutation(num_pages))
    pages: list[list[int]] = [[] for _ in counts]
    while any(len(p) < c for p, c in zip(pages, counts, strict=True)):
        for p, c in zip(pages, counts, strict=True):
            if len(p) < c:
                p.append(int(pool.pop()))
    return pages


def server_env(devices: int = 1) -> dict[str, str]:
    """The test environment with ``devices`` simulated CPU devices instead of conftest's 8
    (a server uses one, or one per data-parallel replica)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def record_verified_triton_modules(monkeypatch) -> list | None:
    """Patch the Pallas Triton lowering so every module it builds is MLIR-verified and appended
    to the returned list; None where this jax has no Triton lowering module."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError:
        return None
    verified: list = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def checked(*args, **kwargs):
        res = orig(*args, **kwargs)
        with res.module.context:
            assert res.module.operation.verify()
        verified.append(res)
        return res

    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", checked)
    return verified


def cosine(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two [..., d] arrays, computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
