"""Embedding benchmark drivers: build the encoder, then time a workload three ways.

- ``run_forward`` ("model forward"): the engine's compiled program on the workload's full
  device batches (those at the largest token bucket), packed and placed on the device first,
  launched back to back, the pooled embeddings copied to the host; nothing else is timed.
- ``run_in_process`` ("end to end in-process"): requests of ``batch_size`` inputs through an
  ``AsyncEmbeddingEngine``, ``concurrency`` in flight (closed loop); texts are tokenized in
  the request (the tokenizer's worker threads), so tokenization counts.
- ``run_http`` ("end to end HTTP"): the official ``openai`` ``AsyncOpenAI`` client's
  ``embeddings.create`` (base64, its default) against a running server, ``concurrency`` in
  flight, optionally from several client processes; tokens from the responses' ``usage``.

Times are ``time.monotonic()`` seconds (CLOCK_MONOTONIC, comparable across processes).
Nothing here imports jax or openai until a driver runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from arctic_jax.bench.embed_workload import EmbedWorkload

log = logging.getLogger(__name__)

# Random-weight encoder shapes: BertConfig fields.
RANDOM_ENCODER_SHAPES: dict[str, dict[str, Any]] = {
    # snowflake-arctic-embed-m (v1.5) / BERT-base uncased.
    "bert-base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                      hidden_act="gelu"),
    # A tiny encoder for smoke tests of the harness (not a speed measurement).
    "tiny": dict(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                 max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu"),
}


# ------------------------------------------------------------------- models
def build_random_encoder(shape: str, config: Any, *, dtype: Any = None,
                         seed: int = 0) -> tuple[Any, str]:
    """An ``EmbeddingEngine`` over random weights of a named shape, pooled as arctic-embed is
    (CLS, L2-normalised). dtype None: bfloat16 on a GPU, float32 elsewhere.

    Returns (engine, model description).
    """
    import jax

    from arctic_jax.engine.embedding_engine import EmbeddingEngine
    from arctic_jax.models.pooling import PoolingConfig
    from arctic_jax.models.registry import spec_by_name
    from checkpoints.loader import LoadedModel, default_dtype

    if shape not in RANDOM_ENCODER_SHAPES:
        raise ValueError(f"unknown random-weight encoder shape {shape!r}; choose from "
                         f"{', '.join(RANDOM_ENCODER_SHAPES)}")
    spec = spec_by_name("bert")
    cfg = spec.config_class(**RANDOM_ENCODER_SHAPES[shape])
    dtype = default_dtype() if dtype is None else dtype
    weights = spec.random_weights(cfg, jax.random.PRNGKey(seed), dtype=dtype)
    name = f"random-weights:{shape}"
    loaded = LoadedModel(config=cfg, weights=weights, tokenizer_source=None, name=name, spec=spec)
    return EmbeddingEngine(loaded, PoolingConfig(mode="cls", normalize=True), config), name


def build_checkpoint_encoder(model: str, engine_kwargs: dict, *, dtype: Any = None
                             ) -> tuple[Any, Any, str]:
    """(engine, ``EmbeddingTokenizer``, model name) of an encoder checkpoint directory or
    ``all-MiniLM-L6-v2``, as ``Embedder`` loads it."""
    from arctic_jax.embedder import Embedder

    embedder = Embedder(model, dtype=dtype, **engine_kwargs)
    return embedder.engine, embedder.tokenizer, embedder.model_name


# ------------------------------------------------------------ model forward
@dataclasses.dataclass(frozen=True)
class ForwardResult:
    """Timed device batches: their inputs, real tokens, token slots, and the seconds from the
    first launch to the last result on the host."""

    num_batches: int
    num_inputs: int
    num_tokens: int
    token_slots: int
    seconds: float


def full_batches(engine: Any, lengths: Sequence[int]) -> list[tuple[int, Any]]:
    """(first input, ``BatchShape``) of the device batches the engine plans for ``lengths`` (in
    order) that fill the largest token bucket (the token budget)."""
    budget = engine.limits.max_num_batched_tokens
    out, start = [], 0
    for shape in engine.plan(list(lengths)):
        if shape.token_bucket == budget:
            out.append((start, shape))
        start += shape.num_seqs
    return out


def run_forward(engine: Any, seqs: Sequence[np.ndarray]) -> ForwardResult:
    """Time the engine's program on the full device batches of ``seqs`` (validated int32
    sequences; see the module docstring). ValueError if no batch is full."""
    import jax

    from arctic_jax.encoder_batch import build_encoder_batch

    batches = full_batches(engine, [len(s) for s in seqs])
    if not batches:
        lim = engine.limits
        raise ValueError(f"the workload ({len(seqs)} inputs, {sum(len(s) for s in seqs)} tokens) "
                         f"fills no device batch of {lim.max_num_batched_tokens} tokens; give "
                         f"more --num-inputs for the model-forward measurement")
    programs, inputs = [], []
    for start, shape in batches:
        packed = build_encoder_batch(seqs[start:start + shape.num_seqs], shape.token_bucket,
                                     shape.seq_bucket)
        inputs.append(jax.device_put(packed))
        programs.append(engine.program(shape))
    np.asarray(programs[0](engine.weights, inputs[0]))  # untimed: first launch of the program
    jax.block_until_ready(inputs)
    t0 = time.monotonic()
    outs = [program(engine.weights, batch) for program, batch in zip(programs, inputs, strict=True)]
    host = [np.asarray(o) for o in outs]
    seconds = time.monotonic() - t0
    for (_, shape), rows in zip(batches, host, strict=True):
        if not np.isfinite(rows[:shape.num_seqs]).all():
            raise RuntimeError("the model produced non-finite embeddings")
    return ForwardResult(num_batches=len(batches),
                         num_inputs=sum(s.num_seqs for _, s in batches),
                         num_tokens=sum(s.num_tokens for _, s in batches),
                         token_slots=sum(s.token_bucket for _, s in batches), seconds=seconds)


# ------------------------------------------------------------ load (shared)
@dataclasses.dataclass
class EmbedRecord:
    """One request: its inputs, the tokens counted for it (by the driver: as embedded, or
    from the response's usage) and the tokens the workload holds, its times, any error."""

    index: int
    num_inputs: int
    expected_tokens: int
    tokens: int = 0
    arrival: float = float("nan")
    end: float = float("nan")
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.arrival


@dataclasses.dataclass
class EmbedRun:
    """The records of a run (in request order), its window (first arrival, last end), info."""

    records: list[EmbedRecord]
    start: float
    end: float
    info: dict = dataclasses.field(default_factory=dict)


Send = Callable[[int, int], Awaitable[int]]  # (first, end) input range -> tokens counted


async def _timed(send: Send, index: int, first: int, end: int, expected: int) -> EmbedRecord:
    record = EmbedRecord(index=index, num_inputs=end - first, expected_tokens=expected)
    record.arrival = time.monotonic()
    try:
        record.tokens = await send(first, end)
    except Exception as e:  # a failed request is reported, not fatal
        record.error = f"{type(e).__name__}: {e}"
        log.warning("embedding request %d failed: %s", index, record.error)
    record.end = time.monotonic()
    return record


async def closed_loop(send: Send, workload: EmbedWorkload, concurrency: int,
                      indices: Sequence[int] | None = None) -> list[EmbedRecord]:
    """Send the workload's requests (or those of ``indices``) with ``concurrency`` clients,
    each sending its next request when its previous one finishes; records in request
    order."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    ranges = workload.requests()
    todo = iter(range(len(ranges)) if indices is None else indices)
    records: list[EmbedRecord] = []

    async def client() -> None:
        for i in todo:  # the shared iterator hands each request to one client
            first, end = ranges[i]
            records.append(await _timed(send, i, first, end, sum(workload.lengths[first:end])))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    records.sort(key=lambda r: r.index)
    return records


def _run_of(records: list[EmbedRecord], info: dict) -> EmbedRun:
    return EmbedRun(records=records, start=min(r.arrival for r in records),
                    end=max(r.end for r in records), info=info)


# --------------------------------------------------------- in-process e2e
def run_in_process(engine: Any, workload: EmbedWorkload, *, concurrency: int,
                   tokenizer: Any = None, warmup_requests: int = 1) -> EmbedRun:
    """The workload through an ``AsyncEmbeddingEngine`` on a warmed-up ``engine`` (see the
    module docstring). Text workloads need the model's ``EmbeddingTokenizer``. The first
    ``warmup_requests`` requests are also sent once, untimed.

    ``info``: XLA compilations during the timed run (0 after ``engine.warmup``) and the real
    tokens / token slots of the device batches it ran.
    """
    from arctic_jax.engine.embedding_front import AsyncEmbeddingEngine

    if workload.is_text and tokenizer is None:
        raise ValueError("a text workload needs the model's tokenizer")
    hidden = engine.hidden_size

    async def send(first: int, end: int) -> int:
        inputs = workload.inputs[first:end]
        ids = await tokenizer.encode_async(list(inputs)) if workload.is_text else inputs
        rows = await front.embed(ids)
        if rows.shape != (end - first, hidden) or not np.isfinite(rows).all():
            raise RuntimeError(f"bad embeddings: shape {rows.shape}, expected "
                               f"{(end - first, hidden)}")
        return sum(len(s) for s in ids)

    def slots() -> tuple[float, float]:
        get = engine.metrics.registry.get_sample_value
        return (get("arctic_embedding_batch_tokens_total") or 0.0,
                get("arctic_embedding_batch_token_slots_total") or 0.0)

    async def main() -> tuple[list[EmbedRecord], dict]:
        ranges = workload.requests()
        for i in range(min(warmup_requests, len(ranges))):
            probe = await _timed(send, -1 - i, *ranges[i], 0)
            if probe.error:
                raise RuntimeError(f"the untimed warm-up request failed: {probe.error}")
        compiles0, (tokens0, slots0) = engine.compiles_after_warmup, slots()
        records = await closed_loop(send, workload, concurrency)
        tokens1, slots1 = slots()
        return records, {"xla_compiles_during_run": engine.compiles_after_warmup - compiles0,
                         "device_batch_tokens": int(tokens1 - tokens0),
                         "device_batch_token_slots": int(slots1 - slots0)}

    front = AsyncEmbeddingEngine(engine)
    front.start()
    try:
        records, info = asyncio.run(main())
    finally:
        front.shutdown()
    if front.error is not None:
        raise RuntimeError(f"the embedding engine failed during the benchmark: {front.error}")
    return _run_of(records, info)


# ------------------------------------------------------------------- HTTP
def _openai_client(url: str, http_client: Any = None) -> Any:
    try:
        import openai
    except ImportError:
        raise ImportError("--url needs the openai package (pip install openai)") from None
    return openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0,
                              timeout=600.0, http_client=http_client)


async def _resolve_model(client: Any, model: str | None) -> str:
    if model:
        return model
    models = [m.id async for m in client.models.list()]
    if not models:
        raise RuntimeError("the server lists no model at /v1/models")
    return models[0]


async def _http_load(url: str, model: str | None, workload: EmbedWorkload, concurrency: int,
                     indices: Sequence[int], warmup_requests: int, http_client: Any = None,
                     barrier: Any = None) -> tuple[str, list[EmbedRecord]]:
    """One client process's share: ``indices`` of the workload's requests."""
    client = _openai_client(url, http_client)
    try:
        model = await _resolve_model(client, model)
        ranges = workload.requests()

        async def send(first: int, end: int) -> int:
            inputs = workload.inputs[first:end]
            resp = await client.embeddings.create(
                model=model, input=list(inputs) if workload.is_text else [list(s) for s in inputs])
            data = resp.data
            if len(data) != end - first:
                raise RuntimeError(f"{len(data)} embeddings for {end - first} inputs")
            widths = {len(d.embedding) for d in data}
            if len(widths) != 1 or 0 in widths:
                raise RuntimeError(f"embeddings of widths {sorted(widths)}")
            if resp.usage is None or resp.usage.prompt_tokens is None:
                raise RuntimeError("the response has no usage.prompt_tokens")
            return int(resp.usage.prompt_tokens)

        for k in range(min(warmup_requests, len(indices))):
            probe = await _timed(send, -1 - k, *ranges[indices[k]], 0)
            if probe.error:
                raise RuntimeError(f"warm-up request failed: {probe.error}")
        if barrier is not None:
            barrier.wait(timeout=300)
        return model, await closed_loop(send, workload, concurrency, indices)
    finally:
        await client.close()


def _split(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def _http_worker(url: str, model: str | None, workload: EmbedWorkload, concurrency: int,
                 indices: list[int], warmup_requests: int, barrier: Any, queue: Any,
                 worker: int) -> None:
    """A client process: runs its share, puts (worker, model, records, error) on ``queue``."""
    try:
        model, records = asyncio.run(_http_load(url, model, workload, concurrency, indices,
                                                warmup_requests, barrier=barrier))
        queue.put((worker, model, [dataclasses.astuple(r) for r in records], None))
    except BaseException as e:  # reported to the parent
        barrier.abort()
        queue.put((worker, model, [], f"{type(e).__name__}: {e}"))


def run_http(url: str, workload: EmbedWorkload, *, concurrency: int, model: str | None = None,
             warmup_requests: int = 1, client_processes: int = 1,
             http_client: Any = None) -> EmbedRun:
    """The workload against ``{url}/v1/embeddings`` (see the module docstring).

    ``model``: the model name sent (None: the first of ``/v1/models``). ``client_processes``
    P > 1: P processes share the requests (dealt round robin) and the concurrency, each with
    its own client and ``warmup_requests`` untimed requests, and start timing together (one
    Python client decoding base64 embeddings can become the bottleneck). ``http_client``: an
    ``httpx.AsyncClient`` for the openai client (tests; one process only).
    """
    n = len(workload.requests())
    if client_processes < 1:
        raise ValueError(f"client processes must be >= 1, got {client_processes}")
    if concurrency < client_processes:
        raise ValueError(f"concurrency {concurrency} is below the {client_processes} client "
                         f"processes (each needs at least one request in flight)")
    if client_processes == 1:
        served, records = asyncio.run(_http_load(url, model, workload, concurrency, range(n),
                                                 warmup_requests, http_client))
        return _run_of(records, {"served_model": served, "client_processes": 1})
    if http_client is not None:
        raise ValueError("http_client works with one client process only")
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(client_processes), ctx.Queue()
    procs = [ctx.Process(target=_http_worker, daemon=True,
                         args=(url, model, workload, c, list(range(n))[w::client_processes],
                               warmup_requests, barrier, queue, w))
             for w, c in enumerate(_split(concurrency, client_processes))]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=3600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    errors = [e for _, _, _, e in results if e]
    if errors:
        raise RuntimeError(f"a client process failed: {errors[0]}")
    records = sorted((EmbedRecord(*row) for _, _, rows, _ in results for row in rows),
                     key=lambda r: r.index)
    served = next(m for w, m, _, _ in sorted(results, key=lambda r: r[0]))
    return _run_of(records, {"served_model": served, "client_processes": client_processes})
