"""The llama.cpp engine: GGUF models through llama-cpp-python and llama.cpp's ``mtmd`` (``pip
install 'vlmlab[llamacpp]'``)::

    vlmlab nano export-gguf gguf/                       # nano -> gguf/vlmlab-nano.gguf + mmproj
    vlmlab chat --engine llamacpp --model gguf/vlmlab-nano.gguf --mmproj gguf/mmproj-vlmlab-nano.gguf \\
        --image red_square.png "What colour is the shape?"
    vlmlab serve --engine llamacpp --model nano          # the same, exported once into the cache
    vlmlab serve --engine llamacpp --model ggml-org/pixtral-12b-GGUF \\
        --gguf-file pixtral-12b-Q4_K_M.gguf --mmproj mmproj-pixtral-12b-f16.gguf

The prompt is the GGUF's own chat template with llama.cpp's media marker where each image goes;
mtmd turns the marker into the image's tokens (with the family's break / end tokens) and
encodes the image with the projector. Images are first resized by vlmlab's family rule
(:func:`.translate.resized_size`): llama.cpp's own resizer rounds differently, which changes
answers. Sampling is llama.cpp's sampler chain with ``repeat_penalty`` 1.0 unless asked.

A llama.cpp context decodes one sequence at a time, so concurrency comes from copies
(``--data-parallel-size N``: N contexts on threads of their own, the CPUs shared among them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines.base import Capabilities, Engine, EngineInfo, GenerationRequest, PromptCount
from vlmlab.engines.copies import CopyPlan, folder_weight_bytes, plan_copies
from vlmlab.engines.llamacpp.projector import Projector, read_projector, repair_image_embeddings
from vlmlab.engines.llamacpp.translate import (
    FEATURES,
    INSTALL_HINT,
    GGUFFiles,
    SamplerPlan,
    TokenText,
    default_threads,
    family_of,
    family_prompt,
    finish_reason,
    resized_size,
    resolve_files,
    sampler_plan,
    structured_grammar,
    template_messages,
)
from vlmlab.engines.stops import StopText
from vlmlab.families import Family
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
_QUIET: list[Any] = []  # the no-op log callbacks handed to llama.cpp (kept alive here)


class _Prompt:
    """A request's prompt as mtmd chunks (freed with :meth:`free`), or as plain tokens for a
    model loaded without a projector."""

    def __init__(self, mtmd: Any, chunks: Any, bitmaps: list[Any], text_tokens: list[int] | None = None) -> None:
        self.mtmd, self.chunks, self.bitmaps, self.text_tokens = mtmd, chunks, bitmaps, text_tokens

    def tokens(self) -> tuple[int, int]:
        """``(all positions, image-chunk positions)``."""
        if self.text_tokens is not None:
            return len(self.text_tokens), 0
        total = images = 0
        for i in range(self.mtmd.mtmd_input_chunks_size(self.chunks)):
            chunk = self.mtmd.mtmd_input_chunks_get(self.chunks, i)
            n = self.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            total += n
            if self.mtmd.mtmd_input_chunk_get_type(chunk) != self.mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                images += n
        return total, images

    def free(self) -> None:
        if self.chunks is not None:
            self.mtmd.mtmd_input_chunks_free(self.chunks)
            self.chunks = None
        for bitmap in self.bitmaps:
            self.mtmd.mtmd_bitmap_free(bitmap)
        self.bitmaps = []


class _Copy:
    """One llama.cpp context (``Llama``) with its mtmd context: used by one thread at a time."""

    def __init__(self, llama: Any, mtmd_ctx: Any) -> None:
        self.llama = llama
        self.mtmd_ctx = mtmd_ctx


class LlamaCppEngine(Engine):
    """GGUF models on llama.cpp. Create with :meth:`load`."""

    name = "llamacpp"
    capabilities = Capabilities(streaming=True, batching=False, max_images=8, cancellation=True, exact_token_counts=True, features=FEATURES)

    def __init__(self, spec: EngineSpec, files: GGUFFiles, copies: list[_Copy], family: Family | None,
                 threads: int, load_s: float, metadata: Mapping[str, str], projector: Projector | None = None) -> None:  # fmt: skip
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self._lib, self._mtmd = llama_cpp, mtmd
        self.spec, self.files, self.family, self.threads, self.load_s = spec, files, family, threads, load_s
        self.model_id = spec.model
        self.metadata = dict(metadata)
        first = copies[0].llama
        self.max_model_len = first.n_ctx()
        self.n_vocab = first.n_vocab()
        # The width of the projector's output rows (mtmd.h: n_embd_inp floats per image token).
        self.n_embd_inp = llama_cpp.llama_model_n_embd_inp(first.model)
        self.projector = projector or Projector()
        self.max_images = (family.max_images if family else 8) if files.mmproj else 0
        self.capabilities = dataclasses.replace(type(self).capabilities, max_images=self.max_images, images=bool(files.mmproj))  # type: ignore[misc]
        self.marker = mtmd.mtmd_default_marker().decode("utf-8")
        self.template = _compile_template(_template_source(spec.extra.get("chat_template")) or metadata.get("tokenizer.chat_template"))
        vocab = llama_cpp.llama_model_get_vocab(first.model)
        self._vocab = vocab
        self.end_tokens = tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        self._bos_eos = {"bos_token": self._piece(first, llama_cpp.llama_vocab_bos(vocab)), "eos_token": self._piece(first, llama_cpp.llama_vocab_eos(vocab))}
        self._free: queue.SimpleQueue[_Copy] = queue.SimpleQueue()
        for copy in copies:
            self._free.put(copy)
        self._copies = copies
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(copies), thread_name_prefix="vlmlab-llamacpp")
        self.counters = {"requests": 0, "cancelled": 0, "repaired_images": 0}
        self.copies_reason = "as asked (--data-parallel-size)"
        self._closed = False

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: EngineSpec) -> LlamaCppEngine:
        """Load the GGUF (and its mmproj) ``spec`` names into ``spec.data_parallel_size`` contexts.

        Raises:
            EngineUnavailableError: llama-cpp-python is not installed.
            NotFoundError / ConfigError: the files cannot be found, or settings it does not take.
            EngineError: llama.cpp cannot load them.
        """
        try:
            import llama_cpp
            import llama_cpp.mtmd_cpp as mtmd
        except ImportError as exc:
            raise EngineUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
        if spec.processor_options:
            raise ConfigError(f"the llamacpp engine runs llama.cpp's image processing as the GGUF sets it; drop --opt {dict(spec.processor_options)}")
        if spec.device == "mps":
            raise ConfigError("the llamacpp engine offloads to CUDA or Metal through its own build; use --device auto or cpu")
        files = _files(spec)
        gpu_layers = 0
        if spec.device in ("auto", "cuda") and llama_cpp.llama_supports_gpu_offload():
            gpu_layers = -1
        elif spec.device == "cuda":
            raise ConfigError("--device cuda: this llama-cpp-python was built without GPU offload (rebuild with CMAKE_ARGS=-DGGML_CUDA=on)")
        if spec.data_parallel_size == "auto":
            weights = sum(folder_weight_bytes(p) or 0 for p in (files.model, files.mmproj) if p is not None)
            # A copy's own memory is its KV cache and compute buffers: the weights are mmapped once.
            plan = plan_copies(weights, on_gpu=gpu_layers != 0, per_copy_bytes=256 * 2**20, small_bytes=2**30)
        else:
            plan = CopyPlan(int(spec.data_parallel_size), None, "as asked (--data-parallel-size)")
        copies_n = plan.copies
        threads = int(spec.extra.get("n_threads") or plan.threads or default_threads(copies_n))
        _quiet(llama_cpp, mtmd)
        start = time.perf_counter()
        copies = []
        try:
            for _ in range(copies_n):
                copies.append(_load_copy(llama_cpp, mtmd, files, spec, threads, gpu_layers))
        except Exception:
            for copy in copies:
                _free_copy(mtmd, copy)
            raise
        metadata = dict(copies[0].llama.metadata)
        projector = read_projector(files.mmproj)
        family = family_of(metadata, projector.projector_type, spec.extra.get("family"))
        if family is None:
            logger.warning("llamacpp: no vlmlab family for %s (pass --family): images are not resized by a family rule", files.model.name)
        engine = cls(spec, files, copies, family, threads, time.perf_counter() - start, metadata, projector)
        engine.copies_reason = plan.reason
        return engine

    # -- prompts ---------------------------------------------------------------------------------

    def _prompt_text(self, chat: Chat) -> str:
        if self.template is not None:
            return self.template.render(messages=template_messages(chat, self.marker), add_generation_prompt=True, **self._bos_eos)
        if self.family is None:
            raise BadRequestError(f"{self.files.model.name} has no chat template and no family; load it with --family NAME")
        return family_prompt(self.family, chat, self.marker)

    @staticmethod
    def _piece(llama: Any, token: int) -> str:
        if token < 0:
            return ""
        return llama.detokenize([token], special=True).decode("utf-8", "replace")

    def _check(self, chat: Chat, options: Mapping[str, Any] | None) -> None:
        if options:
            raise BadRequestError("the llamacpp engine takes no per-request processor options", param="mm_processor_kwargs")
        if chat.images and not self.files.mmproj:
            raise BadRequestError(f"{self.files.model.name} was loaded without --mmproj, so it takes no images", param="messages")
        if len(chat.images) > self.max_images:
            raise BadRequestError(f"At most {self.max_images} image(s) may be provided in one request, got {len(chat.images)}", param="messages")

    def _tokenize(self, copy: _Copy, chat: Chat) -> _Prompt:
        """On a pool thread: the prompt text and the resized images as mtmd chunks."""
        import numpy as np

        mtmd = self._mtmd
        text = self._prompt_text(chat).encode("utf-8")
        if copy.mtmd_ctx is None:  # no projector: _check let no image through
            return _Prompt(mtmd, None, [], copy.llama.tokenize(text, add_bos=False, special=True))
        prompt = _Prompt(mtmd, None, [])
        try:
            for part in chat.images:
                image = part.data.image if part.data is not None else None
                if image is None:
                    raise BadRequestError(f"image {part.ref or ''!r:.80} has no decoded pixels")
                size = resized_size(self.family, image.width, image.height, {})
                if size is not None:
                    from PIL import Image

                    image = image.resize(size, Image.Resampling.BICUBIC)
                pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
                bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
                if not bitmap:
                    raise BadRequestError(f"llama.cpp could not take image {part.ref or ''!r:.80}")
                prompt.bitmaps.append(bitmap)
            chunks = mtmd.mtmd_input_chunks_init()
            prompt.chunks = chunks
            given = mtmd.mtmd_input_text()
            given.text, given.text_len, given.add_special, given.parse_special = text, len(text), False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * len(prompt.bitmaps))(*prompt.bitmaps)
            status = mtmd.mtmd_tokenize(copy.mtmd_ctx, chunks, ctypes.byref(given), bitmaps, len(prompt.bitmaps))
            if status == 1:
                raise BadRequestError(f"the prompt's {text.count(self.marker.encode())} image markers do not match its {len(prompt.bitmaps)} images")
            if status != 0:
                raise BadRequestError(f"llama.cpp could not process the images (mtmd_tokenize returned {status})")
        except BaseException:
            prompt.free()
            raise
        return prompt

    def _count(self, copy: _Copy, chat: Chat) -> PromptCount:
        prompt = self._tokenize(copy, chat)
        try:
            total, image_positions = prompt.tokens()
        finally:
            prompt.free()
        per_image = self._image_tokens(chat)
        return PromptCount(total, sum(per_image) if per_image else image_positions, per_image)

    def _image_tokens(self, chat: Chat) -> tuple[int, ...]:
        if self.family is None or not chat.images:
            return ()
        sizes = [(p.data.width, p.data.height) for p in chat.images if p.data is not None]
        return tuple(self.family.prompt_image_tokens(sizes))

    def _with_copy(self, work: Callable[[_Copy], Any]) -> Any:
        copy = self._free.get()
        try:
            return work(copy)
        finally:
            self._free.put(copy)

    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        self._check(chat, processor_options)
        return self.pool.submit(self._with_copy, lambda copy: self._count(copy, chat)).result()

    # -- generation -------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        if self._closed:
            raise EngineUnavailableError("the llamacpp engine is closed")
        start = time.perf_counter()
        self._check(request.chat, request.processor_options)
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        grammar = structured_grammar(request.sampling.structured, json_schema_to_gbnf)
        plan = sampler_plan(request.sampling, self.n_vocab, self.end_tokens, grammar)
        # Built here, once: a grammar llama.cpp cannot parse is a 400 before any chunk. The pool
        # thread that runs the generation frees it.
        chain = _sampler_chain(self._lib, plan, self.n_vocab, self._vocab, request.sampling.structured)
        self.counters["requests"] += 1
        caller = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value: Any) -> None:
            if not caller.is_closed():
                caller.call_soon_threadsafe(items.put_nowait, (kind, value))

        queued = time.perf_counter()
        self.pool.submit(self._with_copy, lambda copy: self._run(copy, request, chain, put, cancelled))
        text: list[str] = []
        first = None
        try:
            while True:
                kind, value = await items.get()
                if kind == "text":
                    first = first or time.perf_counter()
                    piece, count = value
                    text.append(piece)
                    yield GenerationChunk(piece, count)
                elif kind == "error":
                    raise value if isinstance(value, VlmlabError) else EngineError(f"llama.cpp failed: {type(value).__name__}: {value}")
                else:
                    figures = value
                    break
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()  # the pool thread stops after the token in progress
            self.counters["cancelled"] += 1
            raise
        end = time.perf_counter()
        if not request.stream and figures["text"]:
            text.append(figures["text"])
        timings = Timings(
            queue_s=figures["started"] - queued,
            preprocess_s=figures["preprocess_s"],
            prefill_s=figures["prefill_s"],
            decode_s=figures["decode_s"],
            ttft_s=((first if request.stream else None) or figures["first"] or end) - start,
            total_s=end - start,
            load_s=self.load_s,
        )
        yield GenerationResult(
            text="".join(text),
            finish_reason=figures["reason"],
            prompt_tokens=figures["prompt_tokens"],
            image_tokens=figures["image_tokens"],
            completion_tokens=figures["completion_tokens"],
            timings=timings,
            model=self.model_id,
            engine=self.name,
        )

    def _run(self, copy: _Copy, request: GenerationRequest, chain: Any,
             put: Callable[[str, Any], None], cancelled: threading.Event) -> None:  # fmt: skip
        """On a pool thread holding ``copy``: one generation with the sampler ``chain`` (freed here)."""
        started = time.perf_counter()
        try:
            put("done", self._generate(copy, request, chain, put, cancelled, started))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            put("error", exc)
        finally:
            self._lib.llama_sampler_free(chain)

    def _generate(self, copy: _Copy, request: GenerationRequest, chain: Any,
                  put: Callable[[str, Any], None], cancelled: threading.Event, started: float) -> dict[str, Any]:  # fmt: skip
        lib, llama = self._lib, copy.llama
        sampling = request.sampling
        prompt = self._tokenize(copy, request.chat)
        try:
            total, image_positions = prompt.tokens()
            if total + sampling.max_tokens > self.max_model_len:
                raise ContextLengthError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                    f"requested {total + sampling.max_tokens} tokens ({total} in the messages, "
                    f"{sampling.max_tokens} in the completion)."
                )
            prepared = time.perf_counter()
            self._prefill(copy, prompt)
        finally:
            prompt.free()
        prefilled = time.perf_counter()
        per_image = self._image_tokens(request.chat)
        stop = StopText(sampling.stop)
        decoder = TokenText()
        generated = pending = 0
        hit_end = False
        first = None
        streamed = request.stream
        while generated < sampling.max_tokens and not cancelled.is_set():
            token = lib.llama_sampler_sample(chain, llama.ctx, -1)
            if not sampling.ignore_eos and lib.llama_vocab_is_eog(self._vocab, token):
                hit_end = True
                break
            generated += 1
            pending += 1
            first = first or time.perf_counter()
            piece = stop.feed(decoder.feed(llama.detokenize([token])))
            if piece and streamed:
                put("text", (piece, pending))
                pending = 0
            if stop.stopped or generated >= sampling.max_tokens:
                break
            llama.eval([token])
        tail = "" if stop.stopped else stop.feed(decoder.flush()) + stop.flush()
        if streamed and (tail or pending):
            put("text", (tail, pending))
        done = time.perf_counter()
        return {
            "reason": finish_reason(hit_end, stop.stopped, cancelled.is_set()),
            "text": "" if streamed else stop.text,
            "prompt_tokens": total,
            "image_tokens": sum(per_image) if per_image else image_positions,
            "completion_tokens": generated,
            "started": started,
            "preprocess_s": prepared - started,
            "prefill_s": prefilled - prepared,
            "decode_s": done - (first or done),
            "first": first,
        }

    def _prefill(self, copy: _Copy, prompt: _Prompt) -> None:
        """Evaluate the prompt's chunks: text tokens through ``Llama.eval``, images through
        :meth:`_eval_image`."""
        lib, mtmd, llama = self._lib, self._mtmd, copy.llama
        llama.reset()
        # Drop the previous request's KV cells: Llama.eval trims them only when it runs, so a
        # prompt whose first chunk is an image would meet a dirty cache (mtmd status -1).
        lib.llama_memory_clear(lib.llama_get_memory(llama.ctx), False)
        if prompt.text_tokens is not None:
            llama.eval(prompt.text_tokens)
            return
        for i in range(mtmd.mtmd_input_chunks_size(prompt.chunks)):
            chunk = mtmd.mtmd_input_chunks_get(prompt.chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                if count.value:
                    llama.eval(pointer[: count.value])
                continue
            llama.n_tokens = self._eval_image(copy, chunk)

    def _eval_image(self, copy: _Copy, chunk: Any) -> int:
        """``mtmd_helper_eval_chunk_single``'s image path (encode, then decode the embeddings at
        the copy's next position), with the embeddings checked in between
        (:func:`.projector.repair_image_embeddings`: llama.cpp's Pixtral graph can leave stale NaN
        in its [IMG_BREAK] rows). Returns the position after the image."""
        import numpy as np

        lib, mtmd, llama = self._lib, self._mtmd, copy.llama
        status = mtmd.mtmd_encode_chunk(copy.mtmd_ctx, chunk)
        if status != 0:
            raise EngineError(f"llama.cpp failed to encode an image (mtmd status {status})")
        pointer = mtmd.mtmd_get_output_embd(copy.mtmd_ctx)
        embeddings = np.ctypeslib.as_array(pointer, shape=(mtmd.mtmd_input_chunk_get_n_tokens(chunk), self.n_embd_inp))
        if repair_image_embeddings(embeddings, self.projector.img_break):
            self.counters["repaired_images"] += 1
        past = lib.llama_pos(0)
        no_callback = mtmd.mtmd_helper_post_decode_callback()  # a NULL function pointer
        status = mtmd.mtmd_helper_decode_image_chunk(copy.mtmd_ctx, llama.ctx, chunk, pointer, llama.n_tokens, 0, llama.n_batch,
                                                     ctypes.byref(past), no_callback, None)  # fmt: skip
        if status != 0:
            raise EngineError(f"llama.cpp failed to decode an image's embeddings (mtmd status {status})")
        return past.value

    # -- info, close -----------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine=self.name,
            model=self.model_id,
            family=self.family.name if self.family else None,
            max_model_len=self.max_model_len,
            max_images=self.max_images,
            device="cuda" if self._lib.llama_supports_gpu_offload() and self.spec.device != "cpu" else "cpu",
            dtype=_file_type(self.metadata.get("general.file_type")),
            load_s=self.load_s,
            details={
                "gguf": str(self.files.model),
                "mmproj": str(self.files.mmproj) if self.files.mmproj else None,
                "data_parallel_size": len(self._copies),  # the hf engine's name for its copies
                "copies_reason": self.copies_reason,
                "threads_per_copy": self.threads,
                **self.counters,
            },
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)
        for copy in self._copies:
            _free_copy(self._mtmd, copy)
        self._copies = []


# -- helpers ---------------------------------------------------------------------------------------


def _files(spec: EngineSpec) -> GGUFFiles:
    from vlmlab.nano import is_nano

    if is_nano(spec.model):
        from vlmlab.engines.llamacpp.convert import nano_gguf

        files = nano_gguf(spec.extra.get("llama_cpp"))
        mmproj = spec.extra.get("mmproj")
        return files if not mmproj else GGUFFiles(files.model, Path(str(mmproj)))
    return resolve_files(spec.model, spec.extra, download=lambda repo, name: _hub_download(repo, name, spec.revision))


def _hub_download(repo: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    from vlmlab.hub import describe

    try:
        return hf_hub_download(repo, filename, revision=revision)
    except Exception as exc:  # noqa: BLE001 - every failure is "cannot get this file"
        raise NotFoundError(f"cannot get {filename} from the Hub repository {repo}: {describe(exc)}") from exc


def _load_copy(llama_cpp: Any, mtmd: Any, files: GGUFFiles, spec: EngineSpec, threads: int, gpu_layers: int) -> _Copy:
    n_ctx = int(spec.max_model_len or spec.extra.get("n_ctx") or 0)
    try:
        llama = llama_cpp.Llama(
            str(files.model), n_ctx=n_ctx or 0, n_batch=int(spec.extra.get("n_batch") or 2048), n_threads=threads,
            n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False,
        )  # fmt: skip
    except ValueError as exc:
        raise EngineError(f"llama.cpp could not load {files.model}: {exc}") from exc
    mtmd_ctx = None
    if files.mmproj is not None:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu_layers != 0
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        # The vision encoder's attention as the language model's (as llama-cpp-python's own chat
        # handler sets it); mtmd's AUTO picks flash attention, whose rounding differs.
        params.flash_attn_type = llama.context_params.flash_attn_type
        mtmd_ctx = mtmd.mtmd_init_from_file(str(files.mmproj).encode(), llama.model, params)
        if not mtmd_ctx:
            llama.close()
            raise EngineError(f"llama.cpp could not load the projector {files.mmproj} for {files.model.name}")
    return _Copy(llama, mtmd_ctx)


def _free_copy(mtmd: Any, copy: _Copy) -> None:
    if copy.mtmd_ctx:
        mtmd.mtmd_free(copy.mtmd_ctx)
        copy.mtmd_ctx = None
    copy.llama.close()


def _quiet(llama_cpp: Any, mtmd: Any) -> None:
    """Silence llama.cpp's and mtmd's per-request logging (Llama(verbose=False) covers only the
    model loader): errors still reach Python as return codes."""
    if _QUIET:
        return
    callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    _QUIET.append(callback)
    mtmd.mtmd_log_set(callback, None)
    mtmd.mtmd_helper_log_set(callback, None)


def _template_source(value: Any) -> str | None:
    """``extra["chat_template"]``: a Jinja template, or a file holding one (llama.cpp's
    ``--chat-template-file``), used instead of the GGUF's own."""
    if not value:
        return None
    text = str(value)
    if "{" not in text and Path(text).expanduser().is_file():
        return Path(text).expanduser().read_text(encoding="utf-8")
    return text


