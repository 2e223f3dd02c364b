"""The remote engine: any OpenAI-compatible endpoint as a vlmlab backend.

vLLM (``vllm serve``), SGLang, Ollama, LM Studio, mlx-vlm, Mistral's and OpenAI's APIs, or another
vlmlab server. Requests stream over one pooled ``httpx.AsyncClient`` per event loop with bounded
concurrency; 429s, 5xx answers, timeouts and refused connections are retried with exponential
backoff (honouring ``Retry-After``) as long as no text has reached the caller; a stream that
breaks after that is an :class:`EngineError`, so the server's fallback chain can hand over.
Images go out as data URLs (default; data URLs the user sent keep their original bytes, every
other image is re-encoded losslessly to PNG) or, with ``send_images_as: url``, http(s) URLs are
forwarded for the remote to fetch.

Usage::

    vllm serve Qwen/Qwen2-VL-7B-Instruct --port 8001
    vlmlab chat "What is in the image?" -i cat.jpg --engine remote \\
        --model Qwen/Qwen2-VL-7B-Instruct --base-url http://localhost:8001/v1
    vlmlab serve --engine remote,hf --model nano --base-url http://gpu-box:8000/v1
    vlmlab chat "Describe it" -i cat.jpg --engine remote --model pixtral-12b-2409 \\
        --base-url https://api.mistral.ai/v1          # key from MISTRAL_API_KEY

Settings come from ``EngineSpec.extra`` (see :class:`~vlmlab.engines.remote.wire.RemoteSettings`).
Prompt token counts are exact when the remote is a vlmlab server (its ``/tokenize``), otherwise
estimated with the family's image-token rule (``capabilities.exact_token_counts`` says which).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from vlmlab.cache import LRUCache
from vlmlab.config import EngineSpec
from vlmlab.engines.base import (
    FEATURES,
    Capabilities,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptCount,
)
from vlmlab.engines.images import encode_image
from vlmlab.engines.remote.wire import (
    RemoteSettings,
    RemoteUsage,
    ToolCallBuffer,
    estimate_prompt_tokens,
    image_needs_encoding,
    openai_messages,
    parse_event,
    parse_logprobs,
    parse_usage,
    remote_error,
    retry_after_s,
    sampling_fields,
    sse_events,
    status_of,
    tool_fields,
)
from vlmlab.families import Family, get_family
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, Timings, TokenLogprob
from vlmlab.protocol.errors import (
    EngineError,
    EngineUnavailableError,
    NotFoundError,
    OverloadedError,
    VlmlabError,
)

logger = logging.getLogger(__name__)

ENCODED_CACHE_BYTES = 64 * 2**20  # data URLs of re-encoded images, keyed by content hash
_FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error", "eos": "stop",
           "tool_calls": "stop", "content_filter": "stop", "function_call": "stop"}  # fmt: skip


class _Retry(Exception):
    """An attempt failed in a way worth retrying; ``error`` is what the caller gets at the end."""

    def __init__(self, error: VlmlabError, retry_after: float | None = None, free: bool = False):
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after
        self.free = free  # a protocol downgrade (no stream_options): does not use up a retry


@dataclass
class Circuit:
    """Consecutive failed requests; open (unhealthy, failing fast) for a cooldown past a limit."""

    threshold: int
    cooldown_s: float
    consecutive: int = 0
    opened_at: float | None = None
    last_error: str = ""

    def is_open(self) -> bool:
        return self.opened_at is not None and time.monotonic() - self.opened_at < self.cooldown_s

    def success(self) -> None:
        self.consecutive, self.opened_at = 0, None

    def failure(self, reason: str) -> None:
        self.consecutive += 1
        self.last_error = reason
        if self.consecutive >= self.threshold:
            self.opened_at = time.monotonic()  # (re)open: a failed half-open trial restarts it


@dataclass
class _Attempt:
    """What one attempt received."""

    text: list[str] = field(default_factory=list)
    chunks: int = 0
    first_s: float | None = None
    last_s: float | None = None
    finish: str | None = None
    done: bool = False
    usage: RemoteUsage | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: ToolCallBuffer = field(default_factory=ToolCallBuffer)

    def add(self, text: str, logprobs: tuple[TokenLogprob, ...] | None = None) -> GenerationChunk:
        now = time.perf_counter()
        self.first_s = self.first_s or now
        self.last_s = now
        self.chunks += 1
        self.text.append(text)
        if logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *logprobs]
        return GenerationChunk(text, len(logprobs) if logprobs else 1, logprobs=logprobs)


@dataclass
class _LoopState:
    client: httpx.AsyncClient
    slots: asyncio.Semaphore
    closer: AsyncIterator[None] | None = None


async def _close_with_loop(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """Parked at its ``yield`` for the loop's lifetime: ``asyncio.run`` (and uvicorn) close
    every live async generator before closing the loop (``loop.shutdown_asyncgens``), so the
    pool's sockets are closed on their own loop even when nobody calls :meth:`close` in time."""
    try:
        yield
    finally:
        await client.aclose()


