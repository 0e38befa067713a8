"""The offline embedding API: ``Embedder(model=...).embed(texts) -> np.ndarray [N, d]``."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from arctic_jax.engine.compilation_cache import AUTO, configure_compilation_cache
from arctic_jax.engine.embedding_config import EmbeddingEngineConfig
from arctic_jax.engine.embedding_engine import EmbeddingEngine
from arctic_jax.engine.embedding_tokenizer import EmbeddingTokenizer
from checkpoints.loader import DEFAULT_EMBEDDING_MODEL, load_tokenizer


def engine_config(**kwargs: Any) -> EmbeddingEngineConfig:
    """An ``EmbeddingEngineConfig`` from keyword arguments (lists become tuples); TypeError
    naming any unknown option."""
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(EmbeddingEngineConfig)}
    if unknown:
        raise TypeError(f"unknown embedding engine options: {', '.join(sorted(unknown))}")
    return EmbeddingEngineConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in kwargs.items()})


class Embedder:
    """Loads an embedding model and embeds texts.

    ``model``: an HF encoder checkpoint directory (with its sentence-transformers files), or
    ``"all-MiniLM-L6-v2"`` (the default, embedded). ``dtype``: the weights' dtype (default
    bfloat16 on a GPU, float32 elsewhere). Engine options (``max_model_len``,
    ``max_num_batched_tokens``, ``token_buckets``, ``max_num_seqs``, ``seq_buckets``,
    ``attention_impl``, ``quantization``) are keyword arguments, see ``EmbeddingEngineConfig``.
    Programs compile on first use of each batch shape, or all at once with ``warmup=True``.
    ``compilation_cache_dir``: the persistent compilation cache, as ``LLM``'s ("auto", "none"
    or a directory); ``compilation_cache`` counts the programs it loaded and those compiled.
    """

    def __init__(self, model: str | None = DEFAULT_EMBEDDING_MODEL, *, dtype: Any = None,
                 cache_dir: str | None = None, warmup: bool = False,
                 compilation_cache_dir: str | None = AUTO, **engine_kwargs: Any):
        import checkpoints
        from checkpoints.sentence_transformers import read_pooling_config

        config = engine_config(**engine_kwargs)
        self.compilation_cache = configure_compilation_cache(compilation_cache_dir)
        loaded = checkpoints.load_model(model if model is not None else DEFAULT_EMBEDDING_MODEL,
                                        dtype=dtype, cache_dir=cache_dir)
        self.model_name = loaded.name
        src = loaded.tokenizer_source
        self.pooling = read_pooling_config(src.path)
        self.tokenizer = EmbeddingTokenizer(load_tokenizer(src.path, src.gguf_file), self.pooling)
        self.engine = EmbeddingEngine(loaded, self.pooling, config,
                                      leading_special_ids=self.tokenizer.leading_special_ids)
        if warmup:
            self.engine.warmup()

    @property
    def dimension(self) -> int:
        """The full embedding width (the model's hidden size)."""
        return self.engine.hidden_size

    @property
    def max_model_len(self) -> int:
        return self.engine.limits.max_model_len

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None,
                 truncate_prompt_tokens: int | None = None) -> list[list[int]]:
        """The token ids ``embed`` would embed for ``texts`` (see ``embed``)."""
        keep = self.engine.check_truncation(truncate_prompt_tokens)
        return self.tokenizer.encode(texts, prompt_name=prompt_name, keep=keep)

    def embed(self, texts: str | Sequence[str], *, prompt_name: str | None = None,
              dimensions: int | None = None, batch_size: int | None = None,
              truncate_prompt_tokens: int | None = None) -> np.ndarray:
        """Embeddings [N, d] float32 of N texts (a single string counts as N = 1).

        - ``prompt_name``: prepend that prompt of the model (``pooling.prompts``); None uses
          the model's ``default_prompt_name`` if it declares one (as sentence-transformers).
        - ``dimensions``: a Matryoshka width the model declares; the embeddings are truncated to
          it, then re-normalised if the model normalises (None: ``dimension``).
        - ``batch_size``: texts tokenized and embedded per chunk (bounds host memory for long
          lists; device batches are set by the engine's token budget). None: all at once.
        - ``truncate_prompt_tokens``: keep each text's last k tokens, special tokens included
          (vLLM's left truncation; -1: ``max_model_len``). None: a text longer than
          ``max_model_len`` tokens is a ValueError naming it.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise ValueError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        dims = self.engine.check_dimensions(dimensions)
        keep = self.engine.check_truncation(truncate_prompt_tokens)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(texts) == 0:
            raise ValueError("no inputs: the list of texts is empty")
        self.tokenizer.prompt(prompt_name)  # an unknown prompt fails before any work
        step = batch_size or len(texts)
        parts = []
        for first in range(0, len(texts), step):
            ids = self.tokenizer.encode(texts[first:first + step], prompt_name=prompt_name,
                                        keep=keep, first_index=first)
            seqs = self.engine.prepare(ids, first_index=first)
            self.engine.metrics.on_sequences(len(seqs), sum(len(s) for s in seqs))
            parts.append(self.engine.finish(self.engine.run(seqs), dims))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]], *, dimensions: int | None = None,
                        truncate_prompt_tokens: int | None = None) -> np.ndarray:
        """Embeddings [N, d] float32 of N token-id sequences (special tokens as the caller gave
        them); see ``EmbeddingEngine.embed_token_ids``."""
        return self.engine.embed_token_ids(token_ids, dimensions,
                                           truncate_prompt_tokens=truncate_prompt_tokens)
