"""The mistral engine: Pixtral run by mistral-inference, Mistral's reference code, on its native
checkpoint folder (``params.json`` + ``consolidated.safetensors`` + ``tekken.json``), tokenised
by mistral_common (``pip install 'vlmlab[mistral]'``, on an NVIDIA GPU)::

    vlmlab chat --engine mistral --model mistralai/Pixtral-12B-2409 --image street.jpg \\
        "Describe this image in one sentence."
    vlmlab serve --engine mistral --model /models/Pixtral-12B-2409      # a downloaded folder

It is the reference to hold the other engines' Pixtral answers against, not a fast server: one
generation at a time (``max_batch_size=1``), bf16 weights as released, no quantisation.

mistral-inference's ``generate.generate`` returns all tokens at the end, samples with a fixed
``top_p=0.8`` and stops only at one EOS id. To stream token by token, stop at stop strings,
honour the request's top_p, seed and ``ignore_eos`` and stop on cancellation, :meth:`_run` runs the
same steps itself, with the same parts: ``Transformer.forward`` over a ``BufferCache`` (one
prefill with the images, then one token at a time) and ``generate.sample``. With one prompt
they are ``generate``'s steps (mistral-inference 1.6 ``mistral_inference/generate.py``), so
greedy answers equal ``generate``'s (tests/test_engine_mistral.py checks it on a GPU).

Prompt tokens are exact: the tokens mistral_common encodes are the ones the model runs. Image
tokens are counted in them (every ``[IMG]`` / ``[IMG_BREAK]`` / ``[IMG_END]``), equal to the
pixtral family rule (variant "mistral").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines.base import (
    Capabilities,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptCount,
    check_features,
)
from vlmlab.engines.mistral.translate import (
    INSTALL_HINT,
    NATIVE_FILES,
    IncrementalText,
    MistralPrompt,
    check_sampling,
    context_limit,
    dtype_name,
    encode_chat,
    finish_reason,
    missing_files,
    sample_settings,
    spec_options,
    unavailable_reason,
)
from vlmlab.engines.quantization import spec_quantization
from vlmlab.engines.sources import LOCAL_FIX, hub_load_plan, resolve_model
from vlmlab.engines.stops import StopText
from vlmlab.families import Family, get_family
from vlmlab.families.pixtral import LONGEST_EDGE, PATCH
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


class MistralEngine(Engine):
    """mistral-inference's ``Transformer`` on a CUDA GPU. Create with :meth:`load`."""

    name = "mistral"
    capabilities = Capabilities(streaming=True, batching=False, max_images=8, cancellation=True, exact_token_counts=True)

    def __init__(self, spec: EngineSpec, folder: Path, tokenizer: Any, model: Any,
                 worker: concurrent.futures.ThreadPoolExecutor, load_s: float):  # fmt: skip
        self.spec = spec
        self.folder = folder
        self.tokenizer = tokenizer
        self.text_tokenizer = tokenizer.instruct_tokenizer.tokenizer
        self.model = model
        self.worker = worker  # one generation at a time: the model holds one BufferCache's worth
        self.load_s = load_s
        self.model_id = spec.model
        self.max_model_len = context_limit(spec.max_model_len)
        self.family = _family_of(tokenizer)
        vision = getattr(model.args, "vision_encoder", None) is not None
        self.max_images = (self.family.max_images if self.family else 8) if vision else 0
        self.capabilities = dataclasses.replace(type(self).capabilities, images=vision, max_images=self.max_images)  # type: ignore[misc]
        self.counters = {"requests": 0, "cancelled": 0}
        self._closed = False

    @classmethod
    def load(cls, spec: EngineSpec) -> MistralEngine:
        """Load a native Mistral checkpoint folder (or download one from the Hub) with
        mistral-inference on the GPU.

        Raises:
            NotFoundError: the folder lacks a native file, or a Hub id cannot be fetched now.
            EngineUnavailableError: mistral-inference is missing, or there is no CUDA GPU.
            ConfigError: processor options (mistral_common's image encoder takes none), a
                quantization, a context beyond mistral-inference's 128k positions.
            EngineError: mistral-inference failed to load the weights.
        """
        spec_options(spec.processor_options)
        context_limit(spec.max_model_len)
        quantization = spec_quantization(spec.extra)
        if quantization is not None:
            raise ConfigError(
                f"the mistral engine runs the checkpoint's weights as released (bf16); --quantization "
                f"{quantization!r} does not apply: use --engine hf (bitsandbytes, torchao) or vllm",
                param="quantization",
            )
        # Free checks first: a wrong path or an unreachable Hub fails before any import.
        source, cache_only = _locate(spec)
        has_mistral_inference = importlib.util.find_spec("mistral_inference") is not None
        reason = unavailable_reason(has_mistral_inference, has_mistral_inference and _cuda_available(), spec.device)
        if reason:
            raise EngineUnavailableError(reason)
        folder = source if isinstance(source, Path) else _download(source, spec.revision, cache_only)
        start = time.perf_counter()
        worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlab-mistral")
        try:
            tokenizer, model = worker.submit(_load, folder, dtype_name(spec.dtype)).result()
        except Exception as exc:
            worker.shutdown(wait=False)
            if isinstance(exc, VlmlabError):
                raise
            if isinstance(exc, ImportError):  # xformers missing or built for another torch
                raise EngineUnavailableError(f"mistral-inference cannot be imported ({exc}); {INSTALL_HINT}") from exc
            raise EngineError(f"mistral-inference failed to load {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
        return cls(spec, folder, tokenizer, model, worker, time.perf_counter() - start)

    # -- prompts -------------------------------------------------------------------------------

    def _encode(self, chat: Chat) -> MistralPrompt:
        if len(chat.images) > self.max_images:
            raise BadRequestError(
                f"At most {self.max_images} image(s) may be provided in one request, got {len(chat.images)}",
                param="messages",
            )
        return encode_chat(self.tokenizer, chat)

    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        if processor_options:
            _request_options(processor_options)
        prompt = self._encode(chat)
        return PromptCount(len(prompt.tokens), prompt.image_tokens, prompt.per_image)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        if self._closed:
            raise EngineUnavailableError("the mistral engine is closed")
        start = time.perf_counter()
        sampling = request.sampling
        # SamplingParams' tool_choice defaults to "auto"; with no tools offered there is nothing to call.
        probe = sampling if request.chat.tools else dataclasses.replace(sampling, tool_choice="none")
        check_features(self.name, self.capabilities, probe, bool(request.chat.tools))
        check_sampling(sampling)
        if request.processor_options:
            _request_options(request.processor_options)
        prompt = await asyncio.to_thread(self._encode, request.chat)
        requested = len(prompt.tokens) + sampling.max_tokens
        if requested > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {requested} tokens ({len(prompt.tokens)} in the messages, "
                f"{sampling.max_tokens} in the completion)."
            )
        self.counters["requests"] += 1
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value: Any) -> None:
            if not caller.is_closed():
                caller.call_soon_threadsafe(queue.put_nowait, (kind, value))

        queued = time.perf_counter()
        self.worker.submit(self._run, prompt, request, put, cancelled)
        text: list[str] = []
        pending = 0
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    pending += 1
                    if value:
                        text.append(value)
                        yield GenerationChunk(value, pending)
                        pending = 0
                elif kind == "text":  # the held-back tail: no new token
                    text.append(value)
                    yield GenerationChunk(value, 0)
                elif kind == "error":
                    raise _engine_error(value)
                else:
                    figures = value
                    break
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()  # the worker stops after the token in progress
            self.counters["cancelled"] += 1
            raise
        end = time.perf_counter()
        first = figures["first"] or end
        timings = Timings(
            queue_s=figures["started"] - queued,
            ttft_s=first - start,
            prefill_s=first - figures["started"],
            decode_s=(figures["last"] or first) - first,
            total_s=end - start,
            load_s=self.load_s,
            peak_memory_bytes=figures["peak_memory_bytes"],
        )
        yield GenerationResult(
            text="".join(text),
            finish_reason=figures["reason"],
            prompt_tokens=len(prompt.tokens),
            image_tokens=prompt.image_tokens,
            completion_tokens=figures["tokens"],
            timings=timings,
            model=self.model_id,
            engine=self.name,
        )

    def _run(self, prompt: MistralPrompt, request: GenerationRequest, put: Callable[[str, Any], None], cancelled: threading.Event) -> None:
        """On the worker thread: ``generate.generate``'s steps for one prompt, each token's text
        handed to ``put`` as it comes (see the module docstring)."""
        started = time.perf_counter()
        try:
            import torch
            from mistral_inference.cache import BufferCache
            from mistral_inference.generate import sample

            model, sampling = self.model, request.sampling
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # generate.sample draws from torch's global generator
            cuda = model.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(model.device)
            eos = None if sampling.ignore_eos else self.text_tokenizer.eos_id
            settings = sample_settings(sampling)
            images = [torch.tensor(image, device=model.device, dtype=model.dtype) for image in prompt.images]
            cache = BufferCache(
                model.n_local_layers, model.args.max_batch_size, len(prompt.tokens) + sampling.max_tokens,
                model.args.n_kv_heads, model.args.head_dim, model.args.sliding_window,
            )  # fmt: skip
            cache.to(device=model.device, dtype=model.dtype)
            cache.reset()
            text, stop = IncrementalText(self.text_tokenizer, []), StopText(sampling.stop)
            tokens, saw_eos, first, last = 0, False, None, None
            with torch.inference_mode():
                ids = torch.tensor(prompt.tokens, device=model.device, dtype=torch.long)
                logits = model.forward(ids, images=images, seqlens=[len(prompt.tokens)], cache=cache)[-1:]
                for step in range(sampling.max_tokens):
                    next_token = sample(logits, **settings)
                    token = int(next_token.item())
                    last = time.perf_counter()
                    first = first or last
                    if token == eos:
                        saw_eos = True
                        break
                    tokens += 1
                    put("token", stop.feed(text.add(token)))
                    if stop.stopped or cancelled.is_set():
                        break
                    if step + 1 < sampling.max_tokens:
                        logits = model.forward(next_token, seqlens=[1], cache=cache)
            if not stop.stopped:
                tail = stop.feed(text.flush())
                tail += "" if stop.stopped else stop.flush()
                if tail:
                    put("text", tail)
            put("done", {
                "reason": finish_reason(saw_eos, stop.stopped, cancelled.is_set()),
                "tokens": tokens, "started": started, "first": first, "last": last,
                "peak_memory_bytes": int(torch.cuda.max_memory_allocated(model.device)) if cuda else None,
            })  # fmt: skip
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
            device=str(self.model.device.type) if self.model is not None else "cuda",
            dtype={"auto": "bf16"}.get(self.spec.dtype, self.spec.dtype),
            load_s=self.load_s,
            details={"folder": str(self.folder), **self.counters},
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.model = self.tokenizer = None


