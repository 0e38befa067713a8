"""Benchmark drivers: send a workload to an engine and time every token.

Two drivers share one load generator (``run_load``):

- ``InProcessDriver`` streams from an ``AsyncEngine`` in this process. Build the
  engine with ``build_checkpoint_engine`` or ``build_random_engine`` and compile
  every bucket with ``warmup_engine`` before timing.
- ``HTTPDriver`` streams ``/v1/completions`` from a running OpenAI-compatible
  server (httpx, imported lazily so the in-process path needs no HTTP stack).

Times are ``time.perf_counter()`` seconds, taken in the client coroutine when
an update arrives (so they include the client-side delivery latency).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from arctic_jax.bench.workload import BenchRequest

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- records
@dataclasses.dataclass
class RequestRecord:
    """Timeline of one request. ``deliveries`` are (time, number of new tokens) per update."""

    index: int
    prompt_len: int | None
    max_tokens: int
    ignore_eos: bool
    arrival: float = float("nan")
    first_token: float | None = None
    end: float | None = None
    deliveries: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    def add_delivery(self, t: float, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self.first_token is None:
            self.first_token = t
        self.deliveries.append((t, num_tokens))
        self.output_tokens += num_tokens

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None


@dataclasses.dataclass
class RunResult:
    """Records of a run (in request order) and its wall-clock window."""

    records: list[RequestRecord]
    start: float          # first arrival
    end: float            # last completion
    info: dict = dataclasses.field(default_factory=dict)


def new_record(request: BenchRequest) -> RequestRecord:
    return RequestRecord(index=request.index, prompt_len=request.prompt_len,
                         max_tokens=request.max_tokens, ignore_eos=request.ignore_eos)


# ------------------------------------------------------------------ load shape
async def _send(driver: Any, request: BenchRequest) -> RequestRecord:
    record = new_record(request)
    record.arrival = time.perf_counter()
    try:
        await driver.send(request, record)
        record.end = time.perf_counter()
        if record.first_token is None:
            record.error = "the request finished without producing a token"
    except Exception as e:  # a failed request is reported, not fatal
        record.end = time.perf_counter()
        record.error = f"{type(e).__name__}: {e}"
        log.warning("request %d failed: %s", request.index, record.error)
    return record


async def run_load(driver: Any, requests: Sequence[BenchRequest], *,
                   concurrency: int | None = None,
                   arrival_offsets: Sequence[float] | None = None) -> RunResult:
    """Send ``requests`` through ``driver`` (an object with ``async send(request, record)``).

    Exactly one of: ``concurrency`` N (closed loop, N clients each sending the
    next request when its previous one finishes) or ``arrival_offsets``
    (open loop: request i is sent ``arrival_offsets[i]`` seconds after the start,
    whatever is in flight).
    """
    if (concurrency is None) == (arrival_offsets is None):
        raise ValueError("give exactly one of concurrency and arrival_offsets")
    if not requests:
        raise ValueError("no requests to send")
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        pending = iter(requests)
        records: list[RequestRecord] = []

        async def client() -> None:
            for request in pending:  # the shared iterator hands each request to one client
                records.append(await _send(driver, request))

        await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
    else:
        if len(arrival_offsets) != len(requests):
            raise ValueError(f"{len(arrival_offsets)} arrival times for {len(requests)} requests")
        t0 = time.perf_counter()
        tasks = []
        for request, offset in zip(requests, arrival_offsets, strict=True):
            delay = t0 + float(offset) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(driver, request)))
        records = list(await asyncio.gather(*tasks))
    records.sort(key=lambda r: r.index)
    return RunResult(records=records, start=min(r.arrival for r in records),
                     end=max(r.end for r in records))


# ------------------------------------------------------------- in-process path
class TokenIdTokenizer:
    """Tokenizer for random-weight models: token i decodes to `` i``; cannot encode text."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {int(i)}" for i in ids)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        raise ValueError("random-weight models have no tokenizer; give prompts as token ids")


