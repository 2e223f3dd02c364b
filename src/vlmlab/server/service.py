"""The work behind the routes: validate, load images off the loop, admit, generate, cache, count.

Order of work for a chat request (cheap checks first, so bad input never costs a decode):
parse -> image count -> fetch bytes (http(s): fetch threads, per-host limit; inline: media
threads) -> content hash -> preprocessing-cache lookup -> header plan -> image-memory admission
(413 over the whole budget, 429 when it is full now) -> decode on a miss (media threads) ->
response-cache lookup -> admission (429 when full) -> engine (which checks the context with the
family rule before preprocessing) -> usage and metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vlmlab.cache import LRUCache, content_key
from vlmlab.config import ServerSettings
from vlmlab.engines import Engine, GenerationRequest, PromptCount
from vlmlab.engines.base import check_features
from vlmlab.protocol.tools import might_be_calls, parse_tool_calls
from vlmlab.media import (
    DecodePlan,
    ImageBytes,
    MediaPolicy,
    decode_image,
    plan_decode,
    read_image_bytes,
)
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    GenerationResult,
    ImageData,
    ImagePart,
    SamplingParams,
    TextPart,
)
from vlmlab.protocol.errors import (
    BadRequestError,
    ContextLengthError,
    EngineError,
    OverloadedError,
    RequestTimeoutError,
    VlmlabError,
)
from vlmlab.protocol.openai import ChatCompletionRequest
from vlmlab.server.admission import (
    HostSlots,
    ImageCosts,
    ImageHold,
    ImageMemoryBudget,
    Reservation,
    default_pixel_cap,
)
from vlmlab.server.engines import EngineChain
from vlmlab.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def media_policy(settings: ServerSettings, default_max_pixels: int | None = None) -> MediaPolicy:
    """The media rules of ``settings``; ``default_max_pixels`` applies where they set no pixel
    cap (the served family's, see :func:`vlmlab.server.admission.default_pixel_cap`)."""
    root = settings.allowed_local_media_path
    max_pixels = settings.max_image_pixels or default_max_pixels or default_pixel_cap(None)
    return MediaPolicy(
        allowed_local_root=Path(root) if root else None,
        allowed_domains=frozenset(settings.allowed_media_domains) if settings.allowed_media_domains is not None else None,
        trusted_hosts=frozenset(settings.trusted_media_hosts),
        max_bytes=settings.max_image_bytes,
        max_pixels=max_pixels,
    )


@dataclass
class _Read:
    """One image after the cheap work: its bytes read and hashed, the preprocessing cache asked
    (``cached``) and, on a miss, its header planned and its memory cost estimated."""

    raw: ImageBytes
    stages: dict[str, float] = field(default_factory=dict)
    cached: ImageData | None = None
    plan: DecodePlan | None = None
    cost: int = 0


# A cached result's fixed part (the dataclasses, their dicts, the timings' stage dict), measured
# by walking a result with sys.getsizeof: 2.5 KiB with three stages; rounded up for more stages.
RESULT_OVERHEAD_BYTES = 4096

# Stages of a result's timings that are not per-image preprocessing, kept out of the
# vlmlab:preprocess_stage_seconds histogram: the request's own time in the engine, the waits for
# a server slot and for a batch, the replica hop, the chat template and the detokenizer.
NOT_PER_IMAGE = frozenset({"engine", "slot_wait", "batch_wait", "replica_send", "template", "detokenize"})


def result_bytes(result: GenerationResult) -> int:
    """What a cached result holds: its text (UTF-8, as Python stores at most 4 bytes a
    character) and the fixed part."""
    return 4 * len(result.text) + RESULT_OVERHEAD_BYTES


def fetch_host(ref: str | None) -> str | None:
    """The host an ``http(s)://`` image reference is fetched from; ``None`` for inline data and
    files ("" for a URL whose host does not parse: the fetch itself reports it)."""
    text = (ref or "").lstrip()
    if not text[:8].lower().startswith(("http://", "https://")):
        return None
    try:
        return (urlsplit(text).hostname or "").lower()
    except ValueError:
        return ""


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: the server is gone, and its slots with it
        pass


async def _before(deadline: float, awaitable: Any, limit_s: float) -> Any:
    """Await ``awaitable`` unless ``deadline`` (``time.perf_counter`` time) passes first: 504.

    Uses ``asyncio.timeout`` (Python >= 3.11, no extra task per awaited item), else ``wait_for``.
    """
    remaining = deadline - time.perf_counter()
    try:
        if remaining <= 0:
            raise TimeoutError
        if hasattr(asyncio, "timeout"):
            async with asyncio.timeout(remaining):
                return await awaitable
        return await asyncio.wait_for(awaitable, remaining)
    except TimeoutError:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise RequestTimeoutError(f"the request did not finish within {limit_s:g} s") from None


class ChatService:
    """Owns the engine chain, caches, admission and metrics of one server."""

    def __init__(self, settings: ServerSettings, chain: EngineChain, shared_metrics: ServerMetrics | None = None):
        self.settings = settings
        self.chain = chain
        self.metrics = ServerMetrics(settings.model_name, shared_metrics)  # one registry per server
        self._costs: dict[str | None, ImageCosts] = {}
        first = self._image_costs(chain.engine) if chain.engine is not None else ImageCosts(None)
        self.policy = media_policy(settings, default_pixel_cap(first.family, first.defaults))
        self.image_budget = ImageMemoryBudget(settings.image_memory_budget)
        # Decoding and fetching in separate pools: threads waiting on slow hosts must never
        # keep inline images from being decoded.
        self.media_pool = ThreadPoolExecutor(settings.media_workers, thread_name_prefix="vlmlab-media")
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_workers, "vlmlab-fetch")
        self.fetch_slots = HostSlots(settings.fetch_per_host)
        self._preprocess_pool: Any = None  # PreprocessPool, started by the first large image
        self._pool_lock = threading.Lock()
        self.responses: LRUCache[GenerationResult] = LRUCache(
            settings.response_cache_bytes,
            sizeof=result_bytes,
            name="response",
            max_entries=settings.response_cache_entries,
        )
        self._engine_slots = asyncio.Semaphore(settings.max_concurrency)
        self.active = 0  # admitted requests: waiting for a slot or in the engine
        self.in_engine = 0
        self.started_at = time.time()
        chain.on_fallback = lambda: self.metrics.fallbacks.labels(self.metrics.model_name).inc()

    # -- request -> core ---------------------------------------------------------------------

    def parse(self, body: ChatCompletionRequest) -> tuple[Chat, SamplingParams, dict[str, Any], str]:
        """The request as core types: chat, sampling, processor options, preprocessing mode."""
        chat = body.to_chat()
        sampling = body.to_sampling(default_max_tokens=self.settings.default_max_tokens)
        engine = self.chain.current()
        check_features(engine.name, engine.capabilities, sampling, bool(chat.tools))  # honoured, or a 400 naming it
        options = dict(body.mm_processor_kwargs or {})
        mode = options.pop("preprocess_mode", self.settings.preprocess_mode)
        if mode not in ("exact", "fast"):
            raise BadRequestError(
                f"mm_processor_kwargs.preprocess_mode must be 'exact' or 'fast', got {mode!r}",
                param="mm_processor_kwargs",
            )
        if options:
            family = self.chain.current().info().family
            if family:
                from vlmlab.families import get_family

                get_family(family).resolve_options(options)  # unknown option -> 400 naming it
        self._check_text_length(chat, sampling)
        limit = self.max_images()
        if len(chat.images) > limit:
            raise BadRequestError(
                f"At most {limit} image(s) may be provided in one request, got {len(chat.images)}",
                param="messages",
            )
        return chat, sampling, options, mode

    def _check_text_length(self, chat: Chat, sampling: SamplingParams) -> None:
        """An O(characters) lower bound on the prompt's tokens, before any template or tokenizer
        runs: a text far beyond the context is refused at once instead of after seconds of
        tokenising (which, on the event loop, would stall every other request)."""
        engine = self.chain.current()
        if not engine.max_token_chars:
            return
        characters = chat.text_characters
        at_least = -(-characters // engine.max_token_chars)
        limit = engine.info().max_model_len
        if at_least + sampling.max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, the messages hold "
                f"{characters:,} characters of text, at least {at_least:,} tokens (no token of this "
                f"model spans more than {engine.max_token_chars} characters), and {sampling.max_tokens} "
                "more are requested for the completion. Please reduce the length of the messages."
            )

    def max_images(self) -> int:
        engine_limit = self.chain.current().info().max_images
        return min(self.settings.max_images or engine_limit, engine_limit)

    async def load_images(
        self,
        chat: Chat,
        options: Mapping[str, Any],
        mode: str = "exact",
        stages: dict[str, float] | None = None,
        hold: ImageHold | None = None,
    ) -> Chat:
        """Every image of ``chat`` loaded, cheap work first: read (http(s) in the fetch threads,
        at most ``fetch_per_host`` at once per host; inline data and files in the media threads)
        and hashed, looked up in the preprocessing cache, the misses planned from their headers
        and admitted together against the image-memory budget (413 over all of it, 429 when it
        is full now), then decoded or preprocessed in the media threads (and processes).

        Seconds per stage are summed into ``stages``. The admitted memory joins ``hold``, which
        the caller releases when the request ends (the decoded images live that long); without
        one it is released on return.
        """
        if not chat.images:
            return chat
        engine = self.chain.current()
        own = hold if hold is not None else ImageHold()
        try:
            reading = [self._read(engine, part.ref, options, mode) for part in chat.images]
            reads = await asyncio.gather(*reading)
            misses = [read for read in reads if read.cached is None]
            reservation = self.image_budget.reserve([r.cost for r in misses]) if misses else None
            if reservation is not None:
                own.add(reservation)
            decoding = []
            for read in misses:
                args = (engine, read, options, mode, reservation)
                work = self.media_pool.submit(self._decode_one, *args)
                own.track(work)  # memory in use until the thread is done, even if we give up
                decoding.append(asyncio.wrap_future(work))
            decoded = iter(await asyncio.gather(*decoding))
        finally:
            if hold is None:
                own.release()
        loaded = [(r.cached, r.stages) if r.cached is not None else next(decoded) for r in reads]
        for _, spent in loaded:
            for stage, seconds in spent.items():
                if stages is not None:
                    stages[stage] = stages.get(stage, 0.0) + seconds
        it = iter(data for data, _ in loaded)
        messages = []
        for message in chat.messages:
            parts = tuple(ImagePart(ref=p.ref, data=next(it)) if isinstance(p, ImagePart) else p for p in message.content)
            messages.append(replace(message, content=parts))
        return replace(chat, messages=tuple(messages))

    def image_memory_stats(self) -> dict[str, Any]:
        """Image-memory admission, for ``/stats``: the budget and the bytes in use (estimated
        from headers) now and at peak, images in flight and admitted, refusals (413 too large,
        429 busy), the per-image pixel cap, and image fetches running or waiting per host."""
        return {
            **self.image_budget.stats(),
            "max_image_pixels": self.policy.max_pixels,
            "fetches_per_host": self.fetch_slots.busy(),
        }

    def _image_costs(self, engine: Engine) -> ImageCosts:
        """The memory estimates for ``engine``'s family (kept per family: a fallback engine may
        serve another)."""
        name = engine.info().family
        costs = self._costs.get(name)
        if costs is None:
            from vlmlab.families import get_family

            try:
                family = get_family(name) if name else None
            except VlmlabError:
                family = None
            spec = self.chain.spec if self.chain.engine is engine else None
            costs = self._costs[name] = ImageCosts(family, spec.processor_options if spec else None)
        return costs

    async def _read(
        self, engine: Engine, ref: str | None, options: Mapping[str, Any], mode: str
    ) -> _Read:
        """:meth:`_read_one` in the thread pool that suits ``ref``."""
        work = functools.partial(self._read_one, engine, ref or "", options, mode)
        host = fetch_host(ref)
        if host is None:
            return await asyncio.wrap_future(self.media_pool.submit(work))
        loop = asyncio.get_running_loop()
        await self.fetch_slots.acquire(host)  # waits here, on the loop, not in a fetch thread
        try:
            future = self.fetch_pool.submit(work)
        except BaseException:
            self.fetch_slots.release(host)
            raise
        # The host's slot is held until the fetch thread is done, also when the request ends first.
        future.add_done_callback(lambda _: _call_soon(loop, self.fetch_slots.release, host))
        return await asyncio.wrap_future(future)

    def _read_one(self, engine: Engine, ref: str, options: Mapping[str, Any], mode: str) -> _Read:
        """One image's bytes, hash and cache lookup, and on a miss its decode plan and cost."""
        start = time.perf_counter()
        raw = read_image_bytes(ref, self.policy)
        read = _Read(raw, {"fetch": time.perf_counter() - start})
        self.metrics.observe_stage("fetch", read.stages["fetch"])
        processed = engine.lookup_processed(raw.sha256, options, mode)
        self.metrics.observe_cache("mm", processed is not None)
        if processed is not None:
            facts = (raw.sha256, len(raw.data), raw.source, processed)
            read.cached = ImageData(None, processed.width, processed.height, "cached", *facts)
            return read
        costs = self._image_costs(engine)
        read.plan = plan_decode(raw, self.policy, reduce_ok=costs.reduce_rule(options, mode))
        read.cost = costs.cost(read.plan, options)
        return read

    def _decode_one(
        self,
        engine: Engine,
        read: _Read,
        options: Mapping[str, Any],
        mode: str,
        reservation: Reservation | None,
    ) -> tuple[ImageData, dict[str, float]]:
        """Decode (or preprocess, in a worker process) one admitted image; the seconds its stages
        took (also observed in the metrics)."""
        raw, plan, stages = read.raw, read.plan, dict(read.stages)
        assert plan is not None
        start = time.perf_counter()
        # A JPEG over the pixel cap is decoded reduced, here: the workers refuse it whole.
        within_cap = plan.size[0] * plan.size[1] <= self.policy.max_pixels
        large = len(raw.data) >= self.settings.preprocess_pool_min_bytes
        task = engine.pool_task(options, mode) if large and within_cap else None
        pool = self._pool() if task is not None else None
        if pool is not None and task is not None:
            # Decode + preprocess from the bytes in a worker process (this thread just waits);
            # fast mode can decode a large JPEG at reduced scale there (Image.draft).
            family, pool_options = task
            try:
                pre = pool.submit(raw.data, family, mode, pool_options).result()  # type: ignore[arg-type]
            except BrokenProcessPool:  # a worker died (killed, out of memory): decode here
                logger.warning("the preprocessing process pool broke; starting a new one for the next image")
                with self._pool_lock:
                    if self._preprocess_pool is pool:
                        self._preprocess_pool = None
                pool.shutdown(wait=False)  # also removes results its workers left in shared memory
                pre = None
            if pre is not None:
                for stage, seconds in pre.stages.items():
                    self.metrics.observe_stage(stage, seconds)
                    stages[stage] = seconds
                if reservation is not None:  # the raster stayed in the worker: only tensors remain
                    reservation.shrink(read.cost - pre.nbytes)
                adopted = engine.adopt_preprocessed(raw.sha256, options, mode, pre)
                width, height = pre.size
                return ImageData(None, width, height, "preprocessed", raw.sha256, len(raw.data), raw.source, adopted), stages
        data = decode_image(raw, self.policy, plan)
        stages["decode"] = time.perf_counter() - start
        self.metrics.observe_stage("decode", stages["decode"])
        return data, stages

    # -- generation ----------------------------------------------------------------------------

    def response_key(self, chat: Chat, sampling: SamplingParams, options: Mapping[str, Any]) -> str | None:
        if not sampling.deterministic or not self.responses.enabled:
            return None
        messages = [
            [m.role, [p.text if isinstance(p, TextPart) else {"image": p.data.sha256 if p.data else p.ref} for p in m.content],
             [c.__dict__ for c in m.tool_calls], m.tool_call_id]
            for m in chat.messages
        ]  # fmt: skip
        engine = self.chain.current().info()
        tools = [t.__dict__ for t in chat.tools]
        return content_key(engine.engine, engine.model, messages, tools, sampling.__dict__, dict(options))

    async def choices(self, body: ChatCompletionRequest) -> AsyncIterator[tuple[int, GenerationChunk | GenerationResult]]:
        """``(choice index, item)`` for each of the request's ``n`` answers, interleaved as they come.

        With ``n`` > 1 the first answer starts alone; the others start once it has produced its
        first item, so its image work (decoding, the processor, the vision tower) is in the
        caches and they reuse it (their prefills run together). Choice ``i`` samples with
        ``seed + i`` when a seed is given. Errors before the first item are plain exceptions."""
        n = body.n or 1
        if n == 1:
            single = self.stream(body)
            try:  # closed here, at once, when the caller closes this: its images are released
                async for item in single:
                    yield 0, item
            finally:
                await single.aclose()
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        started = asyncio.Event()

        async def run(index: int) -> None:
            # Streamed inside even when the client is not: the first answer's first token (after
            # its image work and prefill) is what lets the others start.
            copy = body.model_copy(update={"n": 1, "seed": None if body.seed is None else body.seed + index, "stream": True})
            answer = self.stream(copy)
            try:
                async for item in answer:
                    started.set()
                    await queue.put((index, item))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                started.set()
                await queue.put((index, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                await answer.aclose()
                await queue.put((index, None))

        tasks = [asyncio.create_task(run(0))]
        try:
            await started.wait()
            tasks += [asyncio.create_task(run(i)) for i in range(1, n)]
            running = n
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stream(self, body: ChatCompletionRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        """The answer as a stream (see :meth:`_stream`); with tools offered, an answer that calls
        them ends in a result with ``tool_calls`` and its call text is not streamed as content."""
        tools = body.offered_tools() if body.tools else ()
        items = self._stream(body)
        if not tools or body.tool_choice_name() == "none":
            try:
                async for item in items:
                    yield item
            finally:
                await items.aclose()
            return
        held: list[GenerationChunk] = []  # text that may still turn out to be a call
        text = ""
        try:
            async for item in items:
                if isinstance(item, GenerationChunk):
                    text += item.text
                    if might_be_calls(text):
                        held.append(item)
                        continue
                    if held:
                        yield GenerationChunk("".join(c.text for c in held) + item.text, sum(c.token_count for c in held) + item.token_count)
                        held = []
                        continue
                    yield item
                    continue
                parsed = parse_tool_calls(item.text, tools) if item.tool_calls is None and item.finish_reason == "stop" else None
                if parsed is not None:
                    content, calls = parsed
                    item = replace(item, text=content, tool_calls=calls, finish_reason="tool_calls")
                elif item.tool_calls:
                    item = replace(item, finish_reason="tool_calls")
                elif held:  # not a call after all: the text that was held back
                    yield GenerationChunk("".join(c.text for c in held), sum(c.token_count for c in held))
                yield item
        finally:
            await items.aclose()

    async def _stream(self, body: ChatCompletionRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        """The whole pipeline as one stream; errors before the first item are plain exceptions.

        The request deadline covers everything, image fetching included (504 after it).
        """
        start = time.perf_counter()
        deadline = start + self.settings.request_timeout_s
        chat, sampling, options, mode = self.parse(body)
        parse_s = time.perf_counter() - start
        self._admit()
        images = ImageHold()  # the decoded images' memory, given back when the request ends
        try:
            pre = time.perf_counter()
            media_stages: dict[str, float] = {"parse": parse_s}
            loading = self.load_images(chat, options, mode, media_stages, images)
            chat = await _before(deadline, loading, self.settings.request_timeout_s)
            media_s = time.perf_counter() - pre
            key = self.response_key(chat, sampling, {**options, "preprocess_mode": mode})
            if key is not None:
                cached = self.responses.get(key)
                self.metrics.observe_cache("response", cached is not None)
                if cached is not None:
                    timings = replace(cached.timings, response_cache_hit=True, queue_s=0.0, total_s=time.perf_counter() - start)
                    result = replace(cached, timings=timings)
                    if result.text:
                        yield GenerationChunk(result.text, result.completion_tokens, logprobs=result.logprobs)
                    self.metrics.observe_result(result, time.perf_counter() - start)
                    yield result
                    return
            items = self._generate(GenerationRequest(chat, sampling, options, preprocess_mode=mode, stream=bool(body.stream)), start, media_s)
            try:
                while True:
                    try:
                        item = await _before(deadline, anext(items), self.settings.request_timeout_s)
                    except StopAsyncIteration:
                        break
                    if isinstance(item, GenerationResult):
                        # the server's own stages (fetch, decode, the pool's) beside the engine's
                        for stage, seconds in media_stages.items():
                            item.timings.stages[stage] = item.timings.stages.get(stage, 0.0) + seconds
                        if key is not None and item.finish_reason in ("stop", "length"):
                            self.responses.put(key, item)
                    yield item
            finally:
                await items.aclose()
        finally:
            images.release()
            self.active -= 1

    def _admit(self) -> None:
        limit = self.settings.max_concurrency + self.settings.max_queue
        if self.active >= limit:
            raise OverloadedError(f"the server is busy ({self.active} requests in flight, limit {limit}); retry shortly", retry_after=1.0)
        self.active += 1

    async def _generate(self, request: GenerationRequest, start: float, media_s: float) -> AsyncIterator[GenerationChunk | GenerationResult]:
        waited = time.perf_counter()
        async with self._engine_slots:
            queue_s = time.perf_counter() - waited
            engine = self.chain.current()
            self.in_engine += 1
            engine_start = time.perf_counter()
            try:
                async for item in engine.generate(request):
                    if isinstance(item, GenerationResult):
                        t = item.timings
                        t.stages["engine"] = time.perf_counter() - engine_start
                        t.stages["slot_wait"] = queue_s
                        t.queue_s = (t.queue_s or 0.0) + queue_s
                        t.preprocess_s = (t.preprocess_s or 0.0) + media_s
                        t.ttft_s = (t.ttft_s or 0.0) + (waited - start) + queue_s
                        t.total_s = time.perf_counter() - start
                        for stage, seconds in t.stages.items():
                            if stage not in NOT_PER_IMAGE:  # the per-image preprocessing stages
                                self.metrics.observe_stage(stage, seconds)
                        self.metrics.observe_result(item, t.total_s)
                        # Here, not after the loop: the caller closes this generator once it has
                        # the result, so code after the loop does not run.
                        self.chain.record_success()
                    yield item
            except VlmlabError as exc:
                if isinstance(exc, EngineError) or exc.status_code >= 500:
                    await self.chain.record_failure(engine, exc)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # raised inside the engine: the engine's fault or the request's?
                logger.exception("the engine failed on a request")
                if await self.chain.record_failure(engine, exc):
                    raise BadRequestError(
                        f"the engine could not process this request ({type(exc).__name__}: {exc}); "
                        "it serves other requests normally"
                    ) from exc
                raise EngineError(f"the engine failed: {type(exc).__name__}: {exc}") from exc
            finally:
                self.in_engine -= 1

    # -- other routes --------------------------------------------------------------------------

    async def tokenize(self, body: ChatCompletionRequest) -> tuple[PromptCount, int]:
        """Prompt tokens of a chat, images included, without generating; and the context limit."""
        chat, _, options, mode = self.parse(body)
        chat = await self.load_images(chat, options, mode)
        engine = self.chain.current()
        count = await asyncio.get_running_loop().run_in_executor(None, engine.count_prompt_tokens, chat, options)
        return count, engine.info().max_model_len

    def stats(self) -> dict[str, Any]:
        summary = self.metrics.summary()
        engine = self.chain.engine
        info = engine.info() if engine else None
        healthy, why = self.chain.health()
        return {
            "model": self.settings.model_name,
            "engine": info.engine if info else None,
            "engine_model": info.model if info else None,
            "device": info.device if info else None,
            "engine_details": dict(info.details) if info else None,  # batching, data-parallel copies
            "uptime_s": round(time.time() - self.started_at, 3),
            "healthy": healthy,
            "health_reason": why,
            "requests_active": self.active,
            "requests_in_engine": self.in_engine,
            "engines_skipped": self.chain.state.skipped,
            "preprocess_cache": getattr(engine, "preprocess_cache", None) and engine.preprocess_cache.stats.to_dict(),  # type: ignore[union-attr]
            "encoder_cache": getattr(engine, "encoder_cache", None) and engine.encoder_cache.stats.to_dict(),  # type: ignore[union-attr]
            "response_cache": self.responses.stats.to_dict(),
            "image_memory": self.image_memory_stats(),
            **summary,
        }

    def _pool(self) -> Any:
        """The preprocessing process pool, started on first use (``None`` when turned off)."""
        workers = self.settings.preprocess_workers
        if workers == 0:
            return None
        with self._pool_lock:
            if self._preprocess_pool is None:
                from vlmlab.preprocess import PreprocessPool

                self._preprocess_pool = PreprocessPool(workers, policy=self.policy)
            return self._preprocess_pool

    def close(self) -> None:
        self.media_pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        if self._preprocess_pool is not None:
            self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self.chain.close()