class RemoteEngine(Engine):
    """A model served by an OpenAI-compatible server. Create with :meth:`load`."""

    name = "remote"
    # Every answer-shaping field is forwarded; the upstream server honours it or answers 400.
    capabilities = Capabilities(streaming=True, batching=True, max_images=8, exact_token_counts=False, features=FEATURES)

    def __init__(
        self,
        spec: EngineSpec,
        settings: RemoteSettings,
        card: Mapping[str, Any],
        client: httpx.Client,
        exact_counts: bool,
        load_s: float,
    ):
        self.spec = spec
        self.settings = settings
        self.card = dict(card)
        self.model_id = str(card.get("id", spec.model))
        self.sync_client = client
        self.load_s = load_s
        self.family = self._family()
        self.max_model_len = self._max_model_len()
        family_images = self.family.max_images if self.family else 8
        self.max_images = settings.max_images or _positive(card.get("max_images")) or family_images
        self.capabilities = replace(  # type: ignore[misc]  # per instance: depends on the remote
            type(self).capabilities, max_images=self.max_images, exact_token_counts=exact_counts
        )
        self.circuit = Circuit(settings.circuit_failures, settings.circuit_cooldown_s)
        self.encoded: LRUCache[str] = LRUCache(ENCODED_CACHE_BYTES, sizeof=len, name="remote-images")
        self.counters = {"requests": 0, "attempts": 0, "retries": 0, "failures": 0, "cancelled": 0}
        self._stream_options = True  # cleared when the remote rejects stream_options
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._closed = False

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: EngineSpec) -> RemoteEngine:
        """Check that ``base_url`` answers ``/v1/models`` and serves ``spec.model``.

        Raises:
            ConfigError: a missing or invalid setting.
            EngineUnavailableError: the server cannot be reached or does not answer the listing.
            AuthenticationError: it refused the API key.
            NotFoundError: it does not serve ``spec.model`` (listing what it serves).
        """
        start = time.perf_counter()
        settings = RemoteSettings.from_spec(spec)
        headers = {"User-Agent": "vlmlab-remote"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        client = httpx.Client(headers=headers, timeout=_timeout(settings), follow_redirects=True)
        try:
            cards = cls._list_models(client, settings)
            card = cls._pick(cards, spec.model, settings.base_url)
            exact = card.get("owned_by") == "vlmlab" and cls._probe_tokenize(client, settings, str(card["id"]))
        except BaseException:
            client.close()
            raise
        return cls(spec, settings, card, client, exact, time.perf_counter() - start)

    @staticmethod
    def _list_models(client: httpx.Client, settings: RemoteSettings) -> list[dict[str, Any]]:
        url = f"{settings.base_url}/models"
        try:
            response = client.get(url, timeout=min(settings.timeout_s, 30.0))
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(
                f"the remote server at {settings.base_url} does not answer ({type(exc).__name__}: {exc}); "
                "check --base-url and that the server is running"
            ) from exc
        if response.status_code >= 400:
            error = remote_error(response.status_code, _json(response), response.text, settings.base_url)
            if isinstance(error, EngineError | NotFoundError):  # no listing: not an OpenAI server
                raise EngineUnavailableError(
                    f"{url} answered {response.status_code} ({error.message}); is {settings.base_url} "
                    "an OpenAI-compatible server (vllm serve, SGLang, Ollama, LM Studio, vlmlab)?"
                )
            raise error
        payload = _json(response)
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise EngineUnavailableError(f"{url} did not answer an OpenAI model list: {response.text[:200]!r}")
        return [card for card in data if isinstance(card, dict) and card.get("id")]

    @staticmethod
    def _pick(cards: list[dict[str, Any]], model: str, base_url: str) -> dict[str, Any]:
        for card in cards:
            # Ollama lists "llava:latest" for a model pulled as "llava".
            if card["id"] == model or card["id"] == f"{model}:latest":
                return card
        served = ", ".join(str(c["id"]) for c in cards[:50]) or "nothing"
        raise NotFoundError(f"the remote server {base_url} does not serve {model!r}; it serves: {served}", param="model")

    @staticmethod
    def _probe_tokenize(client: httpx.Client, settings: RemoteSettings, model: str) -> bool:
        """Whether the remote's ``/tokenize`` counts image tokens (a vlmlab server does)."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        try:
            response = client.post(f"{settings.root_url}/tokenize", json=body, timeout=min(settings.timeout_s, 30.0))
        except httpx.HTTPError:
            return False
        payload = _json(response)
        return response.status_code == 200 and isinstance(payload, dict) and "image_tokens" in payload

    def _family(self) -> Family | None:
        for name in (self.card.get("family"), self.spec.model, self.card.get("root")):
            if isinstance(name, str) and name:
                try:
                    return get_family(name)
                except VlmlabError:
                    continue
        return None

    def _max_model_len(self) -> int:
        """Explicit setting, else the listing (vLLM/vlmlab ``max_model_len``, Mistral
        ``max_context_length``, OpenRouter ``context_length``), else the family checkpoint's;
        0 when unknown."""
        listed = (_positive(self.card.get(k)) for k in ("max_model_len", "max_context_length", "context_length"))
        found = self.settings.max_model_len or next((v for v in listed if v), None)
        if found:
            return found
        if self.family is not None:
            try:
                return self.family.checkpoint(self.spec.model).max_model_len
            except VlmlabError:
                return self.family.checkpoint().max_model_len
        return 0

    # -- requests ------------------------------------------------------------------------------

    async def _loop_state(self) -> _LoopState:
        """The async client and concurrency slots of the running loop (httpx async clients and
        semaphores belong to one loop; ``vlmlab chat`` and tests run several loops in turn)."""
        if self._closed:
            raise EngineUnavailableError("the remote engine is closed")
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.get(loop)
            if state is not None:
                return state
            size = self.settings.max_concurrency
            client = httpx.AsyncClient(
                headers=self.sync_client.headers,
                timeout=_timeout(self.settings),
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                follow_redirects=True,
            )
            state = _LoopState(client, asyncio.Semaphore(size), _close_with_loop(client))
            self._loops[loop] = state
        await anext(state.closer)  # type: ignore[arg-type]  # park it (registers it with the loop)
        return state

    def _encode_missing(self, chat: Chat) -> dict[str, str]:
        """Data URLs for the images that need re-encoding, by content hash (cached)."""
        encoded: dict[str, str] = {}
        for part in chat.images:
            if part.data is None or part.data.sha256 in encoded:
                continue
            if not image_needs_encoding(part, self.settings.send_images_as):
                continue
            url = self.encoded.get(part.data.sha256)
            if url is None:
                url = encode_image(part)
                self.encoded.put(part.data.sha256, url)
            encoded[part.data.sha256] = url
        return encoded

    def _body(self, chat: Chat, encoded: Mapping[str, str], options: Mapping[str, Any]) -> dict[str, Any]:
        messages = openai_messages(chat, self.settings.send_images_as, encoded)
        body: dict[str, Any] = {"model": self.model_id, "messages": messages}
        merged = {**self.spec.processor_options, **options}
        if merged:
            body["mm_processor_kwargs"] = merged  # vLLM's and vlmlab's per-request processor options
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        start = time.perf_counter()
        if self.circuit.is_open():
            raise EngineUnavailableError(
                f"the remote server {self.settings.base_url} failed {self.circuit.consecutive} requests in a row "
                f"(last: {self.circuit.last_error}); not trying again for {self.settings.circuit_cooldown_s:g} s"
            )
        state = await self._loop_state()
        chat = request.chat
        encoded: dict[str, str] = {}
        if chat.images:  # PNG encoding of a large image takes a while: off the event loop
            encoded = await asyncio.get_running_loop().run_in_executor(None, self._encode_missing, chat)
        encode_s = time.perf_counter() - start
        body = {**self._body(chat, encoded, request.processor_options), **sampling_fields(request.sampling), **tool_fields(chat, request.sampling)}
        self.counters["requests"] += 1
        waited = time.perf_counter()
        async with state.slots:
            queue_s = time.perf_counter() - waited
            attempt = _Attempt()
            try:
                retries = 0
                while True:
                    attempt = _Attempt()
                    self.counters["attempts"] += 1
                    try:
                        async with contextlib.aclosing(self._attempt(state.client, body, attempt)) as items:
                            async for chunk in items:
                                yield chunk
                        break
                    except _Retry as retry:
                        if retry.free:
                            continue
                        if retries == self.settings.max_retries:
                            raise self._exhausted(retry, retries + 1) from retry
                        delay = self._delay(retries, retry.retry_after)
                        if delay is None:  # Retry-After beyond what we wait for
                            raise retry.error from retry
                        retries += 1
                        self.counters["retries"] += 1
                        logger.info(
                            "remote %s: %s; retry %d in %.2f s", self.settings.base_url, retry.error.message, retries, delay
                        )
                        await asyncio.sleep(delay)
            except EngineError as exc:
                self.counters["failures"] += 1
                self.circuit.failure(exc.message)
                raise
            except VlmlabError:
                self.circuit.success()  # it answered: a client error or a rate limit, not a dead remote
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self.counters["cancelled"] += 1
                raise
        self.circuit.success()
        yield self._result(chat, request, attempt, start, queue_s, encode_s)

    def _exhausted(self, retry: _Retry, attempts: int) -> VlmlabError:
        if isinstance(retry.error, OverloadedError):
            return retry.error
        return EngineError(f"{retry.error.message} (gave up after {attempts} attempt(s))")

    def _delay(self, number: int, retry_after: float | None) -> float | None:
        if retry_after is not None:
            return retry_after if retry_after <= self.settings.max_retry_wait_s else None
        backoff = min(self.settings.max_backoff_s, self.settings.backoff_s * 2**number)
        return backoff * random.uniform(0.8, 1.2)  # jitter: clients that failed together spread out

    async def _attempt(
        self, client: httpx.AsyncClient, body: dict[str, Any], attempt: _Attempt
    ) -> AsyncIterator[GenerationChunk]:
        """One request; raises :class:`_Retry` for retryable failures before any text."""
        url = f"{self.settings.base_url}/chat/completions"
        where = self.settings.base_url
        payload = {**body, "stream": self.settings.stream}
        if self.settings.stream and self._stream_options:
            payload["stream_options"] = {"include_usage": True}
        try:
            async with client.stream("POST", url, json=payload) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._raise_status(response)
                if not self.settings.stream:
                    await response.aread()
                    self._take_response(_json(response), response.text, attempt)
                    if attempt.text and attempt.text[0]:
                        count = attempt.usage.completion_tokens if attempt.usage else None
                        yield GenerationChunk(attempt.text[0], count or 1)
                    return
                async for event, data in sse_events(response.aiter_lines()):
                    if data.strip() == "[DONE]":
                        attempt.done = True
                        break
                    chunk = self._take_event(event, parse_event(data, where), attempt)
                    if chunk is not None:
                        yield chunk
        except httpx.TimeoutException as exc:
            reason = f"the remote server {where} sent nothing for {self.settings.timeout_s:g} s ({type(exc).__name__})"
            if attempt.chunks:
                raise EngineError(f"{reason} after {attempt.chunks} chunk(s) of the answer") from exc
            raise _Retry(EngineError(reason)) from exc
        except httpx.TransportError as exc:
            what = "cannot be reached" if isinstance(exc, httpx.ConnectError) else "dropped the connection"
            reason = f"the remote server {where} {what} ({type(exc).__name__}: {exc})"
            if attempt.chunks:
                raise EngineError(f"{reason} after {attempt.chunks} chunk(s) of the answer") from exc
            raise _Retry(EngineError(reason)) from exc
        except httpx.HTTPError as exc:
            raise EngineError(f"the request to {where} failed ({type(exc).__name__}: {exc})") from exc
        if self.settings.stream and not attempt.done and attempt.finish is None:
            reason = f"the remote server {where} ended the stream before the answer finished"
            if attempt.chunks:
                raise EngineError(f"{reason} ({attempt.chunks} chunk(s) received)")
            raise _Retry(EngineError(reason))

    def _raise_status(self, response: httpx.Response) -> None:
        """Raise the mapped error of an error status: :class:`_Retry` for 408 / 429 / 5xx."""
        status = response.status_code
        wait = retry_after_s(response.headers.get("retry-after"))
        error = remote_error(status, _json(response), response.text, self.settings.base_url, wait)
        if status == 400 and self._stream_options and "stream_options" in error.message:
            self._stream_options = False  # an old server: ask again without it; usage may be missing
            raise _Retry(error, free=True)
        if status in (408, 429) or (status >= 500 and status != 501):
            raise _Retry(error if status != 408 else EngineError(error.message), retry_after=wait)
        raise error

    def _take_event(self, event: str, obj: dict[str, Any], attempt: _Attempt) -> GenerationChunk | None:
        """Record one stream event; the text chunk it carries, if any."""
        if event == "error" or obj.get("error"):
            error = obj.get("error", obj)
            error = error if isinstance(error, dict) else {"message": str(error)}
            raise remote_error(status_of(error), {"error": error}, str(error), self.settings.base_url)
        attempt.usage = parse_usage(obj) or attempt.usage
        chunk = None
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            logprobs = parse_logprobs(choice)
            if isinstance(delta, dict):
                attempt.tool_calls.add(delta.get("tool_calls"))
            if (isinstance(text, str) and text) or logprobs:
                chunk = attempt.add(text if isinstance(text, str) else "", logprobs)
            if choice.get("finish_reason"):
                attempt.finish = str(choice["finish_reason"])
        return chunk

    def _take_response(self, obj: Any, text: str, attempt: _Attempt) -> None:
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list) or not obj["choices"]:
            raise EngineError(f"the remote server {self.settings.base_url} sent an unexpected answer: {text[:200]!r}")
        choice = obj["choices"][0]
        message = choice.get("message") or {}
        attempt.add(str(message.get("content") or ""), parse_logprobs(choice))
        attempt.tool_calls.add([{**c, "index": i} for i, c in enumerate(message.get("tool_calls") or ()) if isinstance(c, dict)])
        attempt.finish = str(choice.get("finish_reason") or "stop")
        attempt.done = True
        attempt.usage = parse_usage(obj)

    def _result(
        self, chat: Chat, request: GenerationRequest, attempt: _Attempt, start: float, queue_s: float, encode_s: float
    ) -> GenerationResult:
        usage = attempt.usage or RemoteUsage()
        estimate: tuple[int, int, tuple[int, ...]] | None = None
        if usage.prompt_tokens is None or usage.image_tokens is None:
            try:
                options = {**self.spec.processor_options, **request.processor_options}
                estimate = estimate_prompt_tokens(chat, self.family, options)
            except VlmlabError as exc:  # the remote accepted what our rule rejects: keep going
                logger.warning("remote %s: cannot estimate prompt tokens: %s", self.model_id, exc.message)
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else (estimate[0] if estimate else 0)
        image = usage.image_tokens if usage.image_tokens is not None else (estimate[1] if estimate else 0)
        end = time.perf_counter()
        first = attempt.first_s or end
        timings = Timings(
            queue_s=queue_s,
            preprocess_s=encode_s,
            ttft_s=first - start,
            decode_s=(attempt.last_s or first) - first,
            total_s=end - start,
            load_s=self.load_s,
            stages={"encode": encode_s} if encode_s > 1e-3 else {},
        )
        return GenerationResult(
            text="".join(attempt.text),
            finish_reason=_FINISH.get(attempt.finish or "stop", "stop"),  # type: ignore[arg-type]
            prompt_tokens=prompt,
            image_tokens=min(image, prompt) if prompt else image,
            completion_tokens=usage.completion_tokens if usage.completion_tokens is not None else attempt.chunks,
            timings=timings,
            model=self.model_id,
            engine=self.name,
            logprobs=tuple(attempt.logprobs or ()) if request.sampling.logprobs else None,
            tool_calls=attempt.tool_calls.result(),
        )

    # -- counting, info, health ----------------------------------------------------------------

    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        """The remote vlmlab server's exact count (``/tokenize``), else the family-rule estimate."""
        options = dict(processor_options or {})
        if not self.capabilities.exact_token_counts:
            options = {**self.spec.processor_options, **options}
            total, image, per_image = estimate_prompt_tokens(chat, self.family, options)
            return PromptCount(total, image, per_image)
        body = self._body(chat, self._encode_missing(chat), options)
        try:
            response = self.sync_client.post(f"{self.settings.root_url}/tokenize", json=body)
        except httpx.HTTPError as exc:
            raise EngineError(
                f"the remote server {self.settings.base_url} did not answer /tokenize ({type(exc).__name__}: {exc})"
            ) from exc
        payload = _json(response)
        if response.status_code >= 400:
            raise remote_error(response.status_code, payload, response.text, self.settings.base_url)
        if not isinstance(payload, dict) or not isinstance(payload.get("prompt_tokens"), int):
            raise EngineError(f"the remote /tokenize answered without prompt_tokens: {response.text[:200]!r}")
        per_image = tuple(int(n) for n in payload.get("per_image_tokens") or ())
        return PromptCount(payload["prompt_tokens"], int(payload.get("image_tokens") or 0), per_image)

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine=self.name,
            model=self.model_id,
            family=self.family.name if self.family else None,
            max_model_len=self.max_model_len,
            max_images=self.max_images,
            device="remote",
            dtype=str(self.card.get("dtype", "unknown")),
            load_s=self.load_s,
            details={
                "base_url": self.settings.base_url,
                "remote_engine": self.card.get("engine"),
                "owned_by": self.card.get("owned_by"),
                "send_images_as": self.settings.send_images_as,
                "exact_token_counts": self.capabilities.exact_token_counts,
                "max_model_len_known": self.max_model_len > 0,
                "consecutive_failures": self.circuit.consecutive,
                "circuit_open": self.circuit.is_open(),
                **self.counters,
            },
        )

    def health(self) -> tuple[bool, str]:
        """Unhealthy while the circuit is open (too many consecutive failed requests)."""
        if self._closed:
            return False, "the remote engine is closed"
        if self.circuit.is_open():
            return False, (
                f"the remote server {self.settings.base_url} failed {self.circuit.consecutive} requests "
                f"in a row; last: {self.circuit.last_error}"
            )
        return True, "ok" if not self.circuit.consecutive else f"ok ({self.circuit.consecutive} recent failure(s))"

    def close(self) -> None:
        """Close the connection pools: on their own loop when it still runs, best effort else."""
        if self._closed:
            return
        self._closed = True
        self.sync_client.close()
        with self._lock:
            states = list(self._loops.items())
            self._loops.clear()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, state in states:
            if loop.is_closed():
                continue  # its sockets were torn down with the loop
            if loop is current:
                loop.create_task(state.client.aclose())
            elif loop.is_running():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(state.client.aclose(), loop).result(timeout=5)
            else:
                loop.run_until_complete(state.client.aclose())


def _timeout(settings: RemoteSettings) -> httpx.Timeout:
    return httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 10.0))


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _positive(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
