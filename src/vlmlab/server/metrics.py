"""Prometheus metrics (vLLM's names and meanings where they exist) and the ``/stats`` numbers.

Each app gets its own ``CollectorRegistry``, so several servers (tests) can live in one process.
"""

from __future__ import annotations

import threading
from collections import Counter as CounterDict
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vlmlab.protocol.core import GenerationResult

# vLLM's bucket edges for latency histograms (vllm/v1/metrics/loggers.py), in seconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class ServerMetrics:
    """Counters and histograms, exported at ``/metrics`` and summarised at ``/stats``."""

    def __init__(self, model_name: str, shared: ServerMetrics | None = None):
        """``shared``: another model's metrics in the same server, whose registry and metric
        families these use (one family per metric in ``/metrics``, a ``model_name`` label each)."""
        self.model_name = model_name
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=10_000)
        self._ttfts: deque[float] = deque(maxlen=10_000)
        self.totals: CounterDict[str, int] = CounterDict()
        if shared is not None:
            for name, value in vars(shared).items():
                if name == "registry" or isinstance(value, (Counter, Gauge, Histogram)):
                    setattr(self, name, value)
            return
        self.registry = CollectorRegistry()
        label = ["model_name"]
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", label, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time waiting for the engine.", label, buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Engine start to first token.", label, buckets=LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "First to last token.", label, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Mean time per output token after the first.", label, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_hist = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", label, buckets=TOKEN_BUCKETS, registry=r)
        self.generation_hist = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", label, buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed (images included).", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=r)
        self.image_tokens = Counter("vlmlab:image_tokens", "Prompt tokens that images expanded to.", label, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests.", [*label, "finished_reason"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in the engine.", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for the engine.", label, registry=r)
        self.mm_queries = Counter("vllm:mm_cache_queries", "Preprocessing-cache lookups (images).", label, registry=r)
        self.mm_hits = Counter("vllm:mm_cache_hits", "Preprocessing-cache hits (images).", label, registry=r)
        self.response_queries = Counter("vlmlab:response_cache_queries", "Response-cache lookups.", label, registry=r)
        self.response_hits = Counter("vlmlab:response_cache_hits", "Response-cache hits.", label, registry=r)
        self.stage = Histogram("vlmlab:preprocess_stage_seconds", "Per-image preprocessing time by stage.", [*label, "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.errors = Counter("vlmlab:request_errors", "Requests that ended in an error, by HTTP status.", [*label, "status"], registry=r)
        self.fallbacks = Counter("vlmlab:engine_fallbacks", "Times the next engine in the chain took over.", label, registry=r)

    def observe_result(self, result: GenerationResult, e2e_s: float) -> None:
        m, t = self.model_name, result.timings
        self.e2e.labels(m).observe(e2e_s)
        if t.ttft_s is not None:
            self.ttft.labels(m).observe(t.ttft_s)
        if t.queue_s is not None:
            self.queue_time.labels(m).observe(t.queue_s)
        if t.prefill_s is not None:
            self.prefill_time.labels(m).observe(t.prefill_s)
        if t.decode_s is not None:
            self.decode_time.labels(m).observe(t.decode_s)
            if result.completion_tokens > 1:
                self.tpot.labels(m).observe(t.decode_s / (result.completion_tokens - 1))
        self.prompt_hist.labels(m).observe(result.prompt_tokens)
        self.generation_hist.labels(m).observe(result.completion_tokens)
        self.prompt_tokens.labels(m).inc(result.prompt_tokens)
        self.generation_tokens.labels(m).inc(result.completion_tokens)
        self.image_tokens.labels(m).inc(result.image_tokens)
        self.success.labels(m, result.finish_reason).inc()
        with self._lock:
            self._latencies.append(e2e_s)
            if t.ttft_s is not None:
                self._ttfts.append(t.ttft_s)
            self.totals["requests"] += 1
            self.totals["prompt_tokens"] += result.prompt_tokens
            self.totals["image_tokens"] += result.image_tokens
            self.totals["completion_tokens"] += result.completion_tokens

    def observe_error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()
        with self._lock:
            self.totals["errors"] += 1
            self.totals[f"errors_{status}"] += 1

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(self.model_name, stage).observe(seconds)

    def observe_cache(self, kind: str, hit: bool) -> None:
        queries, hits = (self.mm_queries, self.mm_hits) if kind == "mm" else (self.response_queries, self.response_hits)
        queries.labels(self.model_name).inc()
        if hit:
            hits.labels(self.model_name).inc()
        with self._lock:
            self.totals[f"{kind}_cache_queries"] += 1
            self.totals[f"{kind}_cache_hits"] += int(hit)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            latencies, ttfts, totals = list(self._latencies), list(self._ttfts), dict(self.totals)

        def pct(values: list[float]) -> dict[str, float | None]:
            return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}

        def rate(kind: str) -> float | None:
            queries = totals.get(f"{kind}_cache_queries", 0)
            return totals.get(f"{kind}_cache_hits", 0) / queries if queries else None

        return {
            "totals": totals,
            "latency_s": pct(latencies),
            "ttft_s": pct(ttfts),
            "cache_hit_rate": {"preprocess": rate("mm"), "response": rate("response")},
        }

    def export(self) -> bytes:
        return generate_latest(self.registry)
