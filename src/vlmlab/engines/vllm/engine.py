"""The vLLM engine: vLLM in this process, on an NVIDIA GPU (``pip install 'vlmlab[vllm]'``).

Two ways to drive it, chosen by ``extra["offline"]``:

* **async** (default; ``vlmlab serve``): vLLM's ``AsyncLLM`` on a private event-loop thread.
  Each request goes through vLLM's own chat path (``renderer.render_chat_async``: the model's
  chat template and multimodal processor, Mistral's tokenizer for native Mistral checkpoints),
  streams deltas of vLLM's cumulative output, and is aborted in vLLM when its consumer is
  cancelled (client disconnect).
* **offline** (``vlmlab chat``; :meth:`VLLMEngine.generate_batch` for evaluations): ``vllm.LLM``
  and ``LLM.chat`` over many conversations at once, printing vLLM's own progress and speed line
  (``Processed prompts: 100%| 1/1 [..., est. speed input: ... toks/s, output: ... toks/s]``).

The seed scripts, one command each::

    vlmlab chat --engine vllm --model mistralai/Pixtral-12B-2409 --image street.jpg \\
        "Describe this image in one sentence."
    vlmlab chat --engine vllm --model microsoft/Phi-3.5-vision-instruct --image street.jpg \\
        "Describe this image in one sentence."
    vlmlab serve --config pixtral-12b                      # vllm, falling back to hf
    vlmlab serve --engine vllm --model Qwen/Qwen2-VL-7B-Instruct --quantization fp8

Known checkpoint traps are data in :data:`vlmlab.engines.vllm.translate.PRESETS` (Pixtral's
native ``mistral`` tokenizer / config / weight formats, Phi-3.5-vision's remote code and
``num_crops``, ``limit_mm_per_prompt``, ``max_model_len``); ``extra`` carries any other vLLM
engine argument (``gpu_memory_utilization``, ``enforce_eager``...). Prompt tokens come from
vLLM's own rendering (exact); image tokens from the family rule, else from vLLM's multimodal
placeholder ranges. Written against vLLM 0.33 (the ``vllm.renderers`` API).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines.base import (
    FEATURES,
    Capabilities,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptCount,
)
from vlmlab.engines.sources import hub_load_plan, resolve_model
from vlmlab.engines.vllm.translate import (
    TextDelta,
    VLLMSettings,
    chat_messages,
    check_arg_names,
    data_url_image_part,
    engine_args,
    family_of,
    find_preset,
    finish_reason,
    image_tokens,
    load_error,
    max_images,
    merged_options,
    pil_image_part,
    request_error,
    rule_image_tokens,
    rule_options,
    sampling_kwargs,
    stats_timings,
    structured_outputs_kwargs,
    token_logprobs,
    unavailable_reason,
)
from vlmlab.families import Family
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, Timings
from vlmlab.protocol.errors import (
    BadRequestError,
    ContextLengthError,
    EngineUnavailableError,
    VlmlabError,
)

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    """Whether torch sees an NVIDIA GPU (False when torch itself is missing)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def device_memory_used() -> int | None:
    """Bytes in use on GPU 0 (NVML): vLLM's engine core runs in another process, so torch's
    allocator counters in this one would not see its weights and KV cache."""
    try:
        import pynvml  # nvidia-ml-py, a vLLM dependency

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # noqa: BLE001 - a missing or failing NVML only costs the figure
        return None


