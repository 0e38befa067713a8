"""Embedding-engine metrics in Prometheus form, in a registry owned by each engine."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                    5.12, 10.24, 20.48)
_FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class EmbeddingMetrics:
    """Requests, tokens, device batches (their fill) and queue time of one embedding engine."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("arctic_embedding_requests", "Embedding requests accepted",
                                registry=r)
        self.failed = Counter("arctic_embedding_requests_failed",
                              "Accepted embedding requests that failed or were cancelled",
                              registry=r)
        self.inputs = Counter("arctic_embedding_inputs", "Sequences (inputs) embedded", registry=r)
        self.prompt_tokens = Counter("arctic_embedding_prompt_tokens", "Tokens embedded",
                                     registry=r)
        self.waiting = Gauge("arctic_embedding_requests_waiting",
                             "Requests with inputs not yet sent to the device", registry=r)
        self.running = Gauge("arctic_embedding_requests_running", "Requests in flight", registry=r)
        self.queue_time = Histogram("arctic_embedding_queue_time_seconds",
                                    "Time from a request's arrival to its first device batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("arctic_embedding_request_latency_seconds",
                             "Time from a request's arrival to its embeddings",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.batches = Counter("arctic_embedding_batches", "Device batches run", registry=r)
        self.batch_tokens = Counter("arctic_embedding_batch_tokens",
                                    "Real tokens in device batches", registry=r)
        self.batch_slots = Counter("arctic_embedding_batch_token_slots",
                                   "Token slots of device batches (real tokens plus padding)",
                                   registry=r)
        self.batch_fill = Histogram("arctic_embedding_batch_fill_ratio",
                                    "Real tokens / token slots of each device batch",
                                    buckets=_FILL_BUCKETS, registry=r)
        self.batch_seqs = Histogram("arctic_embedding_batch_sequences",
                                    "Sequences in each device batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                                    registry=r)

    def on_batch(self, num_tokens: int, token_slots: int, num_seqs: int) -> None:
        self.batches.inc()
        self.batch_tokens.inc(num_tokens)
        self.batch_slots.inc(token_slots)
        self.batch_fill.observe(num_tokens / token_slots)
        self.batch_seqs.observe(num_seqs)

    def on_sequences(self, num_seqs: int, num_tokens: int) -> None:
        self.inputs.inc(num_seqs)
        self.prompt_tokens.inc(num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
