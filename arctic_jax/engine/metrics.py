"""Engine metrics in Prometheus form, in a registry owned by each engine (no global state)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from arctic_jax.engine.request import Request

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                    20.48, 40.96, 81.92)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("arctic_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("arctic_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("arctic_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("arctic_num_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("arctic_num_requests_waiting", "Requests waiting", registry=r)
        self.kv_usage = Gauge("arctic_kv_cache_usage_ratio", "Fraction of KV pages in use",
                              registry=r)
        self.prefix_hit_rate = Gauge("arctic_prefix_cache_hit_rate",
                                     "Prefix cache hits / queries, in tokens", registry=r)
        self.generated = Counter("arctic_generation_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("arctic_prompt_tokens", "Prompt tokens received", registry=r)
        self.steps = Counter("arctic_engine_steps", "Model steps run", ["variant"], registry=r)
        self.step_tokens = Counter("arctic_engine_step_tokens", "Tokens computed in steps",
                                   ["variant"], registry=r)
        self.steps_waiting_for_compilation = Counter(
            "arctic_engine_steps_capped_by_compilation",
            "Steps held to a smaller token budget because the larger steps' programs were still "
            "compiling in the background (requests waited in the scheduler, not in a step)",
            registry=r)
        self.step_failures = Counter(
            "arctic_engine_step_failures",
            "Model steps that failed (their requests aborted with an error; the engine ran on)",
            registry=r)
        self.preemptions = Counter(
            "arctic_num_preemptions",
            "Running requests preempted for KV pages (their KV freed, recomputed when resumed)",
            registry=r)
        self.finished = Counter("arctic_requests_finished", "Finished requests", ["reason"],
                                registry=r)
        # Speculative decoding (present, at zero, when speculation is off).
        self.spec_drafts = Counter("arctic_spec_decode_num_drafts",
                                   "Request-steps that verified a draft", registry=r)
        self.spec_draft_tokens = Counter("arctic_spec_decode_num_draft_tokens",
                                         "Draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter("arctic_spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted", registry=r)
        self.spec_drafted_per_pos = Counter(
            "arctic_spec_decode_num_draft_tokens_per_pos",
            "Draft tokens verified at each draft position (0 = first)", ["position"], registry=r)
        self.spec_accepted_per_pos = Counter(
            "arctic_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0 = first)", ["position"], registry=r)
        self.spec_request_steps = Counter(
            "arctic_spec_decode_request_steps",
            "Decode steps of requests that may speculate (with or without a draft)", registry=r)
        self.spec_governed_steps = Counter(
            "arctic_spec_decode_governed_steps",
            "Steps with more running requests than adaptive_disable_batch_size, by whether the "
            "governor kept speculation on", ["speculating"], registry=r)
        self.spec_emitted_tokens = Counter(
            "arctic_spec_decode_emitted_tokens",
            "Tokens those request-steps produced (mean tokens per step = this / request_steps)",
            registry=r)

    def on_arrival(self, request: Request) -> None:
        self.prompt_tokens.inc(len(request.prompt_ids))

    def on_first_token(self, request: Request) -> None:
        self.ttft.observe(request.first_token_time - request.arrival_time)

    def on_tokens(self, num_generated: int, num_step_tokens: int, variant: str = "single") -> None:
        self.generated.inc(num_generated)
        self.steps.labels(variant).inc()
        self.step_tokens.labels(variant).inc(num_step_tokens)

    def on_verified_runs(self, runs: list[tuple[int, int, int, int]]) -> None:
        """The request-steps one step verified, each (drafted, accepted, emitted, depth):
        ``drafted`` drafts offering ``depth`` positions (a tree's depth, else ``drafted``),
        ``accepted`` accepted, ``emitted`` kept. One increment per counter and position."""
        if not runs:
            return
        offered: list[int] = []    # offered[i]: runs offering draft position i
        taken: list[int] = []
        for _, accepted, _, depth in runs:
            for counts, n in ((offered, depth), (taken, accepted)):
                if len(counts) < n:
                    counts.extend([0] * (n - len(counts)))
                for i in range(n):
                    counts[i] += 1
        self.spec_drafts.inc(len(runs))
        self.spec_draft_tokens.inc(sum(r[0] for r in runs))
        self.spec_accepted_tokens.inc(sum(r[1] for r in runs))
        for metric, counts in ((self.spec_drafted_per_pos, offered), (self.spec_accepted_per_pos, taken)):
            for i, n in enumerate(counts):
                metric.labels(str(i)).inc(n)
        self.spec_request_steps.inc(len(runs))
        self.spec_emitted_tokens.inc(sum(r[2] for r in runs))

    def on_plain_decode(self, num_steps: int) -> None:
        """Request-steps of speculating requests that had no draft (one token each)."""
        self.spec_request_steps.inc(num_steps)
        self.spec_emitted_tokens.inc(num_steps)

    def on_finish(self, request: Request) -> None:
        now = time.monotonic()
        self.e2e.observe(now - request.arrival_time)
        n = len(request.output_ids)
        if request.first_token_time is not None and n > 1:
            self.tpot.observe((now - request.first_token_time) / (n - 1))
        reason = request.finish_reason.value if request.finish_reason else "unknown"
        self.finished.labels(reason).inc()

    def on_step(self, scheduler) -> None:  # a Scheduler; not imported, to avoid an import cycle
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        stats = scheduler.allocator.stats()
        self.kv_usage.set(stats["usage"])
        self.prefix_hit_rate.set(stats["hit_rate"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
