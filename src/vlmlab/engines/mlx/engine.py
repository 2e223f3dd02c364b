"""The MLX engine: mlx-vlm on Apple Silicon (``pip install 'vlmlab[mlx]'``).

A known hub id (or family name) loads mlx-community's INT4 conversion, so a 12B model fits a
16 GB Mac::

    vlmlab chat --engine mlx --model mistralai/Pixtral-12B-2409 --image street.jpg \\
        "Describe this image in one sentence."          # loads mlx-community/pixtral-12b-4bit
    vlmlab chat --engine mlx --model microsoft/Phi-3.5-vision-instruct --image street.jpg "..."
    vlmlab serve --engine mlx --model mlx-community/Qwen2-VL-2B-Instruct-4bit

mlx-vlm runs one generation at a time on one thread (MLX streams are thread-local), streams
each token's text, and reports prompt / generation tokens per second and peak memory, which
become the result's timings. Prompt tokens are exact (mlx-vlm's own ``prepare_inputs``); image
tokens follow the family rule. Processor options are those of the checkpoint: mlx-vlm takes no
per-request ``num_crops`` / ``max_pixels``, so asking for others is refused, not ignored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import logging
import platform
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines.base import Capabilities, Engine, EngineInfo, GenerationRequest, PromptCount
from vlmlab.engines.mlx.translate import (
    MLXCheckpoint,
    StepFigures,
    check_options,
    checkpoint_options,
    finish_reason,
    mlx_messages,
    resolve_checkpoint,
    sampling_kwargs,
    unavailable_reason,
)
from vlmlab.engines.stops import StopText
from vlmlab.families import Family, get_family
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult, Timings
from vlmlab.protocol.errors import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EngineError,
    EngineUnavailableError,
    NotFoundError,
    VlmlabError,
)

logger = logging.getLogger(__name__)


class MLXEngine(Engine):
    """mlx-vlm on Apple Silicon. Create with :meth:`load`."""

    name = "mlx"
    capabilities = Capabilities(streaming=True, batching=False, max_images=8, cancellation=True, exact_token_counts=True)

    def __init__(self, spec: EngineSpec, checkpoint: MLXCheckpoint, model: Any, processor: Any,
                 family: Family | None, worker: concurrent.futures.ThreadPoolExecutor, load_s: float):  # fmt: skip
        self.spec = spec
        self.checkpoint = checkpoint
        self.model = model
        self.processor = processor
        self.family = family
        self.worker = worker  # every MLX call runs on this one thread
        self.load_s = load_s
        self.model_id = spec.model
        self.max_model_len = self._max_model_len()
        self.max_images = family.max_images if family else 8
        self.capabilities = dataclasses.replace(type(self).capabilities, max_images=self.max_images)  # type: ignore[misc]
        self.options = checkpoint_options(family, checkpoint.source)
        self.counters = {"requests": 0, "cancelled": 0}
        self._closed = False

    @classmethod
    def load(cls, spec: EngineSpec) -> MLXEngine:
        """Load ``spec.model`` (or its INT4 conversion) with mlx-vlm.

        Raises:
            EngineUnavailableError: not Apple Silicon, or mlx-vlm is not installed.
            ConfigError: settings the MLX engine does not take.
            NotFoundError / EngineError: the checkpoint cannot be found or loaded.
        """
        reason = unavailable_reason(platform.system(), platform.machine(), importlib.util.find_spec("mlx_vlm") is not None)
        if reason:
            raise EngineUnavailableError(reason)
        if spec.device not in ("auto", "mps"):
            raise ConfigError(f"the mlx engine runs on the Apple GPU (Metal); drop --device {spec.device}")
        checkpoint = resolve_checkpoint(spec.model, spec.extra)
        family = get_family(checkpoint.family) if checkpoint.family else None
        check_options(family, checkpoint.source, spec.processor_options, "--opt")
        if checkpoint.repo != spec.model:
            logger.info("mlx: %s loads %s (%s-bit MLX conversion)", spec.model, checkpoint.repo, checkpoint.bits or "?")
        start = time.perf_counter()
        worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlab-mlx")
        kwargs: dict[str, Any] = {"revision": spec.revision}
        if spec.trust_remote_code or checkpoint.trust_remote_code:
            kwargs["trust_remote_code"] = True
        try:
            model, processor = worker.submit(_load, checkpoint.repo, kwargs).result()
        except Exception as exc:
            worker.shutdown(wait=False)
            if isinstance(exc, VlmlabError):
                raise
            if isinstance(exc, OSError | FileNotFoundError) or "not found" in str(exc).lower():
                raise NotFoundError(f"mlx-vlm cannot find {checkpoint.repo!r}: {exc}") from exc
            raise EngineError(f"mlx-vlm failed to load {checkpoint.repo!r}: {type(exc).__name__}: {exc}") from exc
        if family is None:
            family = _family_of_config(model.config)
        return cls(spec, checkpoint, model, processor, family, worker, time.perf_counter() - start)

    def _max_model_len(self) -> int:
        if self.spec.max_model_len:
            return self.spec.max_model_len
        config = self.model.config
        found = _config_value(_config_value(config, "text_config") or config, "max_position_embeddings")
        if found:
            return int(found)
        if self.family is not None:
            try:
                return self.family.checkpoint(self.checkpoint.source).max_model_len
            except VlmlabError:
                return self.family.checkpoint().max_model_len
        return 4096

    # -- prompts -------------------------------------------------------------------------------

    def _prompt(self, chat: Chat) -> str:
        from mlx_vlm.prompt_utils import apply_chat_template

        return apply_chat_template(self.processor, self.model.config, mlx_messages(chat), num_images=len(chat.images))

    def _images(self, chat: Chat) -> list[Any]:
        images = []
        for part in chat.images:
            if part.data is None or part.data.image is None:
                raise BadRequestError(f"image {part.ref or ''!r:.80} has no decoded pixels for mlx-vlm")
            images.append(part.data.image)
        return images

    def _check(self, chat: Chat, options: Mapping[str, Any] | None) -> None:
        if len(chat.images) > self.max_images:
            raise BadRequestError(
                f"At most {self.max_images} image(s) may be provided in one request, got {len(chat.images)}",
                param="messages",
            )
        if options:
            try:
                check_options(self.family, self.checkpoint.source, options, "the request")
            except ConfigError as exc:
                raise BadRequestError(exc.message, param="mm_processor_kwargs") from exc

    def _count(self, chat: Chat) -> PromptCount:
        """On the worker thread: mlx-vlm's own input preparation, as ``stream_generate`` does."""
        from mlx_vlm.utils import prepare_inputs

        images = self._images(chat)
        model_type = _config_value(self.model.config, "model_type") or ""
        add_special = True
        try:
            from mlx_vlm.utils import should_add_special_tokens

            add_special = should_add_special_tokens(model_type, self.processor)
        except ImportError:  # older mlx-vlm: it always added them
            pass
        inputs = prepare_inputs(
            self.processor, images=images or None, prompts=self._prompt(chat),
            image_token_index=_config_value(self.model.config, "image_token_index"), add_special_tokens=add_special,
        )  # fmt: skip
        total = int(inputs["input_ids"].shape[-1])
        per_image = self._image_tokens(chat)
        return PromptCount(total, sum(per_image), per_image)

    def _image_tokens(self, chat: Chat) -> tuple[int, ...]:
        if self.family is None or not chat.images:
            return ()
        sizes = [(p.data.width, p.data.height) for p in chat.images if p.data is not None]
        return tuple(self.family.prompt_image_tokens(sizes, **self.options))

    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        self._check(chat, processor_options)
        return self.worker.submit(self._count, chat).result()

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        if self._closed:
            raise EngineUnavailableError("the mlx engine is closed")
        start = time.perf_counter()
        self._check(request.chat, request.processor_options)
        count = await asyncio.wrap_future(self.worker.submit(self._count, request.chat))
        if count.prompt_tokens + request.sampling.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {count.prompt_tokens + request.sampling.max_tokens} tokens "
                f"({count.prompt_tokens} in the messages, {request.sampling.max_tokens} in the completion)."
            )
        self.counters["requests"] += 1
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value: Any) -> None:
            if not caller.is_closed():
                caller.call_soon_threadsafe(queue.put_nowait, (kind, value))

        queued = time.perf_counter()
        self.worker.submit(self._run, request, put, cancelled)
        text: list[str] = []
        first = last = None
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    last = time.perf_counter()
                    first = first or last
                    text.append(value)
                    yield GenerationChunk(value, 1)
                elif kind == "error":
                    raise value if isinstance(value, VlmlabError) else EngineError(f"mlx-vlm failed: {type(value).__name__}: {value}")
                else:
                    figures, reason, started = value
                    break
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()  # the worker stops after the token in progress
            self.counters["cancelled"] += 1
            raise
        end = time.perf_counter()
        first = first or end
        timings = Timings(
            queue_s=started - queued,
            ttft_s=first - start,
            total_s=end - start,
            load_s=self.load_s,
            **figures.timings(),
        )
        timings.decode_s = timings.decode_s if timings.decode_s is not None else (last or first) - first
        yield GenerationResult(
            text="".join(text),
            finish_reason=reason,
            prompt_tokens=figures.prompt_tokens or count.prompt_tokens,
            image_tokens=count.image_tokens,
            completion_tokens=figures.generation_tokens,
            timings=timings,
            model=self.model_id,
            engine=self.name,
        )

    def _run(self, request: GenerationRequest, put: Callable[[str, Any], None], cancelled: threading.Event) -> None:
        """On the worker thread: one generation, text pieces handed to ``put`` as they come."""
        started = time.perf_counter()
        try:
            from mlx_vlm import stream_generate

            chat, sampling = request.chat, request.sampling
            stop = StopText(sampling.stop)
            figures = StepFigures()
            mlx_reason = None
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            saved = getattr(tokenizer, "stopping_criteria", None)
            if sampling.ignore_eos and saved is not None:
                tokenizer.stopping_criteria = _never_stop  # stream_generate stops on EOS through it
            try:
                for step in stream_generate(self.model, self.processor, self._prompt(chat), image=self._images(chat) or None, **sampling_kwargs(sampling)):
                    figures = StepFigures(step.prompt_tokens, step.generation_tokens, step.prompt_tps, step.generation_tps, step.peak_memory)
                    mlx_reason = step.finish_reason or mlx_reason
                    piece = stop.feed(step.text or "")
                    if piece:
                        put("text", piece)
                    if stop.stopped or cancelled.is_set():
                        break
            finally:
                if saved is not None:
                    tokenizer.stopping_criteria = saved
            tail = stop.flush() if not stop.stopped else ""
            if tail:
                put("text", tail)
            put("done", (figures, finish_reason(mlx_reason, stop.stopped, cancelled.is_set()), started))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            put("error", exc)

    # -- info, close ---------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine=self.name,
            model=self.model_id,
            family=self.family.name if self.family else None,
            max_model_len=self.max_model_len,
            max_images=self.max_images,
            device="mps",
            dtype=f"int{self.checkpoint.bits}" if self.checkpoint.bits else "mlx",
            load_s=self.load_s,
            details={"checkpoint": self.checkpoint.repo, "source": self.checkpoint.source, "options": self.options, **self.counters},
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.model = self.processor = None


def _load(repo: str, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    from mlx_vlm import load

    return load(repo, **{k: v for k, v in kwargs.items() if v is not None})


def _never_stop(*_args: Any, **_kwargs: Any) -> bool:
    return False


def _config_value(config: Any, name: str) -> Any:
    """A field of an mlx-vlm model config (a dataclass, or a plain dict for sub-configs)."""
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _family_of_config(config: Any) -> Family | None:
    model_type = _config_value(config, "model_type")
    try:
        return get_family(model_type) if model_type else None
    except VlmlabError:
        logger.warning("mlx: no vlmlab family for model_type %r: image tokens are not counted", model_type)
        return None