def _locate(spec: EngineSpec) -> tuple[Path | str, bool]:
    """``(folder, False)`` for a local checkpoint folder, ``(hub id, cache_only)`` for a Hub id
    that can be fetched now (from the cache when ``cache_only``).

    Raises:
        NotFoundError: the folder lacks a native file, or the Hub id is neither cached nor
            downloadable.
    """
    source, _ = resolve_model(spec.model)
    folder = Path(source)
    if folder.exists():
        _check_folder(folder, spec.model)
        return folder, False
    return source, hub_load_plan(spec.model, source, spec.revision, probe="params.json")


def _check_folder(folder: Path, model: str) -> None:
    missing = missing_files(folder) if folder.is_dir() else list(NATIVE_FILES)
    if missing:
        hf_port = (folder / "config.json").is_file()
        raise NotFoundError(
            f"{model!r} is not a native Mistral checkpoint folder: it lacks {', '.join(missing)} "
            f"(mistral-inference reads {', '.join(NATIVE_FILES)})"
            + ("; it holds a transformers checkpoint (config.json): use --engine hf or vllm" if hf_port else "")
        )


def _download(repo: str, revision: str | None, cache_only: bool) -> Path:
    """The native files of ``repo`` from the Hub (or only its cache when ``cache_only``)."""
    from huggingface_hub import snapshot_download

    from vlmlab.hub import describe

    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=list(NATIVE_FILES), local_files_only=cache_only)
    except Exception as exc:
        raise NotFoundError(f"cannot fetch {repo!r} ({', '.join(NATIVE_FILES)}) from the Hub: {describe(exc)}. {LOCAL_FIX}") from exc
    folder = Path(path)
    _check_folder(folder, repo)
    return folder


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _load(folder: Path, dtype: str) -> tuple[Any, Any]:
    import torch
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_inference.transformer import Transformer

    tokenizer = MistralTokenizer.from_file(str(folder / "tekken.json"))
    model = Transformer.from_folder(folder, max_batch_size=1, device="cuda", dtype=getattr(torch, dtype))
    return tokenizer, model


