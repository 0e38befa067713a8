"""Sentence embeddings from an encoder's last hidden state: pooling, Matryoshka truncation,
L2 normalisation (jnp, jit-friendly).

``PoolingConfig`` is what a checkpoint's sentence-transformers files declare
(``checkpoints.sentence_transformers.read_pooling_config``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from arctic_jax.encoder_batch import EncoderBatch

POOLING_MODES = ("cls", "mean", "last")
NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize (sentence-transformers' Normalize)


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """How to turn a sequence's hidden states into its embedding.

    - ``mode``: "cls" (the sequence's first token), "mean" (over its tokens) or "last".
    - ``normalize``: L2-normalise the embedding (after any Matryoshka truncation).
    - ``matryoshka_dimensions``: the dimensions the embedding may be truncated to (empty:
      no truncation allowed).
    - ``prompts``: named prefixes (e.g. ``{"query": "Represent this sentence ...: "}``);
      ``default_prompt_name`` the one applied when a request names none (None: no prompt).
    - ``max_seq_length``: the sentence-transformers truncation length, if declared.
    """

    mode: str = "cls"
    normalize: bool = True
    matryoshka_dimensions: tuple[int, ...] = ()
    prompts: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not one of {', '.join(POOLING_MODES)}")
        dims = self.matryoshka_dimensions
        if not isinstance(dims, tuple) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise ValueError(f"matryoshka_dimensions must be a tuple of positive integers, "
                             f"got {dims!r}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the "
                             f"prompts ({', '.join(self.prompts) or 'none'})")

    def resolve_dimensions(self, dimensions: int | None, hidden_size: int) -> int | None:
        """A request's ``dimensions`` checked against the model: None (full size) or the
        width to truncate to. ValueError unless the model declares that Matryoshka dimension;
        the full ``hidden_size`` is always allowed."""
        if dimensions is None or dimensions == hidden_size:
            return None
        if not self.matryoshka_dimensions:
            raise ValueError("this model does not support the dimensions parameter (it declares "
                             "no matryoshka_dimensions)")
        if dimensions not in self.matryoshka_dimensions:
            raise ValueError(f"dimensions {dimensions} is not supported; this model's "
                             f"Matryoshka dimensions: "
                             f"{', '.join(map(str, sorted(self.matryoshka_dimensions)))}")
        return dimensions


def pool(hidden: jax.Array, batch: EncoderBatch, mode: str) -> jax.Array:
    """hidden [T, H] -> one float32 vector per sequence slot [S, H]; empty slots give 0.

    Padding rows of ``hidden`` never reach a sequence's vector (even if they are NaN).
    """
    hidden = jnp.asarray(hidden)
    S = batch.num_seq_slots
    T = hidden.shape[0]
    starts, ends = batch.seq_start[:-1], batch.seq_start[1:]
    lengths = ends - starts
    present = (lengths > 0)[:, None]
    if mode == "cls":
        rows = hidden[jnp.clip(starts, 0, T - 1)].astype(jnp.float32)
    elif mode == "last":
        rows = hidden[jnp.clip(ends - 1, 0, T - 1)].astype(jnp.float32)
    elif mode == "mean":
        sums = jax.ops.segment_sum(hidden.astype(jnp.float32), batch.segment_ids,
                                   num_segments=S + 1)[:S]
        rows = sums / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
    else:
        raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
    return jnp.where(present, rows, 0.0)


def finalize(emb: jax.Array, dimensions: int | None, normalize: bool) -> jax.Array:
    """emb [S, H] -> [S, d] float32: truncated to the first ``dimensions`` (Matryoshka; None
    keeps all H), then L2-normalised when ``normalize``. An all-zero row stays 0."""
    emb = emb.astype(jnp.float32)
    if dimensions is not None:
        if not 1 <= dimensions <= emb.shape[-1]:
            raise ValueError(f"dimensions must be in 1..{emb.shape[-1]}, got {dimensions}")
        emb = emb[:, :dimensions]
    if normalize:
        norm = jnp.linalg.norm(emb, axis=-1, keepdims=True)
        emb = emb / jnp.maximum(norm, NORMALIZE_EPS)
    return emb
