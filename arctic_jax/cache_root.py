"""Where arctic-jax keeps what it builds once and reuses: ``$ARCTIC_JAX_CACHE``, else
``~/.cache/arctic-jax``. Each cache has its own folder below it: ``converted/`` (weights),
``tokenizer/`` (tokenizers read from GGUF files) and ``xla/`` (compiled programs)."""
from __future__ import annotations

import os

ENV_VAR = "ARCTIC_JAX_CACHE"


def cache_root() -> str:
    """``$ARCTIC_JAX_CACHE``, else ``~/.cache/arctic-jax``."""
    return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "arctic-jax")


def cache_dir(name: str) -> str:
    """The folder of one cache (``"converted"``, ``"tokenizer"`` or ``"xla"``)."""
    return os.path.join(cache_root(), name)