def smollm2_135m_shape() -> Any:
    """The shape of SmolLM2-135M (for random-weight benchmarks)."""
    from arctic_jax.config import ModelConfig

    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                       num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=100000.0, max_position_embeddings=8192,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def tiny_shape() -> Any:
    """A tiny Llama for smoke tests of the harness itself (not a speed measurement)."""
    from arctic_jax.config import ModelConfig

    return ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512,
                       eos_token_ids=(0,))


def _llama_3_1_8b() -> Any:
    from arctic_jax.config import llama_3_1_8b

    return llama_3_1_8b()


RANDOM_MODEL_SHAPES: dict[str, Callable[[], Any]] = {
    "llama-3.1-8b": _llama_3_1_8b,
    "smollm2-shape": smollm2_135m_shape,
    "tiny": tiny_shape,
}


def build_random_engine(shape: str | Any, engine_kwargs: dict, *, dtype: Any = None,
                        seed: int = 0, swiftkv: str | None = None) -> tuple[Any, str]:
    """An ``LLMEngine`` with random weights of a named shape (or a ModelConfig); ``swiftkv``
    ``"LKV"`` or ``"LKV:G"``: the SwiftKV model of that shape and split.

    Returns (engine, model description). dtype None: bfloat16 on GPU, float32 elsewhere.
    """
    import jax

    from arctic_jax.engine.engine import EngineConfig, LLMEngine
    from arctic_jax.models.registry import spec_by_name
    from checkpoints.loader import default_dtype

    if isinstance(shape, str):
        if shape not in RANDOM_MODEL_SHAPES:
            raise ValueError(f"unknown random-weight shape {shape!r}; "
                             f"choose from {', '.join(RANDOM_MODEL_SHAPES)}")
        cfg, name = RANDOM_MODEL_SHAPES[shape](), f"random-weights:{shape}"
    else:
        cfg, name = shape, "random-weights:custom"
    dtype = default_dtype() if dtype is None else dtype
    spec = spec_by_name("llama")
    if swiftkv:
        spec = spec_by_name("llama_swiftkv")
        split = spec.config_class.parse_split(swiftkv)
        cfg = spec.config_class.from_llama(cfg, *split)
        name += f" SwiftKV Lkv={cfg.num_key_value_layers} g={cfg.key_value_group_size}"
    weights = spec.random_weights(cfg, jax.random.PRNGKey(seed), dtype=dtype)
    engine = LLMEngine(spec, cfg, weights, TokenIdTokenizer(),
                       EngineConfig.from_flags(**engine_kwargs), dtype=dtype)
    return engine, name


def build_checkpoint_engine(model: str, engine_kwargs: dict, *, dtype: Any = None) -> tuple[Any, str]:
    """An ``LLMEngine`` over a checkpoint (as ``LLM`` loads it). Returns (engine, model name)."""
    from arctic_jax.llm import LLM

    llm = LLM(model, dtype=dtype, **engine_kwargs)
    return llm.engine, llm.model_name


def warmup_engine(engine: Any, *, progress: bool = True) -> float:
    """Compile every step bucket, then run one short request; returns the seconds it took.

    Call before ``AsyncEngine.start`` (the engine is driven synchronously here).
    """
    from arctic_jax.sampling import SamplingParams

    start = time.perf_counter()
    engine.runner.warmup(progress=progress)
    rid = engine.add_request(list(_probe_request(engine, -1).prompt),
                             SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                             request_id="bench-warmup")
    done = False
    while not done:
        if not engine.has_unfinished():
            raise RuntimeError("the warm-up request did not finish")
        done = any(o.request_id == rid and o.finished for o in engine.step())
    while engine.has_unfinished():  # drain the step launched after the last token
        engine.step()
    return time.perf_counter() - start


