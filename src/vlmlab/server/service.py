"""The work behind the routes: validate, load images off the loop, admit, generate, cache, count.

Order of work for a chat request (cheap checks first, so bad input never costs a decode):
parse -> image count -> fetch bytes (thread pool) -> content hash -> preprocessing-cache lookup ->
decode on a miss (thread pool) -> response-cache lookup -> admission (429 when full) ->
engine (which checks the context with the family rule before preprocessing) -> usage and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmlab.cache import LRUCache, content_key
from vlmlab.config import ServerSettings
from vlmlab.engines import Engine, GenerationRequest, PromptCount
from vlmlab.media import MediaPolicy, decode_image, read_image_bytes
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    GenerationResult,
    ImageData,
    ImagePart,
    Message,
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
from vlmlab.server.engines import EngineChain
from vlmlab.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def media_policy(settings: ServerSettings) -> MediaPolicy:
    root = settings.allowed_local_media_path
    return MediaPolicy(
        allowed_local_root=Path(root) if root else None,
        allowed_domains=frozenset(settings.allowed_media_domains) if settings.allowed_media_domains is not None else None,
        trusted_hosts=frozenset(settings.trusted_media_hosts),
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
    )


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

    def __init__(self, settings: ServerSettings, chain: EngineChain):
        self.settings = settings
        self.chain = chain
        self.metrics = ServerMetrics(settings.model_name)
        self.policy = media_policy(settings)
        self.media_pool = ThreadPoolExecutor(settings.media_workers, thread_name_prefix="vlmlab-media")
        self._preprocess_pool: Any = None  # PreprocessPool, started by the first large image
        self._pool_lock = threading.Lock()
        self.responses: LRUCache[GenerationResult] = LRUCache(settings.response_cache_entries, name="response")
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
        characters = sum(len(p.text) for m in chat.messages for p in m.content if isinstance(p, TextPart))
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
        self, chat: Chat, options: Mapping[str, Any], mode: str = "exact", stages: dict[str, float] | None = None
    ) -> Chat:
        """Fetch (and, on a preprocessing-cache miss, decode or preprocess) every image, in the
        worker threads (and processes); seconds per stage are summed into ``stages``."""
        if not chat.images:
            return chat
        loop = asyncio.get_running_loop()
        engine = self.chain.current()
        refs = [p.ref for p in chat.images]
        results = await asyncio.gather(
            *[loop.run_in_executor(self.media_pool, self._load_one, engine, ref, options, mode) for ref in refs]
        )
        for _, spent in results:
            for stage, seconds in spent.items():
                if stages is not None:
                    stages[stage] = stages.get(stage, 0.0) + seconds
        it = iter(data for data, _ in results)
        messages = []
        for message in chat.messages:
            parts = tuple(ImagePart(ref=p.ref, data=next(it)) if isinstance(p, ImagePart) else p for p in message.content)
            messages.append(Message(message.role, parts))
        return Chat(tuple(messages))

    def _load_one(
        self, engine: Engine, ref: str | None, options: Mapping[str, Any], mode: str = "exact"
    ) -> tuple[ImageData, dict[str, float]]:
        """One image and the seconds its stages took (also observed in the metrics)."""
        start = time.perf_counter()
        raw = read_image_bytes(ref or "", self.policy)
        fetched = time.perf_counter()
        stages = {"fetch": fetched - start}
        self.metrics.observe_stage("fetch", stages["fetch"])
        processed = engine.lookup_processed(raw.sha256, options, mode)
        self.metrics.observe_cache("mm", processed is not None)
        if processed is not None:
            data = ImageData(None, processed.width, processed.height, "cached", raw.sha256, len(raw.data), raw.source, processed)
            return data, stages
        task = engine.pool_task(options, mode) if len(raw.data) >= self.settings.preprocess_pool_min_bytes else None
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
                adopted = engine.adopt_preprocessed(raw.sha256, options, mode, pre)
                width, height = pre.size
                return ImageData(None, width, height, "preprocessed", raw.sha256, len(raw.data), raw.source, adopted), stages
        data = decode_image(raw, self.policy)
        stages["decode"] = time.perf_counter() - fetched
        self.metrics.observe_stage("decode", stages["decode"])
        return data, stages

    # -- generation ----------------------------------------------------------------------------

    def response_key(self, chat: Chat, sampling: SamplingParams, options: Mapping[str, Any]) -> str | None:
        if not sampling.deterministic or not self.responses.enabled:
            return None
        messages = [
            [m.role, [p.text if isinstance(p, TextPart) else {"image": p.data.sha256 if p.data else p.ref} for p in m.content]]
            for m in chat.messages
        ]
        engine = self.chain.current().info()
        return content_key(engine.engine, engine.model, messages, sampling.__dict__, dict(options))

    async def stream(self, body: ChatCompletionRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        """The whole pipeline as one stream; errors before the first item are plain exceptions.

        The request deadline covers everything, image fetching included (504 after it).
        """
        start = time.perf_counter()
        deadline = start + self.settings.request_timeout_s
        chat, sampling, options, mode = self.parse(body)
        self._admit()
        try:
            pre = time.perf_counter()
            media_stages: dict[str, float] = {}
            chat = await _before(deadline, self.load_images(chat, options, mode, media_stages), self.settings.request_timeout_s)
            media_s = time.perf_counter() - pre
            key = self.response_key(chat, sampling, {**options, "preprocess_mode": mode})
            if key is not None:
                cached = self.responses.get(key)
                self.metrics.observe_cache("response", cached is not None)
                if cached is not None:
                    timings = replace(cached.timings, response_cache_hit=True, queue_s=0.0, total_s=time.perf_counter() - start)
                    result = replace(cached, timings=timings)
                    if result.text:
                        yield GenerationChunk(result.text, result.completion_tokens)
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
                        t.queue_s = (t.queue_s or 0.0) + queue_s
                        t.preprocess_s = (t.preprocess_s or 0.0) + media_s
                        t.ttft_s = (t.ttft_s or 0.0) + (waited - start) + queue_s
                        t.total_s = time.perf_counter() - start
                        for stage, seconds in t.stages.items():
                            if stage != "engine":  # preprocessing stages only
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
        if self._preprocess_pool is not None:
            self._preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self.chain.close()
