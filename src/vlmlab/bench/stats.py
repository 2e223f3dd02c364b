"""Client-side statistics of a run (vllm bench serve definitions) and ``/metrics`` deltas.

Reference: ``calculate_metrics`` in ``vllm/benchmarks/serve.py``:

- throughputs divide by the wall-clock duration of the run (first send to last byte);
- TPOT statistics leave out requests with one output token or fewer; for goodput such a
  request's TPOT counts as 0 (it cannot miss a TPOT SLO);
- ITL is pooled over all requests; a request is "good" only if it meets every SLO given;
- percentiles are numpy's linear interpolation (``np.percentile``), std is the population std;
- peak output throughput is the most output tokens that arrived within any one-second window of
  the run, divided by the window (:func:`peak_output_throughput`). vLLM counts each streamed
  chunk as one token in fixed one-second buckets from the first send; a bucket that straddles
  the start (no tokens during the first TTFT) or a run shorter than a second then gives a
  "peak" below the mean. Here the window slides (it may start at any token), a chunk counts
  the tokens it carried (the usage total spread over the request's chunks), and a run shorter
  than a second uses its own duration as the window, so the peak equals the mean there.

Token totals come from the server's usage; input tokens include image tokens whenever the
server counts them in ``prompt_tokens`` (vLLM, vlmlab), and ``image_tokens`` is summed only
from servers that report ``usage.prompt_tokens_details.image_tokens``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

import numpy as np

from vlmlab.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)


def latency_stats(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """Mean / median / p90 / p99 / std / min / max in milliseconds, and ``n``."""
    if not values_s:
        return {"n": 0, "mean_ms": None, "median_ms": None, "p90_ms": None, "p99_ms": None,
                "std_ms": None, "min_ms": None, "max_ms": None}  # fmt: skip
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return {
        "n": int(ms.size),
        "mean_ms": float(ms.mean()),
        "median_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


def is_good(record: RequestRecord, slo_ms: Mapping[str, float]) -> bool:
    """Whether a successful request meets every SLO (ms); TPOT of <= 1-token requests is 0."""
    if not record.success:
        return False
    values = {
        "ttft": record.ttft_s,
        "tpot": record.tpot_s if record.output_tokens > 1 else 0.0,
        "e2el": record.e2el_s,
    }
    return all(values[name] is not None and values[name] * 1000.0 <= limit for name, limit in slo_ms.items())  # type: ignore[operator]


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once (a sweep over send / end times)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records], key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


PEAK_WINDOW_S = 1.0


def token_arrivals(record: RequestRecord) -> list[tuple[float, int]]:
    """``(time since the run started, output tokens)`` per streamed text chunk of a request.

    Chunk times are the client's own stamps (``start_s + ttft_s``, then each ITL gap). A chunk
    may carry several tokens and the stream does not say how many, so the request's token count
    (usage, else chunks) is spread over its chunks as evenly as whole numbers allow; a request
    whose tokens produced no text chunk (tokens that decode to nothing, say) has them all
    arrive at its end. Failed requests produce nothing.
    """
    if not record.success or record.output_tokens <= 0:
        return []
    if not record.output_chunks or record.ttft_s is None:
        return [(record.end_s, record.output_tokens)]
    stamps = list(accumulate(record.itl_s, initial=record.start_s + record.ttft_s))
    chunks, tokens = len(stamps), record.output_tokens
    # Chunk j gets floor((j+1) T / C) - floor(j T / C) tokens: integers summing to exactly T.
    return [(t, (j + 1) * tokens // chunks - j * tokens // chunks) for j, t in enumerate(stamps)]


def peak_output_throughput(records: Iterable[RequestRecord], duration_s: float) -> tuple[float | None, float]:
    """The most output tokens per second over any window of one second (a sliding window).

    Inputs: the run's records and its wall-clock duration. Output: ``(peak tok/s, window s)``;
    the window is one second, or the run's duration when the run is shorter (then the peak
    is the run's mean output throughput); the peak is ``None`` when nothing was generated.

    A window [t, t + w) that holds the most tokens can always be slid right until it starts at
    a token, so only windows starting at a token are checked (two pointers over sorted times).
    Under a steady load the peak is at least the mean (which also counts the wait for the first
    token and the tail); output in bursts more than a window apart can give less.
    """
    window = min(PEAK_WINDOW_S, duration_s) if duration_s > 0 else PEAK_WINDOW_S
    arrivals = sorted(a for r in records for a in token_arrivals(r))
    if not arrivals:
        return None, window
    best = in_window = 0
    end = 0
    for start, (t0, _) in enumerate(arrivals):
        while end < len(arrivals) and arrivals[end][0] < t0 + window:
            in_window += arrivals[end][1]
            end += 1
        best = max(best, in_window)
        in_window -= arrivals[start][1]
    return best / window, window


def server_timing_summary(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """What the server says the time went to, aggregated; ``None`` when it says nothing.

    ``preprocess_share`` = server preprocessing time / client E2EL, summed over the requests
    that report it (how much of what the user waited was image work).
    """
    timed = [r for r in records if r.success and r.server_timings]
    if not timed:
        return None
    # vlmlab's names first, then vLLM's per-request metrics names for the same quantity.
    aliases = {
        "preprocess_ms": ("preprocess_ms",),
        "queue_ms": ("queue_ms", "queue_time_ms"),
        "ttft_ms": ("ttft_ms", "time_to_first_token_ms"),
        "total_ms": ("total_ms",),
    }
    out: dict[str, Any] = {"requests": len(timed)}
    for name, keys in aliases.items():
        values = [next((float(r.server_timings[k]) for k in keys if r.server_timings.get(k) is not None), None) for r in timed]  # type: ignore[index]
        present = [v / 1000.0 for v in values if v is not None]
        out[name] = latency_stats(present) if present else None
    pairs = [(float(r.server_timings["preprocess_ms"]), r.e2el_s * 1000.0, r.ttft_s * 1000.0)  # type: ignore[index, operator]
             for r in timed if r.server_timings.get("preprocess_ms") is not None and r.e2el_s]  # type: ignore[union-attr]  # fmt: skip
    out["preprocess_share"] = sum(p for p, _, _ in pairs) / sum(e for _, e, _ in pairs) if pairs else None
    out["preprocess_share_of_ttft"] = sum(p for p, _, _ in pairs) / sum(t for _, _, t in pairs) if pairs and sum(t for _, _, t in pairs) else None
    stages: dict[str, list[float]] = {}
    for r in timed:
        for stage, ms in (r.server_timings.get("stages_ms") or {}).items():  # type: ignore[union-attr]
            stages.setdefault(stage, []).append(float(ms))
    out["stages_mean_ms"] = {k: sum(v) / len(v) for k, v in sorted(stages.items())}
    out["preprocess_cache_hits"] = sum(int(r.server_timings.get("preprocess_cache_hits") or 0) for r in timed)  # type: ignore[union-attr]
    out["response_cache_hits"] = sum(bool(r.server_timings.get("response_cache_hit")) for r in timed)  # type: ignore[union-attr]
    return out


def summarize(records: Sequence[RequestRecord], duration_s: float, slo_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The run's summary: counts, token totals, ``throughput``, ``ttft``/``tpot``/``itl``/``e2el``.

    Inputs: every measured record (warm-ups excluded), the run's wall-clock duration, and the
    goodput SLOs in ms (empty: no goodput). Output: a JSON-safe dict.
    """
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    duration = max(duration_s, 1e-9)

    def total(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    input_tokens = total([r.prompt_tokens for r in ok])
    output_tokens = sum(r.output_tokens for r in ok)
    image_tokens = total([r.image_tokens for r in ok])
    slo = dict(slo_ms or {})
    good = sum(is_good(r, slo) for r in ok) if slo else None
    peak, peak_window = peak_output_throughput(ok, duration)
    errors: list[str] = []
    for r in failed:
        if r.error and len(errors) < 10:
            errors.append(f"request {r.index}: {r.error}")
    return {
        "completed": len(ok),
        "failed": len(failed),
        "errors": errors,
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_image_tokens": image_tokens,
        "total_text_input_tokens": None if input_tokens is None or image_tokens is None else input_tokens - image_tokens,
        "total_output_tokens": output_tokens,
        "output_tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        "peak_concurrency": peak_concurrency(records),
        "throughput": {
            "requests_per_s": len(ok) / duration,
            "input_tokens_per_s": None if input_tokens is None else input_tokens / duration,
            "output_tokens_per_s": output_tokens / duration,
            "total_tokens_per_s": ((input_tokens or 0) + output_tokens) / duration,
            "peak_output_tokens_per_s": peak,
            "peak_output_window_s": peak_window,
            "goodput_requests_per_s": None if good is None else good / duration,
            "images_per_s": sum(r.image_count for r in ok) / duration,
        },
        "goodput": None if good is None else {"slo_ms": slo, "good_requests": good, "requests_per_s": good / duration},
        "ttft": latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl": latency_stats([gap for r in ok for gap in r.itl_s]),
        "e2el": latency_stats([r.e2el_s for r in ok if r.e2el_s is not None]),
        "client_queue": latency_stats([r.queued_s for r in ok]),
        "payload": {
            "total_request_bytes": sum(r.payload_bytes for r in records),
            "mean_request_bytes": sum(r.payload_bytes for r in records) / len(records) if records else None,
            "total_image_bytes": sum(r.image_bytes for r in records),
            "images": sum(r.image_count for r in records),
        },
        "server_timings": server_timing_summary(ok),
    }


# -- Prometheus ------------------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{sample name: value summed over label sets}``.

    ``_created`` samples (creation timestamps) and histogram ``_bucket`` samples are skipped:
    the deltas of ``_sum`` and ``_count`` say what the buckets would, at a fraction of the size.
    """
    values: dict[str, float] = {}
    declared: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# TYPE "):
            # A labelled counter with no child yet declares itself but has no sample: count it
            # as 0, so "no cache hit yet" reads as 0 hits, not as "metric unknown".
            _, _, name, kind = (line.split() + ["", ""])[:4]
            if kind == "counter":
                declared[name if name.endswith("_total") else name + "_total"] = 0.0
            elif kind in ("histogram", "summary"):
                declared.update({name + "_sum": 0.0, name + "_count": 0.0})
            continue
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if not match:
            continue
        name = match.group(1)
        if name.endswith(("_created", "_bucket")):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        if math.isfinite(value):
            values[name] = values.get(name, 0.0) + value
    return {**declared, **values}


def metric_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` for counters and histogram sums/counts (gauges are point values)."""
    deltas = {}
    for name, value in after.items():
        if name.endswith(("_total", "_sum", "_count")):
            deltas[name] = value - before.get(name, 0.0)
    return deltas


def cache_summary(deltas: Mapping[str, float] | None, expected_hit_ratio: float | None) -> dict[str, Any]:
    """The preprocessing-cache figures: what the workload should give and what the server saw
    (``vllm:mm_cache_hits`` / ``vllm:mm_cache_queries``, in images, as vLLM and vlmlab count)."""
    hits = deltas.get("vllm:mm_cache_hits_total") if deltas else None
    queries = deltas.get("vllm:mm_cache_queries_total") if deltas else None
    return {
        "expected_image_hit_ratio": expected_hit_ratio,
        "server_mm_cache_hits": hits,
        "server_mm_cache_queries": queries,
        "server_mm_cache_hit_ratio": hits / queries if hits is not None and queries else None,
    }