def _probe_request(engine: Any, index: int) -> BenchRequest:
    """A short untimed request with fresh random tokens (no prefix shared with the workload)."""
    limits = engine.limits()
    n = max(1, min(8, limits.max_model_len - 3))
    rng = np.random.default_rng()
    prompt = tuple(int(t) for t in rng.integers(0, limits.vocab_size, size=n))
    return BenchRequest(index=index, prompt=prompt, max_tokens=2, ignore_eos=True)


class InProcessDriver:
    """Streams requests from an ``AsyncEngine`` (or a ``ReplicaRouter`` over data-parallel
    replicas, which picks one per request as the server does); greedy, ``ignore_eos`` as
    the request says."""

    def __init__(self, async_engine: Any):
        self.async_engine = async_engine

    async def send(self, request: BenchRequest, record: RequestRecord) -> None:
        from arctic_jax.sampling import SamplingParams

        if isinstance(request.prompt, str):
            raise ValueError("in-process prompts must be token ids (tokenize them first)")
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0,
                                ignore_eos=request.ignore_eos)
        async for out in self.async_engine.generate(list(request.prompt), params,
                                                    f"bench-{request.index}"):
            record.add_delivery(time.perf_counter(), len(out.new_token_ids))
            if out.finished:
                record.finish_reason = out.finish_reason.value if out.finish_reason else None


def tokenize_requests(requests: Sequence[BenchRequest], tokenizer: Any) -> list[BenchRequest]:
    """Replace text prompts by token ids (done before timing)."""
    from arctic_jax.tokenizer import encode_prompt

    return [r if not isinstance(r.prompt, str)
            else dataclasses.replace(r, prompt=tuple(encode_prompt(tokenizer, r.prompt)))
            for r in requests]


def check_fits(requests: Sequence[BenchRequest], engine: Any) -> None:
    """Fail before timing if a request cannot run to its full length on this engine."""
    max_len = engine.limits().max_model_len
    for r in requests:
        try:
            engine.validate_prompt(r.prompt)
        except ValueError as e:
            raise ValueError(f"request {r.index}: {e}") from None
        if r.prompt_len + r.max_tokens > max_len:
            raise ValueError(f"request {r.index}: {r.prompt_len} prompt + {r.max_tokens} output "
                             f"tokens exceed max_model_len {max_len}; raise --max-model-len")


def run_in_process(engine: Any, requests: Sequence[BenchRequest], *,
                   concurrency: int | None = None,
                   arrival_offsets: Sequence[float] | None = None) -> RunResult:
    """Run a workload on a warmed-up engine (or a list of data-parallel replica engines,
    behind a ``ReplicaRouter``) through ``AsyncEngine`` threads, one per engine.

    One short untimed probe request goes first to each engine, on the same event loop.

    ``info`` of the result holds the number of XLA compilations during the run
    (0 when every bucket was compiled by ``warmup_engine``).
    """
    from arctic_jax.engine.compile_counter import CompileCounter
    from arctic_jax.engine.replicas import ReplicaRouter, serving_front
    from arctic_jax.speculative.stats import SpeculationStats

    engines = list(engine) if isinstance(engine, (list, tuple)) else [engine]
    requests = tokenize_requests(requests, engines[0].tokenizer)
    for e in engines:
        check_fits(requests, e)

    async def main() -> RunResult:
        for i, a in enumerate(async_engines):  # warms each thread hand-off
            probe = await _send(InProcessDriver(a), _probe_request(engines[i], -1 - i))
            if probe.error:
                raise RuntimeError(f"the untimed probe request failed: {probe.error}")
        for e in engines:   # count the timed requests' speculation only
            e.spec_stats = SpeculationStats()
        return await run_load(InProcessDriver(front), requests, concurrency=concurrency,
                              arrival_offsets=arrival_offsets)

    front = serving_front(engines)
    async_engines = front.replicas if isinstance(front, ReplicaRouter) else [front]
    front.start()
    counter = CompileCounter()
    try:
        result = asyncio.run(main())
    finally:
        counter.close()
        front.shutdown()
    for a in async_engines:
        if a.error is not None:
            raise RuntimeError(f"the engine failed during the benchmark: {a.error}")
    result.info["xla_compiles_during_run"] = counter.count
    result.info["replicas"] = len(engines)
    if any(e.proposer is not None for e in engines):
        stats = SpeculationStats()
        for e in engines:
            stats = stats.merge(e.spec_stats)
        result.info["speculation"] = stats.as_dict()
        governed = [e.governor.as_dict() for e in engines]
        result.info["speculation"]["governor"] = {
            "batch_size": governed[0]["batch_size"],
            **{k: sum(g[k] for g in governed) for k in ("steps_speculating", "steps_not_speculating")},
            "rates": [[g["rate_speculating"], g["rate_not_speculating"]] for g in governed]}
    if isinstance(front, ReplicaRouter):
        result.info["requests_per_replica"] = list(front.routed)
    return result