def _family_of(tokenizer: Any) -> Family | None:
    """The pixtral family when the tokenizer's image encoder is Pixtral-12B's (16 px patches,
    1024 px longest edge, no patch merging); other native checkpoints count their image tokens
    from the tokens only."""
    encoder = getattr(tokenizer.instruct_tokenizer, "image_encoder", None)
    config = getattr(encoder, "image_config", None)
    if config is None:
        return None
    if (config.image_patch_size, config.max_image_size, getattr(config, "spatial_merge_size", 1)) != (PATCH, LONGEST_EDGE, 1):
        return None
    return get_family("pixtral")


def _engine_error(exc: BaseException) -> VlmlabError:
    """A vlmlab error for what the worker raised. xformers without a kernel for the inputs says
    "No operator found for `memory_efficient_attention_forward`" and lists why each was refused."""
    if isinstance(exc, VlmlabError):
        return exc
    message = str(exc).strip()
    if isinstance(exc, NotImplementedError) and "memory_efficient_attention" in message:
        return EngineUnavailableError(
            f"xformers has no attention kernel for these inputs on this machine ({message.splitlines()[0]}); "
            "mistral-inference needs an NVIDIA GPU with bf16/fp16 weights (--dtype bf16) and an xformers build "
            "for the installed torch (python -m xformers.info)"
        )
    return EngineError(f"mistral-inference failed: {type(exc).__name__}: {message}")


def _request_options(options: Mapping[str, Any]) -> None:
    try:
        spec_options(options)
    except ConfigError as exc:
        raise BadRequestError(exc.message, param="mm_processor_kwargs") from exc
