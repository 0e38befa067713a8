"""The embedding engine: token-id sequences -> sentence embeddings, packed without padding
between sequences into device batches of a fixed token budget.

One device program per (token bucket, sequence bucket) runs the encoder, pools each sequence
(``PoolingConfig.mode``) and L2-normalises it when the model asks, returning [S, H] float32.
``warmup`` compiles every program ahead of time (ahead-of-time ``lower().compile()``, so a
shape that was not compiled can never be compiled later by accident). Matryoshka truncation
to a request's ``dimensions`` (then re-normalisation) runs on the host in numpy, so it needs
no program per width.

``embed_token_ids`` runs in the calling thread and overlaps host packing of batch n+1 with
the device computing batch n. ``arctic_jax.engine.embedding_front.AsyncEmbeddingEngine``
coalesces concurrent requests for a server.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.config import ConfigError
from arctic_jax.encoder_batch import EncoderBatch, build_encoder_batch
from arctic_jax.engine.compile_counter import CompileCounter
from arctic_jax.engine.embedding_config import EmbeddingEngineConfig
from arctic_jax.engine.embedding_metrics import EmbeddingMetrics
from arctic_jax.engine.embedding_scheduler import BatchShape, plan_all, plan_batch, program_shapes
from arctic_jax.engine.progress import compile_progress
from arctic_jax.models.pooling import NORMALIZE_EPS, PoolingConfig, finalize, pool

log = logging.getLogger(__name__)

def embed_program(weights: Any, batch: EncoderBatch, *, encode: Callable, cfg: Any,
                  attention_impl: str, mode: str, normalize: bool) -> jax.Array:
    """One device batch: encoder -> pooling -> (L2 normalisation); [S, H] float32 (rows of
    empty sequence slots are 0)."""
    hidden = encode(weights, batch, cfg=cfg, attention_impl=attention_impl)
    return finalize(pool(hidden, batch, mode), None, normalize)


def truncate_embeddings(rows: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka on the host: rows [N, H] -> [N, d] float32, the first ``dimensions`` columns
    re-normalised when ``normalize`` (``pooling.finalize`` in numpy; None returns ``rows``)."""
    if dimensions is None:
        return rows
    out = rows[:, :dimensions]
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), NORMALIZE_EPS)
    return np.ascontiguousarray(out, dtype=np.float32)


def has_fp8_matmuls(device: Any) -> bool:
    """Whether ``device`` multiplies FP8 matrices natively (NVIDIA compute capability 8.9+:
    Ada, Hopper and later)."""
    try:
        return device.platform == "gpu" and float(getattr(device, "compute_capability", 0)) >= 8.9
    except (TypeError, ValueError):
        return False