def _compile_template(source: str | None) -> Any:
    """The GGUF's Jinja chat template, compiled once (rendering it is then ~50 us)."""
    if not source:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise BadRequestError(f"the model's chat template refused the messages: {message}", param="messages")

    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


def _grammar_sampler(lib: Any, vocab: Any, grammar: str, structured: Any) -> Any:
    sampler = lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise BadRequestError(f"llama.cpp could not parse the grammar for {structured.param}", param=structured.param)
    return sampler


def _sampler_chain(lib: Any, plan: SamplerPlan, n_vocab: int, vocab: Any, structured: Any) -> Any:
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    try:
        _add_samplers(lib, chain, plan, n_vocab, vocab, structured)
    except BaseException:
        lib.llama_sampler_free(chain)
        raise
    return chain


def _add_samplers(lib: Any, chain: Any, plan: SamplerPlan, n_vocab: int, vocab: Any, structured: Any) -> None:
    if plan.logit_bias:
        biases = (lib.llama_logit_bias * len(plan.logit_bias))(*(lib.llama_logit_bias(t, b) for t, b in plan.logit_bias))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(n_vocab, len(plan.logit_bias), biases))
    if plan.repeat_penalty != 1.0 or plan.frequency_penalty or plan.presence_penalty:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(-1, plan.repeat_penalty, plan.frequency_penalty, plan.presence_penalty))
    if plan.grammar is not None:
        lib.llama_sampler_chain_add(chain, _grammar_sampler(lib, vocab, plan.grammar, structured))
    if plan.greedy:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return
    if plan.top_k > 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(plan.top_k))
    if plan.top_p < 1.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(plan.top_p, 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(plan.temperature))
    seed = plan.seed if plan.seed is not None else lib.LLAMA_DEFAULT_SEED
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))


# general.file_type (llama_ftype) -> the weights' type as vlmlab names dtypes.
_FILE_TYPES = {"0": "fp32", "1": "fp16", "7": "q8_0", "15": "q4_k_m", "17": "q5_k_m", "18": "q6_k", "32": "bf16"}


def _file_type(value: str | None) -> str:
    return _FILE_TYPES.get(str(value), f"gguf-{value}" if value else "gguf")
