"""One benchmark: find or start the target, then per concurrency level warm up, scrape
``/metrics``, send the load, scrape again, and summarise.

Load shapes (as in `vllm bench serve`):

- a known number of requests (``num_requests``, or ``duration_s`` x a finite rate): request
  ``i`` is released at its arrival offset (:func:`arrival_times`; all at 0 for an infinite
  rate) and then waits for a free slot under the client-side concurrency cap, if any; that
  wait is reported as ``client_queue`` and is not part of TTFT or E2EL;
- ``duration_s`` with an infinite rate: a closed loop of ``max_concurrency`` workers, each
  sending its next request as soon as the previous one ends, until the time is up.

Bodies are built and serialised before the clock starts (closed loop: just before each
send, off the event loop), so image encoding and JSON cost never count as latency.

Progress goes to an optional ``on_progress`` callback (:class:`BenchProgress` events); the
library prints nothing itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import httpx

from vlmlab.bench.client import RequestRecord, send_request
from vlmlab.bench.config import BenchConfig
from vlmlab.bench.progress import BenchProgress, Phase
from vlmlab.bench.schedule import arrival_times
from vlmlab.bench.stats import cache_summary, metric_deltas, parse_prometheus, summarize
from vlmlab.bench.target import ImageHost, Target, local_server, model_card, root_of, scrape_metrics
from vlmlab.bench.workload import PreparedRequest, Workload
from vlmlab.protocol.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

SCHEMA = "vlmlab.bench/1"

ProgressCallback = Callable[[BenchProgress], None]
RecordCallback = Callable[[RequestRecord], None]


class _RunTracker:
    """Counts one run's finished requests and reports each step to ``on_progress`` (if any)."""

    def __init__(self, on_progress: ProgressCallback | None, event: BenchProgress):
        self.on_progress = on_progress
        self.event = event  # run, runs, label, total and duration_s stay; counts change
        self.started = time.perf_counter()

    def phase(self, phase: Phase, elapsed_s: float | None = None) -> None:
        if phase == "running":
            self.started = time.perf_counter()
        elapsed = time.perf_counter() - self.started if elapsed_s is None else elapsed_s
        self.event = replace(self.event, phase=phase, elapsed_s=elapsed)
        if self.on_progress is not None:
            self.on_progress(self.event)

    def record(self, record: RequestRecord) -> None:
        ok, failed = self.event.ok + record.success, self.event.failed + (not record.success)
        self.event = replace(self.event, ok=ok, failed=failed, done=ok + failed)
        self.phase("request")


def _async_client(concurrency: int | None, timeout_s: float) -> httpx.AsyncClient:
    # One connection per allowed request, as vLLM sizes its aiohttp connector; trust_env off so
    # a proxy variable can never route loopback traffic through a proxy.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(30.0, timeout_s)), limits=limits, trust_env=False)


