"""arctic-jax: fast LLM inference on JAX and Pallas.

``LLM``, ``CompletionOutput``, ``SamplingParams`` and ``Embedder`` are exported lazily, so importing a
low-layer module (``arctic_jax.config``, the kernels' callers) does not load the engine.
"""
from __future__ import annotations

from typing import Any

__all__ = ["LLM", "CompletionOutput", "SamplingParams", "Embedder"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "CompletionOutput"):
        from arctic_jax import llm
        return getattr(llm, name)
    if name == "Embedder":
        from arctic_jax.embedder import Embedder
        return Embedder
    if name == "SamplingParams":
        from arctic_jax.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'arctic_jax' has no attribute {name!r}")
