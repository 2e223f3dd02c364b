"""One streamed chat request, timed on the client the way `vllm bench serve` times it.

Definitions (``vllm/benchmarks/lib/endpoint_request_func.py``, openai-chat backend):

- the clock starts just before the request bytes are sent (the body is serialised earlier);
- TTFT: until the first SSE chunk whose delta carries text. vLLM stamps the first chunk with
  ``choices`` instead; vLLM's server sends its role chunk with the first token, but others
  (vlmlab included) may send it earlier, so a role-only chunk is not counted as a token;
- ITL: the gaps between later text chunks (several tokens in one chunk give one gap);
- E2EL: until the stream ends (``[DONE]`` or the connection closes);
- output tokens: ``usage.completion_tokens`` from the ``include_usage`` chunk; a server that
  sends no usage gets the number of text chunks instead (flagged ``tokens_from_usage=False``).

A request fails on a non-2xx status, on an error object inside the stream (the status is
already 200 by then; vLLM and vlmlab both report late errors that way, and counting them as
successes is a known mistake of other clients), on a stream that ends without any chunk, or on
a transport error.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from vlmlab.bench.workload import PreparedRequest


@dataclass
class RequestRecord:
    """Everything measured about one request; times in seconds.

    ``scheduled_s``/``start_s``/``end_s`` are offsets from the start of the run; ``ttft_s``,
    ``e2el_s`` and ``itl_s`` are relative to ``start_s``. ``queued_s`` is the client-side wait
    between the scheduled time and the send (only with a concurrency cap).
    ``server_timings`` is the server's own per-request breakdown when it returns one
    (vlmlab ``timings``, in ms; vLLM's ``metrics`` object with ``--enable-per-request-metrics``).
    """

    index: int
    success: bool = False
    error: str | None = None
    status: int | None = None
    scheduled_s: float = 0.0
    start_s: float = 0.0
    end_s: float = 0.0
    queued_s: float = 0.0
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_chunks: int = 0
    output_chars: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    image_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int = 0
    tokens_from_usage: bool = False
    finish_reason: str | None = None
    payload_bytes: int = 0
    image_count: int = 0
    image_bytes: int = 0
    server_timings: dict[str, Any] | None = None

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1); ``None`` for one output token or fewer."""
        if not self.success or self.ttft_s is None or self.e2el_s is None or self.output_tokens <= 1:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        return out


def error_message(status: int | None, body: Any) -> str:
    """The message of an OpenAI (nested) or old-vLLM (flat) error object, else the raw text."""
    prefix = f"HTTP {status}: " if status else ""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return prefix + str(inner["message"])
        if isinstance(inner, str):
            return prefix + inner
    text = body if isinstance(body, str) else json.dumps(body)
    return prefix + (text.strip()[:500] or "empty response")


class _Stream:
    """Folds SSE chunks (or one non-stream JSON body) into a :class:`RequestRecord`."""

    def __init__(self, record: RequestRecord, t0: float):
        self.record = record
        self.t0 = t0
        self.last_text_at: float | None = None
        self.saw_chunk = False

    def feed(self, data: dict[str, Any], now: float) -> None:
        record = self.record
        if "error" in data or data.get("object") == "error":
            record.error = error_message(None, data)
            return
        self.saw_chunk = True
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or choice.get("message") or {}
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
            if text:
                record.output_chunks += 1
                record.output_chars += len(text)
                if record.ttft_s is None:
                    record.ttft_s = now - self.t0
                elif self.last_text_at is not None:
                    record.itl_s.append(now - self.last_text_at)
                self.last_text_at = now
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            record.prompt_tokens = usage.get("prompt_tokens")
            record.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            if isinstance(details, dict):
                record.image_tokens = details.get("image_tokens")
                record.cached_tokens = details.get("cached_tokens")
        for key in ("timings", "metrics"):  # vlmlab / vLLM per-request metrics
            if isinstance(data.get(key), dict):
                record.server_timings = {**(record.server_timings or {}), **data[key]}

    def finish(self, now: float) -> None:
        record = self.record
        record.e2el_s = now - self.t0
        if record.error is None and not self.saw_chunk:
            record.error = "the stream ended without any chunk"
        if record.error is None:
            record.success = True
            if record.ttft_s is None:  # no text at all (e.g. an immediate stop): first byte = end
                record.ttft_s = record.e2el_s
            record.tokens_from_usage = record.completion_tokens is not None
            record.output_tokens = record.completion_tokens if record.tokens_from_usage else record.output_chunks  # type: ignore[assignment]


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    request: PreparedRequest,
    headers: dict[str, str],
    *,
    run_start: float,
    scheduled_s: float = 0.0,
) -> RequestRecord:
    """POST ``request`` to ``url`` as a stream and time it; never raises for server faults.

    Inputs: a shared client, the chat-completions URL, the prepared body, headers (auth),
    ``run_start`` (``perf_counter`` time the run's offsets count from) and the request's
    scheduled offset. Output: the filled :class:`RequestRecord`.
    """
    record = RequestRecord(
        index=request.index,
        scheduled_s=scheduled_s,
        payload_bytes=len(request.payload),
        image_count=request.image_count,
        image_bytes=request.image_bytes,
    )
    t0 = time.perf_counter()
    record.start_s = t0 - run_start
    record.queued_s = max(0.0, record.start_s - scheduled_s)
    stream = _Stream(record, t0)
    try:
        post_headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **headers}
        async with client.stream("POST", url, content=request.payload, headers=post_headers) as response:
            record.status = response.status_code
            if response.status_code >= 300:
                raw = (await response.aread()).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                record.error = error_message(response.status_code, body)
            elif "text/event-stream" not in response.headers.get("content-type", "text/event-stream"):
                # A server that ignores stream=True: the whole answer arrives at once.
                stream.feed(json.loads(await response.aread()), time.perf_counter())
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    try:
                        stream.feed(json.loads(data), now)
                    except ValueError:
                        record.error = f"unreadable stream chunk: {data[:200]!r}"
                    if record.error is not None:
                        break
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except ValueError as exc:  # a non-stream body that is not JSON
        record.error = f"unreadable response: {exc}"
    end = time.perf_counter()
    stream.finish(end)
    record.end_s = end - run_start
    return record