async def run_scheduled(
    url: str,
    headers: dict[str, str],
    requests: Sequence[PreparedRequest],
    offsets: Sequence[float],
    concurrency: int | None,
    timeout_s: float,
    on_record: RecordCallback | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send ``requests[i]`` at ``offsets[i]`` (s) under an optional concurrency cap.

    ``on_record`` is called with each record as its request ends (in completion order).
    Output: the records in request order and the run's duration (first release to last byte).
    """
    async with _async_client(concurrency, timeout_s) as client:
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        run_start = time.perf_counter()

        async def one(request: PreparedRequest, offset: float) -> RequestRecord:
            delay = run_start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                record = await send_request(client, url, request, headers, run_start=run_start, scheduled_s=offset)
            else:
                async with gate:
                    record = await send_request(client, url, request, headers, run_start=run_start, scheduled_s=offset)
            if on_record is not None:
                on_record(record)
            return record

        records = await asyncio.gather(*(one(r, t) for r, t in zip(requests, offsets)))
        return list(records), time.perf_counter() - run_start


async def run_closed_loop(
    url: str,
    headers: dict[str, str],
    workload: Workload,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    on_record: RecordCallback | None = None,
) -> tuple[list[RequestRecord], list[PreparedRequest], float]:
    """``concurrency`` workers send back-to-back requests until ``duration_s`` has passed.

    ``on_record`` is called with each record as its request ends.
    Output: the records (in completion order per worker), the requests sent, the duration.
    """
    counter = itertools.count()
    sent: list[PreparedRequest] = []
    async with _async_client(concurrency, timeout_s) as client:
        run_start = time.perf_counter()
        deadline = run_start + duration_s

        async def worker() -> list[RequestRecord]:
            out = []
            while time.perf_counter() < deadline:
                request = await asyncio.to_thread(workload.build, next(counter))
                if time.perf_counter() >= deadline:
                    break
                sent.append(request)
                scheduled = time.perf_counter() - run_start
                out.append(await send_request(client, url, request, headers, run_start=run_start, scheduled_s=scheduled))
                if on_record is not None:
                    on_record(out[-1])
            return out

        per_worker = await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - run_start
    records = sorted((r for rs in per_worker for r in rs), key=lambda r: r.index)
    return records, sent, duration


async def _warm_up(url: str, headers: dict[str, str], requests: Sequence[PreparedRequest], timeout_s: float) -> list[RequestRecord]:
    async with _async_client(1, timeout_s) as client:
        start = time.perf_counter()
        return [await send_request(client, url, r, headers, run_start=start) for r in requests]


def _build_all(workload: Workload, n: int, warmup: bool = False) -> list[PreparedRequest]:
    # Threads: Pillow and zlib release the GIL while encoding, so big images build in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda i: workload.build(i, warmup=warmup), range(n)))


def _scrape(client: httpx.Client, target: Target, enabled: bool) -> dict[str, float] | None:
    text = scrape_metrics(client, target.root_url, target.headers) if enabled else None
    return parse_prometheus(text) if text is not None else None


def run_level(
    config: BenchConfig,
    target: Target,
    level: int,
    concurrency: int | None,
    image_host: dict[str, Any],
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """One concurrency level: warm-ups, ``/metrics`` before, the load, ``/metrics`` after.

    ``image_host`` carries the image host's ``url`` and a ``workload`` slot the host reads;
    ``on_progress`` hears the warm-up, the start, every measured request and the end.

    Raises:
        EngineUnavailableError: the first warm-up request failed (the target is unusable as
            configured; its error message says why).
    """
    url = target.root_url + config.endpoint
    label = f"concurrency={concurrency}" if concurrency else "concurrency=unlimited"
    n = config.requests_per_level
    event = BenchProgress("warmup", run=level, runs=len(config.concurrency), label=label, total=n, duration_s=config.duration_s if n is None else None)
    tracker = _RunTracker(on_progress, event)
    workload = Workload(config, target.model, namespace=level, image_base_url=image_host.get("url"))
    image_host["workload"] = workload
    if config.warmups:
        tracker.phase("warmup")
        warm = asyncio.run(_warm_up(url, target.headers, _build_all(workload, config.warmups, warmup=True), config.request_timeout_s))
        if not warm[0].success:
            raise EngineUnavailableError(f"the warm-up request to {url} failed: {warm[0].error}")
    with httpx.Client(timeout=30.0, trust_env=False) as sync:
        before = _scrape(sync, target, config.scrape_metrics)
        if n is None:
            assert concurrency is not None and config.duration_s is not None  # BenchConfig checks this
            tracker.phase("running")
            records, sent, duration = asyncio.run(
                run_closed_loop(url, target.headers, workload, concurrency, config.duration_s, config.request_timeout_s, tracker.record)
            )
        else:
            sent = _build_all(workload, n)
            offsets = arrival_times(n, config.request_rate, config.burstiness, seed=config.seed + level)
            tracker.phase("running")
            records, duration = asyncio.run(run_scheduled(url, target.headers, sent, offsets, concurrency, config.request_timeout_s, tracker.record))
        tracker.phase("finished", elapsed_s=duration)
        after = _scrape(sync, target, config.scrape_metrics)
    deltas = metric_deltas(before, after) if before is not None and after is not None else None
    summary = summarize(records, duration, config.slo)
    summary["max_concurrency"] = concurrency
    summary["request_rate"] = None if math.isinf(config.request_rate) else config.request_rate
    summary["cache"] = cache_summary(deltas, workload.expected_hit_ratio(sent))
    summary["warnings"] = stale_cache_warnings(summary, sent)
    for message in summary["errors"] + summary["warnings"]:
        logger.warning("%s", message)
    return {
        "label": label,
        "max_concurrency": concurrency,
        "request_rate": summary["request_rate"],
        "summary": summary,
        "server_metrics": {"before": before, "after": after, "delta": deltas},
        "requests": [r.to_dict() for r in records],
    }


def stale_cache_warnings(summary: dict[str, Any], sent: Sequence[PreparedRequest]) -> list[str]:
    """Signs that caches held this run's work before it started (a repeated ``--seed``).

    Every prompt of a run is unique and images repeat only as the workload says, so more
    preprocessing-cache hits than repeated images, or any response-cache hit, means an earlier
    run sent the same requests; the figures then measure the cache, not the server.
    """
    warnings = []
    names = [n for r in sent for n in r.image_names]
    repeats = len(names) - len(set(names))
    hits = summary["cache"]["server_mm_cache_hits"]
    if hits is not None and hits > repeats:
        warnings.append(f"the server's preprocessing cache answered {hits:.0f} images but this workload repeats only "
                        f"{repeats}: an earlier run probably sent the same images; vary --seed or restart the server")  # fmt: skip
    timings = summary.get("server_timings") or {}
    if timings.get("response_cache_hits"):
        warnings.append(f"{timings['response_cache_hits']} responses came from the server's response cache: an earlier "
                        "run sent the same prompts; vary --seed or restart the server")  # fmt: skip
    return warnings


def run_bench(config: BenchConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``config``; write the JSON and plots it asks for.

    ``on_progress`` (optional) is called with a :class:`BenchProgress` at each step: a local
    server starting, each run's warm-up and start, every measured request, each run's end
    (``vlmlab bench`` shows them with :class:`~vlmlab.bench.progress.ProgressDisplay`).

    Output: the result (``schema``, ``created``, ``environment``, ``target``, ``settings``,
    ``runs`` (one per concurrency level, each with ``summary``, ``server_metrics`` and
    per-request ``requests``), ``summary`` (the last run's: the heaviest level of a sweep),
    ``sweep`` (one row per level) and ``plots`` (files written)).

    Raises:
        ConfigError: bad settings or a target without a discoverable model.
        EngineUnavailableError: the local server did not start, or the warm-up failed.
    """
    from vlmlab.bench.report import environment, sweep_rows, write_outputs

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    image_host: dict[str, Any] = {}
    with ExitStack() as stack:
        if config.transport == "http":
            host = stack.enter_context(ImageHost(lambda name: _image_bytes(image_host, name), host=config.image_host))
            image_host["url"] = host.url
        command = None
        if config.base_url:
            root = root_of(config.base_url)
        else:
            levels = [c for c in config.concurrency if c]
            queue = max(64, (config.requests_per_level or 0) + config.warmups, *levels)
            trusted = (config.image_host,) if config.transport == "http" else ()
            if on_progress is not None:
                serve_flags = " ".join(config.serve_args)
                on_progress(BenchProgress("server", label=f"vlmlab serve --model {config.model or 'nano'} {serve_flags}".strip()))
            server = local_server(
                config.model or "nano",
                config.serve_args,
                trusted_hosts=trusted,
                max_queue=queue,
                start_timeout_s=config.server_start_timeout_s,
            )
            root, command = stack.enter_context(server)
        with httpx.Client(timeout=30.0, trust_env=False) as sync:
            model, card = model_card(sync, root, headers, config.model if config.base_url else None)
        target = Target(root, headers, model, card, command)
        runs = []
        for level, concurrency in enumerate(config.concurrency):
            logger.info("bench level %d: max concurrency %s", level, concurrency or "unlimited")
            runs.append(run_level(config, target, level, concurrency, image_host, on_progress))
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "target": {
            "root_url": target.root_url,
            "model": target.model,
            "card": target.card,
            "started_by_bench": command is not None,
            "command": command,
        },
        "settings": config.to_dict(),
        "runs": runs,
        "summary": runs[-1]["summary"],
        "sweep": sweep_rows(runs),
    }
    result["plots"] = [str(p) for p in write_outputs(result, config)]
    return result


def _image_bytes(image_host: dict[str, Any], name: str) -> tuple[bytes, str] | None:
    workload: Workload | None = image_host.get("workload")
    image = workload.image(name) if workload is not None else None
    return (image.data, image.mime) if image is not None else None
