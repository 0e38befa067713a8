"""Data parallelism in one process: one-device engine replicas behind a router.

``build_replicas`` makes ``N`` one-device ``LLMEngine``s, replica i on device i.
``ReplicaRouter`` puts ``AsyncEngine``s (one engine thread each) behind the
``EngineFront`` protocol a single ``AsyncEngine`` implements (``generate``, ``abort``,
``alive``, ``render_metrics`` ...), so the server and the bench drive either the same way.

Routing: each request goes to the replica with the fewest requests in flight,
unless another replica holds a longer cached prefix of the prompt (full KV
pages, by the allocator's hash chain) and carries at most
``prefix_affinity_slack`` more requests. Requests sharing a system prompt then
keep hitting the replica that cached it, while load stays balanced. Failed
replicas are left out (see ``ReplicaRouter``); ``/health`` then reports
"degraded" with their indices.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from arctic_jax.engine.async_engine import AsyncEngine
from arctic_jax.engine.front import EngineFront, EngineLimits, QueueFullError
from arctic_jax.engine.request import RequestOutput
from arctic_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


def _check_on_device(engine: Any, device: Any) -> Any:
    """A one-device engine is placed where its weights were made (under ``jax.default_device``);
    check that this is ``device``."""
    placed = list(engine.runner.deployment.mesh.devices.flat)
    if placed != [device]:
        raise RuntimeError(f"replica meant for {device} was placed on {placed}")
    return engine


def build_replicas(build: Callable[[dict], tuple[Any, Any]], engine_kwargs: dict,
                   count: int) -> tuple[list[Any], Any]:
    """``count`` one-device engines, replica i built and pinned on device i.

    ``build(kwargs) -> (engine, extra)`` makes one ``LLMEngine`` (``extra``: anything the
    caller wants back, e.g. a model name; the last replica's is returned). Replicas
    after the first take its number of KV pages (the first sizes its cache from its
    device's free memory), so all of them accept the same requests.
    """
    import jax

    if count < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {count}")
    if engine_kwargs.get("tensor_parallel_size", 1) * engine_kwargs.get("sequence_parallel_size", 1) > 1:
        raise ValueError("data-parallel replicas are one-device engines; drop the "
                         "tensor/sequence-parallel options")
    devices = jax.devices()[:count]
    if len(devices) < count:
        raise ValueError(f"{count} data-parallel replicas need {count} devices, found {len(devices)}")
    engines: list[Any] = []
    extra = None
    for device in devices:
        kwargs = dict(engine_kwargs)
        if engines:
            kwargs["num_pages"] = engines[0].sched_config.num_pages
        with jax.default_device(device):
            engine, extra = build(kwargs)
        engines.append(_check_on_device(engine, device))
    return engines, extra


def build_engines(build: Callable[[dict], tuple[Any, Any]], engine_kwargs: dict,
                  data_parallel_size: int = 1) -> tuple[list[Any], Any]:
    """One engine as ``build`` makes it (any tensor/sequence parallelism), or
    ``data_parallel_size`` one-device replicas (``build_replicas``)."""
    if data_parallel_size == 1:
        engine, extra = build(dict(engine_kwargs))
        return [engine], extra
    return build_replicas(build, engine_kwargs, data_parallel_size)


def serving_front(engines: Sequence[Any], max_queue: int | None = None) -> EngineFront:
    """``AsyncEngine`` threads (not started) for ``engines``, behind a ``ReplicaRouter``
    when there are several; ``max_queue`` bounds the requests in flight over all of them."""
    if len(engines) == 1:
        return AsyncEngine(engines[0], max_queue=max_queue)
    return ReplicaRouter([AsyncEngine(e) for e in engines], max_queue=max_queue)


def merged_metrics(registries: Sequence[CollectorRegistry], label: str = "replica") -> bytes:
    """One Prometheus text exposition of several same-shaped registries, each sample
    labelled ``label="i"`` with its registry's index."""
    families: dict[str, Metric] = {}
    for i, registry in enumerate(registries):
        for family in registry.collect():
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            elif merged.type != family.type:
                raise ValueError(f"metric {family.name} is a {merged.type} in one registry and a "
                                 f"{family.type} in another")
            for s in family.samples:
                if label in s.labels:
                    raise ValueError(f"metric {s.name} already has a {label!r} label")
                merged.add_sample(s.name, {label: str(i), **s.labels}, s.value, s.timestamp,
                                  s.exemplar)

    class _Merged:
        def collect(self):
            return list(families.values())

    out = CollectorRegistry()
    out.register(_Merged())
    return generate_latest(out)


class ReplicaRouter:
    """Several started ``AsyncEngine``s (data-parallel replicas) as one.

    ``max_queue`` bounds the requests in flight over all replicas (more raise
    ``QueueFullError``); the replicas' own limits should be off. Requests are checked
    in the order ``AsyncEngine`` checks them (prompt, running, queue, id).

    Failed replicas are routed around: the router stays ``alive`` while one replica
    is, ``failed_replicas`` names the others, and a request whose replica fails before
    streaming anything is resubmitted to another (a request that already streamed
    tokens gets the failure, since its tokens cannot be taken back). Unlike
    ``AsyncEngine``, whose clients may live on any event loop, a router's clients
    must share one loop: its bookkeeping is not locked.
    """

    def __init__(self, replicas: Sequence[AsyncEngine], max_queue: int | None = None,
                 prefix_affinity_slack: int = 4):
        if not replicas:
            raise ValueError("a router needs at least one replica")
        if prefix_affinity_slack < 0:
            raise ValueError(f"prefix_affinity_slack must be >= 0, got {prefix_affinity_slack}")
        self.replicas = list(replicas)
        self.max_queue = max_queue
        self.prefix_affinity_slack = prefix_affinity_slack
        self._owner: dict[str, int] = {}
        self._load = [0] * len(self.replicas)
        self.routed = [0] * len(self.replicas)   # requests sent to each replica so far

    # ------------------------------------------------ the EngineFront protocol
    def limits(self) -> EngineLimits:
        """Replica 0's limits (all replicas share its model and limits)."""
        return self.replicas[0].limits()

    def validate_prompt(self, prompt_ids: Sequence[int]) -> None:
        self.replicas[0].validate_prompt(prompt_ids)

    @property
    def alive(self) -> bool:
        return any(r.alive for r in self.replicas)

    @property
    def failed_replicas(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if not r.alive]

    @property
    def error(self) -> BaseException | None:
        """The first failed replica's error (None while all run)."""
        return next((r.error for r in self.replicas if r.error is not None), None)

    def start(self) -> None:
        for r in self.replicas:
            r.start()

    def shutdown(self) -> None:
        for r in self.replicas:
            r.shutdown()

    def num_requests(self) -> int:
        return len(self._owner)

    def render_metrics(self) -> bytes:
        return merged_metrics([r.metrics_registry for r in self.replicas])

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one request from the replica ``pick`` chooses; leaving early aborts it."""
        self.validate_prompt(prompt_ids)
        if not self.alive:
            raise RuntimeError("the engine is not running")
        if self.max_queue is not None and len(self._owner) >= self.max_queue:
            raise QueueFullError(f"{len(self._owner)} requests in flight (max {self.max_queue})")
        if request_id in self._owner:
            raise ValueError(f"duplicate request id {request_id!r}")
        while True:   # a failed replica is not alive, so pick passes over it next time
            target = self.pick(prompt_ids)
            self._owner[request_id] = target
            self._load[target] += 1
            self.routed[target] += 1
            streamed = False
            try:
                # aclosing: leaving early closes the replica's stream now (its abort), not at GC
                async with contextlib.aclosing(
                        self.replicas[target].generate(prompt_ids, params, request_id)) as stream:
                    async for out in stream:
                        streamed = True
                        yield out
                return
            except RuntimeError as e:
                if streamed or self.replicas[target].alive:
                    raise
                log.warning("replica %d failed before request %s streamed; resubmitting: %s",
                            target, request_id, e)
            finally:
                self._load[target] -= 1
                self._owner.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        target = self._owner.get(request_id)
        if target is not None:
            self.replicas[target].abort(request_id)

    # ------------------------------------------------------------- routing
    def pick(self, prompt_ids: Sequence[int]) -> int:
        """The running replica for a new request (see the module docstring)."""
        running = [i for i, r in enumerate(self.replicas) if r.alive]
        if not running:
            raise RuntimeError(f"the engine is not running: every replica failed ({self.error})")
        least = min(self._load[i] for i in running)
        near = [i for i in running if self._load[i] <= least + self.prefix_affinity_slack]
        best = min(near, key=lambda i: (self._load[i], i))
        if len(near) > 1:
            hits = self._cached_tokens(prompt_ids, near)
            top = max(hits.values())
            if top > hits[best]:
                best = min((i for i in near if hits[i] == top), key=lambda i: (self._load[i], i))
        return best

    def _cached_tokens(self, prompt_ids: Sequence[int], replicas: Sequence[int]) -> dict[int, int]:
        return {i: self.replicas[i].cached_prefix_tokens(prompt_ids) for i in replicas}