class _LoopThread:
    """An event loop on its own thread: ``AsyncLLM`` binds its output handler and ZMQ sockets to
    the loop it starts on, while vlmlab's callers (``asyncio.run`` per CLI call, the server's
    loop, test loops) come and go. Requests cross over with ``run_coroutine_threadsafe``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vlmlab-vllm-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class _Rendered:
    """One conversation as vLLM will run it."""

    engine_input: Any
    prompt_tokens: int
    placeholder_lengths: tuple[int, ...]
    seconds: float


def _rendered(engine_input: Any, seconds: float) -> _Rendered:
    ranges = (engine_input.get("mm_placeholders") or {}).get("image") or ()
    return _Rendered(engine_input, len(engine_input["prompt_token_ids"]), tuple(int(r.length) for r in ranges), seconds)


class VLLMEngine(Engine):
    """vLLM in this process. Create with :meth:`load`."""

    name = "vllm"
    # Tools: vLLM parses calls per model (its tool parsers), not mapped here yet (a 400 until then).
    capabilities = Capabilities(
        streaming=True, batching=True, max_images=8, cancellation=True, exact_token_counts=True,
        features=FEATURES - {"tools"},
    )

    def __init__(self, spec: EngineSpec, settings: VLLMSettings, backend: Any, loop: _LoopThread | None,
                 family: Family | None, source: str, args: Mapping[str, Any], load_s: float):  # fmt: skip
        self.spec = spec
        self.settings = settings
        self.backend = backend  # vllm.LLM (offline) or AsyncLLM
        self.loop = loop
        self.family = family
        self.source = source
        self.args = dict(args)
        self.load_s = load_s
        self.model_id = spec.model
        self.max_model_len = int(backend.model_config.max_model_len)
        self.max_images = max_images(args.get("limit_mm_per_prompt"), family)
        self.capabilities = dataclasses.replace(  # type: ignore[misc]  # per instance: the mode
            type(self).capabilities, max_images=self.max_images,
            streaming=not settings.offline, cancellation=not settings.offline,
        )  # fmt: skip
        self.counters = {"requests": 0, "cancelled": 0, "failures": 0}
        self._ids = itertools.count()
        self._offline_lock = threading.Lock()  # vllm.LLM runs one batch at a time
        self._closed = False

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: EngineSpec) -> VLLMEngine:
        """Start vLLM with ``spec.model``.

        Raises:
            EngineUnavailableError: vLLM is not installed or there is no NVIDIA GPU.
            ConfigError / NotFoundError / EngineError: settings vLLM rejects, a missing model,
                not enough GPU memory.
        """
        reason = unavailable_reason(importlib.util.find_spec("vllm") is not None, cuda_available())
        if reason:
            raise EngineUnavailableError(reason)
        start = time.perf_counter()
        settings = VLLMSettings.from_extra(spec.extra)
        source, hint = resolve_model(spec.model)
        if hub_load_plan(spec.model, source, spec.revision):
            # No Hub now: vLLM and its engine-core processes read the cached copy (they read
            # this variable when they start, as huggingface_hub does).
            os.environ["HF_HUB_OFFLINE"] = "1"
        family = family_of(source, hint)
        preset = find_preset(source, family)
        if preset.trust_remote_code and not spec.trust_remote_code:
            logger.warning("%s: running the checkpoint's own processor code (vlmlab preset: %s)", source, preset.why)
        args = engine_args(spec, source, preset)
        from vllm import AsyncEngineArgs

        check_arg_names(args, (f.name for f in dataclasses.fields(AsyncEngineArgs)))
        if not _has_renderer_api():
            import vllm

            raise EngineUnavailableError(
                f"vLLM {getattr(vllm, '__version__', '?')} predates the vllm.renderers API this engine "
                "uses; pip install -U 'vlmlab[vllm]'"
            )
        loop = None
        try:
            if settings.offline:
                from vllm import LLM

                backend = LLM(**args)
            else:
                from vllm.v1.engine.async_llm import AsyncLLM

                loop = _LoopThread()

                async def build() -> Any:  # on the loop, so AsyncLLM starts its output handler there
                    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

                backend = loop.call(build())
        except Exception as exc:
            if loop is not None:
                loop.stop()
            raise load_error(exc, source) from exc
        logger.info("vLLM loaded %s (%s mode) in %.1f s", source, "offline" if settings.offline else "async", time.perf_counter() - start)
        return cls(spec, settings, backend, loop, family, source, args, time.perf_counter() - start)

    # -- prompts -------------------------------------------------------------------------------

    def _check_images(self, chat: Chat) -> None:
        if len(chat.images) > self.max_images:
            raise BadRequestError(
                f"At most {self.max_images} image(s) may be provided in one request, got {len(chat.images)}; "
                "raise limit_mm_per_prompt in extra to allow more",
                param="messages",
            )

    def _messages(self, chat: Chat) -> list[dict[str, Any]]:
        part = pil_image_part if self.settings.send_images_as == "pil" else data_url_image_part
        return chat_messages(chat, part)

    def _chat_params(self, options: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any] | None]:
        """vLLM's ChatParams / TokenizeParams / prompt extras, as ``LLM.chat`` builds them
        (vllm/entrypoints/common/offline.py ``_preprocess_chat``)."""
        from vllm.renderers import ChatParams

        renderer = self.backend.renderer
        mistral = type(renderer.tokenizer).__name__ == "MistralTokenizer"  # it tokenizes the chat itself
        template_kwargs = {"add_generation_prompt": True, "continue_final_message": False, "tokenize": mistral}
        mm_kwargs = dict(options) or None
        params = ChatParams(chat_template_kwargs=template_kwargs, mm_processor_kwargs=mm_kwargs)
        # The chat template writes BOS itself; the online and offline chat paths both pass this.
        tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        return params, tok_params, ({"mm_processor_kwargs": mm_kwargs} if mm_kwargs else None)

    async def _render(self, messages: list[dict[str, Any]], options: Mapping[str, Any], skip_cache: bool) -> _Rendered:
        start = time.perf_counter()
        params, tok_params, extras = self._chat_params(options)
        _, (engine_input,) = await self.backend.renderer.render_chat_async(
            [messages], params, tok_params, prompt_extras=extras, skip_mm_cache=skip_cache
        )
        return _rendered(engine_input, time.perf_counter() - start)

    def _render_sync(self, messages: list[dict[str, Any]], options: Mapping[str, Any]) -> _Rendered:
        start = time.perf_counter()
        params, tok_params, extras = self._chat_params(options)
        # skip_mm_cache: a count that is never sent must not mark images as cached in the engine.
        _, (engine_input,) = self.backend.renderer.render_chat(
            [messages], params, tok_params, prompt_extras=extras, skip_mm_cache=True
        )
        return _rendered(engine_input, time.perf_counter() - start)

    def _image_counts(self, chat: Chat, options: Mapping[str, Any], placeholders: Sequence[int]) -> tuple[int, ...]:
        sizes = [(p.data.width, p.data.height) for p in chat.images if p.data is not None]
        rule = rule_image_tokens(self.family, sizes, rule_options(self.family, self.source, options, self.args))
        return image_tokens(rule, placeholders)

    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        """vLLM's own rendering of the chat (template, tokenizer, image expansion)."""
        self._check_images(chat)
        options = merged_options(self.spec.processor_options, processor_options)
        messages = self._messages(chat)
        try:
            if self.loop is not None:
                rendered = self.loop.call(self._render(messages, options, skip_cache=True))
            else:
                with self._offline_lock:
                    rendered = self._render_sync(messages, options)
        except Exception as exc:
            raise request_error(exc) from exc
        per_image = self._image_counts(chat, options, rendered.placeholder_lengths)
        return PromptCount(rendered.prompt_tokens, sum(per_image), per_image)

    def _check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages, the "
                "images or the completion."
            )

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kwargs = sampling_kwargs(request.sampling)
        structured = structured_outputs_kwargs(request.sampling.structured)
        if structured is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
        return SamplingParams(**kwargs, output_kind=RequestOutputKind.CUMULATIVE)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        if self._closed:
            raise EngineUnavailableError("the vLLM engine is closed")
        self.counters["requests"] += 1
        if self.loop is None:
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: self.generate_batch([request])[0])
            if result.text:
                yield GenerationChunk(result.text, result.completion_tokens, result.finish_reason)
            yield result
            return
        start = time.perf_counter()
        chat, sampling = request.chat, request.sampling
        self._check_images(chat)
        options = merged_options(self.spec.processor_options, request.processor_options)
        try:
            rendered = await asyncio.wrap_future(self.loop.submit(self._render(self._messages(chat), options, skip_cache=False)))
        except VlmlabError:
            raise
        except Exception as exc:
            raise request_error(exc) from exc
        self._check_length(rendered.prompt_tokens, sampling.max_tokens)
        request_id = f"{request.request_id or 'vlmlab'}-{next(self._ids)}"  # unique inside vLLM
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        future = self.loop.submit(self._pump(rendered.engine_input, self._sampling(request), request_id, caller, queue))
        delta = TextDelta()
        first = last = None
        final: Any = None
        sent_logprobs = 0
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    self.counters["failures"] += 1
                    raise request_error(value) from value
                if kind == "done":
                    break
                final = value
                piece, new_tokens = delta.update(value["text"], value["tokens"])
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    logprobs = value["logprobs"][sent_logprobs:] if value["logprobs"] is not None else None
                    sent_logprobs += len(logprobs or ())
                    yield GenerationChunk(piece, new_tokens, logprobs=logprobs or None)
        except (asyncio.CancelledError, GeneratorExit):
            future.cancel()  # cancels AsyncLLM.generate on its loop, which aborts the request
            self.counters["cancelled"] += 1
            raise
        if final is None:
            raise request_error(RuntimeError(f"vLLM ended request {request_id} without output"))
        end = time.perf_counter()
        per_image = self._image_counts(chat, options, rendered.placeholder_lengths)
        first = first or end
        timings = Timings(
            preprocess_s=rendered.seconds,
            ttft_s=first - start,
            decode_s=(last or first) - first,
            total_s=end - start,
            load_s=self.load_s,
            peak_memory_bytes=device_memory_used(),
            **{k: v for k, v in final["stats"].items() if k in ("queue_s", "prefill_s")},
        )
        yield GenerationResult(
            text=final["text"],
            finish_reason=finish_reason(final["finish_reason"]),
            prompt_tokens=rendered.prompt_tokens,
            image_tokens=sum(per_image),
            completion_tokens=final["tokens"],
            timings=timings,
            model=self.model_id,
            engine=self.name,
            logprobs=final["logprobs"],
        )

    async def _pump(self, engine_input: Any, params: Any, request_id: str, caller: asyncio.AbstractEventLoop,
                    queue: asyncio.Queue[tuple[str, Any]]) -> None:  # fmt: skip
        """On the engine loop: run one request, hand each cumulative output to the caller."""

        def put(kind: str, value: Any) -> None:
            if not caller.is_closed():
                caller.call_soon_threadsafe(queue.put_nowait, (kind, value))

        try:
            top = params.logprobs  # vLLM's: None, or the alternatives per token
            async for output in self.backend.generate(engine_input, params, request_id):
                put("output", _snapshot(output, top))
            put("done", None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller, translated there
            put("error", exc)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Answer many requests at once and return their results in order (blocking: call it from
        a worker thread when an event loop runs). Offline mode runs ``LLM.chat`` over them (one
        call per distinct set of processor options, vLLM's tqdm line on stderr); async mode sends
        them to the running engine together."""
        if self.loop is not None:
            from vlmlab.engines.base import complete

            async def run_all() -> list[GenerationResult]:
                return list(await asyncio.gather(*(complete(self, r) for r in requests)))

            return asyncio.run(run_all())
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for index, request in enumerate(requests):
            self._check_images(request.chat)
            options = merged_options(self.spec.processor_options, request.processor_options)
            groups.setdefault(tuple(sorted((k, repr(v)) for k, v in options.items())), []).append(index)
        for indices in groups.values():
            for index, result in zip(indices, self._offline_batch([requests[i] for i in indices])):
                results[index] = result
        return [r for r in results if r is not None]

    def _offline_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        options = merged_options(self.spec.processor_options, requests[0].processor_options)
        conversations = [self._messages(r.chat) for r in requests]
        params = [self._sampling(r) for r in requests]
        start = time.perf_counter()
        try:
            with self._offline_lock:
                outputs = self.backend.chat(
                    conversations, params, use_tqdm=self.settings.use_tqdm, mm_processor_kwargs=dict(options) or None
                )
        except Exception as exc:
            self.counters["failures"] += 1
            raise request_error(exc) from exc
        wall = time.perf_counter() - start
        results = []
        for request, output in zip(requests, outputs):
            snap = _snapshot(output, request.sampling.top_logprobs if request.sampling.logprobs else None)
            prompt_tokens = len(output.prompt_token_ids or ())
            per_image = self._image_counts(request.chat, options, ())
            timings = Timings(total_s=wall, load_s=self.load_s, peak_memory_bytes=device_memory_used(), **snap["stats"])
            if "prefill_s" in snap["stats"]:
                timings.ttft_s = snap["stats"].get("queue_s", 0.0) + snap["stats"]["prefill_s"]
            results.append(GenerationResult(
                text=snap["text"], finish_reason=finish_reason(snap["finish_reason"]), prompt_tokens=prompt_tokens,
                image_tokens=sum(per_image), completion_tokens=snap["tokens"], timings=timings,
                model=self.model_id, engine=self.name, logprobs=snap["logprobs"],
            ))  # fmt: skip
        return results

    # -- info, health, close -------------------------------------------------------------------

    def info(self) -> EngineInfo:
        import vllm

        return EngineInfo(
            engine=self.name,
            model=self.model_id,
            family=self.family.name if self.family else None,
            max_model_len=self.max_model_len,
            max_images=self.max_images,
            device="cuda",
            dtype=str(getattr(self.backend.model_config, "dtype", self.args.get("dtype", "auto"))).replace("torch.", ""),
            load_s=self.load_s,
            details={
                "mode": "offline" if self.settings.offline else "async",
                "checkpoint": self.source,
                "vllm_version": getattr(vllm, "__version__", "?"),
                "quantization": self.args.get("quantization"),
                "engine_args": {k: v for k, v in self.args.items() if isinstance(v, str | int | float | bool | dict)},
                **self.counters,
            },
        )

    def health(self) -> tuple[bool, str]:
        if self._closed:
            return False, "the vLLM engine is closed"
        if self.loop is not None and getattr(self.backend, "errored", False):
            return False, "the vLLM engine core died"
        return True, "ok"

    def close(self) -> None:
        """Shut vLLM's engine-core process down and stop the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.loop is not None:
                backend = self.backend

                async def shutdown() -> None:  # on its loop, so the output handler's cancel runs
                    backend.shutdown()
                    await asyncio.sleep(0)

                self.loop.call(shutdown(), timeout=60)
                self.loop.stop()
            else:
                core = getattr(getattr(self.backend, "llm_engine", None), "engine_core", None)
                if core is not None:
                    core.shutdown()
        except Exception:
            logger.exception("shutting vLLM down failed")
        self.backend = None


def _snapshot(output: Any, top_logprobs: int | None = None) -> dict[str, Any]:
    """The parts of a ``vllm.RequestOutput`` vlmlab uses, as plain data (safe to hand to another
    thread: vLLM may reuse the object for the next update). ``top_logprobs``: None when the
    request asked for no logprobs."""
    completion = output.outputs[0]
    stats: dict[str, float] = {}
    metrics = getattr(output, "metrics", None)
    if metrics is not None and hasattr(metrics, "first_token_ts"):
        stats = stats_timings(metrics.queued_ts, metrics.scheduled_ts, metrics.first_token_ts, metrics.last_token_ts)
    return {
        "text": completion.text,
        "tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "finished": bool(output.finished),
        "stats": stats,
        "logprobs": None if top_logprobs is None else token_logprobs(completion.token_ids, completion.logprobs, top_logprobs),
    }


def _has_renderer_api() -> bool:
    return importlib.util.find_spec("vllm.renderers") is not None
