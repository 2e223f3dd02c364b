"""vlmlab bench: a VLM-first serving benchmark that talks to any OpenAI-compatible server.

It uses HTTP only (it imports nothing from ``vlmlab.server`` or ``vlmlab.engines``), so it
measures vlmlab, vLLM, SGLang and Ollama the same way, with `vllm bench serve`'s definitions
of TTFT, TPOT, ITL, E2EL, throughput and goodput, plus what matters for vision models: image
size buckets and counts, unique vs pooled images (a controlled cache-hit ratio), data-URL vs
http-URL transport, server-side preprocessing share and ``/metrics`` deltas.

    from vlmlab.bench import BenchConfig, run_bench
    result = run_bench(BenchConfig(model="nano", num_requests=20, concurrency=(4,)))

``run_bench(config, on_progress=callback)`` reports each step as a :class:`BenchProgress`
(``vlmlab bench`` draws them with :class:`vlmlab.bench.progress.ProgressDisplay`).
"""

from __future__ import annotations

from vlmlab.bench.config import (
    BenchConfig,
    ImageBucket,
    parse_concurrency,
    parse_image_sizes,
    parse_slo,
)
from vlmlab.bench.progress import BenchProgress
from vlmlab.bench.runner import run_bench
from vlmlab.bench.schedule import arrival_times

__all__ = [
    "BenchConfig",
    "BenchProgress",
    "ImageBucket",
    "arrival_times",
    "parse_concurrency",
    "parse_image_sizes",
    "parse_slo",
    "run_bench",
]