class EmbeddingEngine:
    """Embeds token-id sequences with an embedding model (``spec.task == "embed"``).

    Thread-safe: ``embed_token_ids`` may run in several threads at once (and beside an
    ``AsyncEmbeddingEngine`` on the same engine).
    """

    def __init__(self, loaded_model: Any, pooling: PoolingConfig,
                 config: EmbeddingEngineConfig | None = None, *,
                 leading_special_ids: frozenset[int] = frozenset()):
        """``loaded_model``: a ``checkpoints.LoadedModel`` of an embedding model;
        ``pooling``: how its hidden states become embeddings
        (``checkpoints.sentence_transformers.read_pooling_config``);
        ``leading_special_ids``: token ids the tokenizer puts first ([CLS]), kept in front when
        ``truncate_prompt_tokens`` cuts a token-id input (a CLS-pooled model needs it)."""
        self.leading_special_ids = frozenset(leading_special_ids)
        spec = loaded_model.spec
        task = getattr(spec, "task", "generate")
        if task != "embed":
            raise ConfigError(f"model {loaded_model.name!r} (architecture {spec.name!r}) is a "
                              f"{task!r} model, not an embedding model; load an encoder such as "
                              f"all-MiniLM-L6-v2")
        self.config = config = config or EmbeddingEngineConfig()
        self.name = loaded_model.name
        self.spec = spec
        self.cfg = loaded_model.config
        self.pooling = pooling
        self.limits = config.resolve(self.cfg.max_position_embeddings,
                                     max_seq_length=pooling.max_seq_length,
                                     head_dim=self.cfg.head_dim)
        weights = loaded_model.weights
        if config.dtype is not None:
            dtype = jnp.dtype(config.dtype)
            weights = jax.tree_util.tree_map(lambda w: w.astype(dtype), weights)
        self.dtype = jax.tree_util.tree_leaves(weights)[0].dtype
        if config.quantization is not None:
            if spec.quantize is None:
                raise ConfigError(f"model {loaded_model.name!r} (architecture {spec.name!r}) has no "
                                  f"{config.quantization} quantization")
            weights = spec.quantize(weights, config.quantization)
            device = jax.devices()[0]
            if not has_fp8_matmuls(device):
                log.warning("%s has no FP8 matrix units: the fp8 matmuls run in a wider type, with "
                            "FP8's rounding and no speed gain", device.device_kind)
        self.weights = weights
        self.metrics = EmbeddingMetrics()
        self.shapes = program_shapes(self.limits.token_buckets, self.limits.seq_buckets,
                                     self.limits.max_num_seqs)
        self._jitted = jax.jit(functools.partial(
            embed_program, encode=spec.step, cfg=self.cfg,
            attention_impl=self.limits.attention_impl, mode=pooling.mode,
            normalize=pooling.normalize))
        self._programs: dict[tuple[int, int], Any] = {}
        self._compile_lock = threading.Lock()
        self.warmed_up = False
        self.compile_counter: CompileCounter | None = None  # started by warmup
        lim = self.limits
        log.info("embedding engine %s: max_model_len %d, %d-token batches of at most %d sequences, "
                 "%d programs (token buckets %s, sequence buckets %s), %s attention, %s%s",
                 self.name, lim.max_model_len, lim.max_num_batched_tokens, lim.max_num_seqs,
                 len(self.shapes), lim.token_buckets, lim.seq_buckets, lim.attention_impl,
                 self.dtype, f", {config.quantization} matmuls" if config.quantization else "")

    # ------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def compiles_after_warmup(self) -> int:
        """XLA compilations seen in this process (by any thread) since ``warmup`` finished; 0
        while only this engine serves."""
        return self.compile_counter.count if self.compile_counter is not None else 0

    def close(self) -> None:
        """Stop counting compilations (unregisters the listener)."""
        if self.compile_counter is not None:
            self.compile_counter.close()

    # -------------------------------------------------------------- programs
    def program(self, shape: BatchShape) -> Any:
        """The compiled program of one batch shape (``plan``'s); benchmarks time it directly."""
        return self._program(shape.token_bucket, shape.seq_bucket)

    def _program(self, token_bucket: int, seq_bucket: int) -> Any:
        """The compiled program of one shape (compiled now if ``warmup`` has not run)."""
        key = (token_bucket, seq_bucket)
        program = self._programs.get(key)
        if program is not None:
            return program
        with self._compile_lock:
            if key not in self._programs:
                if self.warmed_up:  # cannot happen: warmup compiles every shape plan_batch picks
                    raise RuntimeError(f"no program for batch shape {key} after warmup")
                example = EncoderBatch(
                    token_ids=jax.ShapeDtypeStruct((token_bucket,), jnp.int32),
                    token_types=jax.ShapeDtypeStruct((token_bucket,), jnp.int32),
                    positions=jax.ShapeDtypeStruct((token_bucket,), jnp.int32),
                    segment_ids=jax.ShapeDtypeStruct((token_bucket,), jnp.int32),
                    seq_start=jax.ShapeDtypeStruct((seq_bucket + 1,), jnp.int32))
                self._programs[key] = self._jitted.lower(self.weights, example).compile()
            return self._programs[key]

    def warmup(self, progress: bool = False, run: bool | None = None) -> float:
        """Compile every program (``self.shapes``); returns the seconds taken. ``run`` (default:
        on an accelerator) also runs each once on a dummy batch, paying its one-time set-up
        costs before serving; on a CPU a dummy batch would cost as much as a real one.
        Afterwards ``compiles_after_warmup`` counts any compilation (there should be none)."""
        start = time.perf_counter()
        run = jax.default_backend() != "cpu" if run is None else run
        for t, s in compile_progress(self.shapes, "compiling embedding programs", progress):
            program = self._program(t, s)   # compiled here
            if run:
                seqs = [np.ones(1, np.int32)] * min(s, t)
                jax.block_until_ready(program(self.weights, build_encoder_batch(seqs, t, s)))
        self.warmed_up = True
        if self.compile_counter is None:
            self.compile_counter = CompileCounter()
        self.compile_counter.count = 0
        seconds = time.perf_counter() - start
        log.info("embedding engine warm-up: %d programs in %.1f s", len(self.shapes), seconds)
        return seconds

    # ------------------------------------------------------------ validation
    def check_dimensions(self, dimensions: int | None) -> int | None:
        """A request's ``dimensions``: None (all ``hidden_size``) or the Matryoshka width.
        ValueError unless the model declares it (vLLM's rule; the full size always works)."""
        if dimensions is None:
            return None
        if isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer)):
            raise ValueError(f"dimensions must be an integer, got {dimensions!r}")
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        return self.pooling.resolve_dimensions(int(dimensions), self.hidden_size)

    def check_truncation(self, truncate_prompt_tokens: int | None) -> int | None:
        """vLLM's ``truncate_prompt_tokens``: None (no truncation), -1 (``max_model_len``) or k
        in 1..max_model_len; returns the number of tokens to keep (or None)."""
        if truncate_prompt_tokens is None:
            return None
        k = truncate_prompt_tokens
        L = self.limits.max_model_len
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"truncate_prompt_tokens must be an integer, got {k!r}")
        if k == -1:
            return L
        if not 1 <= k <= L:
            raise ValueError(f"truncate_prompt_tokens must be -1 or in 1..{L} (max_model_len), "
                             f"got {k}")
        return int(k)

    def prepare(self, token_ids: Sequence[Sequence[int]], truncate_prompt_tokens: int | None = None,
                *, first_index: int = 0) -> list[np.ndarray]:
        """Validated int32 copies of ``token_ids`` (a non-empty list of non-empty token-id
        lists). ``truncate_prompt_tokens`` keeps each sequence's last k tokens (vLLM's left
        truncation), except that a leading [CLS] (``leading_special_ids``) stays first.
        ValueError naming the first bad input (by its index + ``first_index``):
        empty, non-integer, an id outside [0, vocab_size), or longer than ``max_model_len``
        without truncation."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise ValueError(f"token_ids must be a list of token-id lists, got "
                             f"{type(token_ids).__name__}")
        if len(token_ids) == 0:
            raise ValueError("no inputs: the list of sequences is empty")
        keep = self.check_truncation(truncate_prompt_tokens)
        L, V = self.limits.max_model_len, self.vocab_size
        out = []
        for i, seq in enumerate(token_ids, start=first_index):
            if isinstance(seq, (str, bytes)):
                raise ValueError(f"input {i} must be a list of integer token ids, got a string")
            arr = np.asarray(seq)
            if arr.ndim != 1:
                raise ValueError(f"input {i} must be a flat list of integer token ids")
            if arr.size == 0:
                raise ValueError(f"input {i} is empty (an embedding needs at least one token)")
            if not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"input {i} must hold integer token ids, got {arr.dtype}")
            if keep is not None and arr.size > keep:
                head = 1 if int(arr[0]) in self.leading_special_ids and keep > 1 else 0
                arr = np.concatenate([arr[:head], arr[arr.size - (keep - head):]])
            if arr.size > L:
                raise ValueError(f"input {i} has {arr.size} tokens, more than max_model_len {L}; "
                                 f"shorten it or pass truncate_prompt_tokens")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"input {i} has token id {lo if lo < 0 else hi} outside "
                                 f"[0, {V}) (the model's vocabulary)")
            out.append(arr.astype(np.int32))
        return out

    # ------------------------------------------------------------ execution
    def plan(self, lengths: Sequence[int]) -> list[BatchShape]:
        """The device batches for sequences of ``lengths`` (in order)."""
        lim = self.limits
        return plan_all(lengths, lim.token_buckets, lim.seq_buckets, lim.max_num_seqs)

    def plan_next(self, lengths: Sequence[int]) -> BatchShape:
        """The next device batch for the queue head ``lengths``."""
        lim = self.limits
        return plan_batch(lengths, lim.token_buckets, lim.seq_buckets, lim.max_num_seqs)

    def dispatch(self, seqs: Sequence[np.ndarray], shape: BatchShape) -> jax.Array:
        """Pack ``seqs`` (validated, as ``shape`` planned them) and launch their program
        without waiting; returns the device result [S, H] (rows past len(seqs) unused)."""
        batch = build_encoder_batch(seqs, shape.token_bucket, shape.seq_bucket)
        out = self._program(shape.token_bucket, shape.seq_bucket)(self.weights, batch)
        self.metrics.on_batch(shape.num_tokens, shape.token_bucket, shape.num_seqs)
        return out

    @staticmethod
    def collect(out: jax.Array, num_seqs: int) -> np.ndarray:
        """Wait for a dispatched batch; its first ``num_seqs`` rows [num_seqs, H] float32."""
        return np.asarray(out)[:num_seqs]

    def run(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings [N, H] float32 of validated sequences (pooled, normalised if the model
        asks), batch n+1 packed and launched before batch n is read back."""
        rows = np.empty((len(seqs), self.hidden_size), np.float32)
        inflight: tuple[int, BatchShape, jax.Array] | None = None
        start = 0
        for shape in self.plan([len(s) for s in seqs]):
            out = self.dispatch(seqs[start:start + shape.num_seqs], shape)
            if inflight is not None:
                s0, sh, o = inflight
                rows[s0:s0 + sh.num_seqs] = self.collect(o, sh.num_seqs)
            inflight = (start, shape, out)
            start += shape.num_seqs
        if inflight is not None:
            s0, sh, o = inflight
            rows[s0:s0 + sh.num_seqs] = self.collect(o, sh.num_seqs)
        return rows

    def finish(self, rows: np.ndarray, dimensions: int | None) -> np.ndarray:
        """Rows [N, H] from ``run`` -> the output [N, d] for ``dimensions`` (checked)."""
        return truncate_embeddings(rows, dimensions, self.pooling.normalize)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]], dimensions: int | None = None,
                        *, truncate_prompt_tokens: int | None = None) -> np.ndarray:
        """Embeddings [N, d] float32 of N token-id sequences, in input order.

        ``dimensions``: a Matryoshka width the model declares (None: ``hidden_size``).
        ``truncate_prompt_tokens`` (vLLM's semantics): keep each sequence's *last* k tokens
        (left truncation); -1 keeps the last ``max_model_len``; None (default) rejects a
        sequence longer than ``max_model_len`` with a ValueError naming its index and length.
        """
        dims = self.check_dimensions(dimensions)
        seqs = self.prepare(token_ids, truncate_prompt_tokens)
        self.metrics.on_sequences(len(seqs), sum(len(s) for s in seqs))
        return self.finish(self.run(seqs), dims)