# ------------------------------------------------------------------- HTTP path
class HTTPDriver:
    """Streams ``POST {url}/v1/completions`` with the prompt as token ids (or text).

    Sends ``temperature: 0``, ``stream: true``, ``stream_options.include_usage``
    and the extension field ``ignore_eos`` (a server that ignores it may stop
    early at EOS; lengths are then measured as they come). A streamed chunk
    counts as its ``token_ids`` (an extension) if present, else as one token;
    ``usage.completion_tokens``, when sent, gives the total.
    """

    def __init__(self, url: str, model: str, *, transport: Any = None):
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.client = httpx.AsyncClient(
            base_url=self.url, transport=transport,
            timeout=httpx.Timeout(None, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        await self.client.aclose()

    async def resolve_model(self) -> str:
        """The first id of ``GET /v1/models``, or the configured name if the server has no list."""
        resp = await self.client.get("/v1/models")
        if resp.status_code == 404:
            return self.model
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if data and isinstance(data[0], dict) and data[0].get("id"):
            self.model = str(data[0]["id"])
        return self.model

    def body(self, request: BenchRequest) -> dict:
        return {"model": self.model,
                "prompt": request.prompt if isinstance(request.prompt, str) else list(request.prompt),
                "max_tokens": request.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": request.ignore_eos}

    async def send(self, request: BenchRequest, record: RequestRecord) -> None:
        usage: dict | None = None
        async with self.client.stream("POST", "/v1/completions", json=self.body(request)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:500]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(f"server error: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    record.add_delivery(now, _chunk_tokens(choice))
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
        if usage:
            if usage.get("completion_tokens") is not None:
                record.output_tokens = int(usage["completion_tokens"])
            if record.prompt_len is None and usage.get("prompt_tokens") is not None:
                record.prompt_len = int(usage["prompt_tokens"])


def _chunk_tokens(choice: dict) -> int:
    """Tokens carried by one streamed choice (see ``HTTPDriver``)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


def run_http(url: str, model: str, requests: Sequence[BenchRequest], *,
             concurrency: int | None = None, arrival_offsets: Sequence[float] | None = None,
             warmup_requests: int = 1, transport: Any = None) -> RunResult:
    """Run a workload against a server; ``warmup_requests`` short untimed requests go first."""

    async def main() -> RunResult:
        driver = HTTPDriver(url, model, transport=transport)
        try:
            info = {"served_model": await driver.resolve_model()}
            for i in range(warmup_requests):
                probe = dataclasses.replace(requests[i % len(requests)], index=-1 - i, max_tokens=2)
                record = await _send(driver, probe)
                if record.error:
                    raise RuntimeError(f"warm-up request failed: {record.error}")
            result = await run_load(driver, requests, concurrency=concurrency,
                                    arrival_offsets=arrival_offsets)
            result.info.update(info)
            return result
        finally:
            await driver.close()

    return asyncio.run(main())


def device_info() -> dict:
    """The local accelerator and JAX version (for the in-process driver's report)."""
    import jax

    devices = jax.devices()
    return {"card": devices[0].device_kind, "platform": devices[0].platform,
            "num_devices": len(devices), "jax_version": jax.__version__}
